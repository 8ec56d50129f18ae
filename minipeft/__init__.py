"""minipeft: parameter-efficient fine-tuning in plain, readable PyTorch."""

from .base_model_state import get_base_model_state_dict, set_base_model_state_dict
from .checkpoint import get_peft_config, get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .config import PeftConfig, PeftType, TaskType
from .hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .injection import inject_adapter_in_model
from .lora_conversion import convert_to_lora, save_as_lora
from .mixed_batches import mixed_batch
from .model import PeftModel, get_peft_model
from .optimizers import create_lorafa_optimizer, create_loraplus_optimizer
from .precision import cast_mixed_precision_params, prepare_model_for_kbit_training
from .status import get_layer_status, get_model_status
from .tuners.adalora import AdaLoraConfig
from .tuners.boft import BOFTConfig
from .tuners.bottleneck import BottleneckConfig
from .tuners.c3a import C3AConfig
from .tuners.fourierft import FourierFTConfig
from .tuners.hra import HRAConfig
from .tuners.ia3 import IA3Config
from .tuners.ln_tuning import LNTuningConfig
from .tuners.loha import LoHaConfig
from .tuners.lokr import LoKrConfig
from .tuners.lora import EvaConfig, LoftQConfig, LoraConfig
from .tuners.lora_loftq import replace_lora_weights_loftq
from .tuners.lora_eva import get_eva_state_dict, initialize_lora_eva_weights
from .tuners.miss import MissConfig
from .tuners.oft import OFTConfig
from .tuners.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from .tuners.prefix_tuning import PrefixTuningConfig
from .tuners.prompt_tuning import PromptTuningConfig, PromptTuningInit
from .tuners.road import RoadConfig
from .tuners.trainable_tokens import TrainableTokensConfig
from .tuners.vera import VeraConfig

__all__ = [
    "AdaLoraConfig",
    "BOFTConfig",
    "BottleneckConfig",
    "C3AConfig",
    "EvaConfig",
    "FourierFTConfig",
    "HRAConfig",
    "IA3Config",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoftQConfig",
    "LoraConfig",
    "MissConfig",
    "OFTConfig",
    "PeftConfig",
    "PeftModel",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "RoadConfig",
    "TaskType",
    "TrainableTokensConfig",
    "VeraConfig",
    "cast_mixed_precision_params",
    "convert_to_lora",
    "create_lorafa_optimizer",
    "create_loraplus_optimizer",
    "get_base_model_state_dict",
    "get_eva_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "initialize_lora_eva_weights",
    "inject_adapter_in_model",
    "load_peft_weights",
    "mixed_batch",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_kbit_training",
    "replace_lora_weights_loftq",
    "save_as_lora",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
__version__ = "0.1.0"
