"""minipeft: parameter-efficient fine-tuning in plain, readable PyTorch."""

from .config import PeftConfig, PeftType, TaskType
from .injection import inject_adapter_in_model
from .model import PeftModel, get_peft_model
from .tuners.lora import LoraConfig

__all__ = [
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftType",
    "TaskType",
    "get_peft_model",
    "inject_adapter_in_model",
]
__version__ = "0.1.0"
