"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): prompt tuning whose prompt a small network computes.

Prompt tuning learns the prompt ``P`` (n, d) directly. P-tuning learns a table ``E`` (n, d) and
a network, and the prompt is the network's output:

    P = MLP(E)              MLP: d -> h -> h -> d, ReLU between      (peft's default, "MLP")
    P = MLP(BiLSTM(E))      the LSTM reads E's rows as a sequence,    ("LSTM", the paper's)
                            h per direction; MLP: 2h -> 2h -> d

so the prompt's tokens are no longer free of each other: the paper's reason for the
reparameterisation (``h = encoder_hidden_size``, ``token_dim`` by default). The network runs
once per forward, on the table alone; its output is then used exactly as prompt tuning uses
its table (``PromptEmbedding`` in ``prompt_tuning.py``: in front of the input, the mask, labels
and positions widened, generation, encoder-decoder models).

Checkpoints, as peft's: only the network's output ``P`` is saved (``prompt_embeddings``). A
loaded adapter is that table with no network (``fold``), which computes the same prompt. Loaded
to train (``is_trainable=True``, or ``set_peft_model_state_dict`` into a model built to train)
it trains ``P`` directly, after a warning. peft refuses ``is_trainable=True`` for virtual-token
methods, and its ``set_peft_model_state_dict`` into a model built to train runs that model's new,
randomly initialised network on top of the saved ``P``, which computes neither the saved prompt
nor one learned from it.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import PeftType, check_probability, is_positive_int
from . import prompt_tuning
from . import virtual_tokens as vt
from .base import evaluating


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network between the table and the prompt."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(vt.PromptLearningConfig):
    """P-tuning hyper-parameters, with peft's field names.

    encoder_reparameterization_type: ``MLP`` (three linear layers) or ``LSTM`` (a bidirectional
    LSTM of ``encoder_num_layers`` layers, then two linear layers).
    encoder_hidden_size: h above; ``token_dim`` when omitted, as in peft.
    encoder_num_layers: the LSTM's layers (the MLP always has three; another value is ignored,
    with a warning, as in peft).
    encoder_dropout: dropout between the LSTM's layers.
    input_embeddings_name (minipeft only, not saved): as in ``PromptTuningConfig``.
    """

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    input_embeddings_name: str | None = None

    runtime_only_fields: ClassVar[tuple[str, ...]] = ("input_embeddings_name",)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.P_TUNING
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(self.encoder_reparameterization_type)
        except ValueError:
            raise ValueError(
                f"encoder_reparameterization_type={self.encoder_reparameterization_type!r} is not one of: MLP, LSTM"
            ) from None
        if self.encoder_hidden_size is not None and not is_positive_int(self.encoder_hidden_size):
            raise ValueError(f"encoder_hidden_size must be a positive integer or None (token_dim), "
                             f"got {self.encoder_hidden_size!r}")
        if not is_positive_int(self.encoder_num_layers):
            raise ValueError(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}")
        check_probability(self, "encoder_dropout")
        mlp = self.encoder_reparameterization_type == PromptEncoderReparameterizationType.MLP
        if mlp and not self.inference_mode:
            for name, value, default in (("encoder_num_layers", self.encoder_num_layers, 2),
                                         ("encoder_dropout", self.encoder_dropout, 0.0)):
                if value != default:
                    warnings.warn(f"{name}={value} is ignored by the MLP encoder, which always has three linear "
                                  "layers and no dropout (as in peft, which warns of encoder_num_layers alone); it "
                                  "applies to the LSTM", stacklevel=3)


class PromptEncoder(prompt_tuning.PromptEmbedding):
    """P-tuning's prompt: the table ``embedding`` (total, d) through ``lstm_head`` (LSTM only) and
    ``mlp_head``, peft's module names. In inference mode (a loaded adapter) there is no network,
    and the table is the prompt."""

    def __init__(self, config: PromptEncoderConfig, word_embeddings: nn.Module) -> None:
        # h defaults to the token width; written into the config, which is saved with the adapter.
        config.encoder_hidden_size = config.encoder_hidden_size or config.token_dim
        super().__init__(config, word_embeddings)

    def initialise(self, config: PromptEncoderConfig, word_embeddings: nn.Module) -> None:
        """Build the network (the table stays standard normal, as peft's), in peft's order: table,
        LSTM, MLP, so that under one seed both libraries draw the same weights."""
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if config.inference_mode:
            return
        d, h = config.token_dim, config.encoder_hidden_size
        device = word_embeddings.weight.device
        if config.encoder_reparameterization_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True, device=device)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, device=device), nn.ReLU(),
                                          nn.Linear(2 * h, d, device=device))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h, device=device), nn.ReLU(), nn.Linear(h, h, device=device),
                                          nn.ReLU(), nn.Linear(h, d, device=device))

    def rows(self) -> torch.Tensor:
        """The prompt ``P`` (total, d): the network applied to the table (the table, once folded)."""
        table = self.embedding.weight
        if self.mlp_head is None:
            return table
        if self.lstm_head is not None:
            table = self.lstm_head(table.unsqueeze(0))[0].squeeze(0)  # (total, 2h): both directions
        return self.mlp_head(table)

    def prompt_embeddings(self) -> torch.Tensor:
        """``P`` as the model computes it in eval mode (no LSTM dropout, no random draw), whatever
        the current mode: what a checkpoint holds."""
        with evaluating(self):
            return self.rows()

    def has_network(self) -> bool:
        return self.mlp_head is not None

    def fold(self) -> None:
        """Replace the network by the prompt it computes, written into the table (the same
        Parameter, so an optimizer built before goes on training it): the same prompt in eval
        mode, no network."""
        if self.mlp_head is None:
            return
        with torch.no_grad():
            self.embedding.weight.copy_(self.prompt_embeddings())
        self.lstm_head = self.mlp_head = None

    def load_prompt_embeddings(self, tensor: torch.Tensor) -> None:
        """Load a saved prompt ``P``. A checkpoint holds no network, so one built to train is
        folded away first and ``P`` trains directly."""
        self.check_prompt_embeddings(tensor)
        if self.mlp_head is not None:
            warnings.warn(
                "a P-tuning checkpoint holds the prompt its network computed, not the network: training goes on "
                "on the prompt itself, as in prompt tuning", stacklevel=3,
            )
            self.fold()
        super().load_prompt_embeddings(tensor)


def attach(peft_model: nn.Module, adapter_name: str, config: PromptEncoderConfig) -> None:
    """Add a P-tuning adapter to ``peft_model``: prompt tuning's, with this prompt."""
    prompt_tuning.attach(peft_model, adapter_name, config, encoder_class=PromptEncoder)
