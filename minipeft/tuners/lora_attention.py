"""LoRA on ``nn.MultiheadAttention``, the layer that never calls its own linear maps.

PyTorch's attention module keeps its query, key and value projections as one parameter,
``in_proj_weight`` (3E, E), and hands ``out_proj.weight`` straight to
``F.multi_head_attention_forward``: no linear layer's forward runs that a LoRA wrapper could add
its term to (which is why naming ``out_proj`` alone is an error, see ``targeting.py``). So LoRA
works on the weights here, as in peft:

    in_proj:   W_in  + s B_in A_in       A_in: (r, E),  B_in: (3E, r)    (this layer)
    out_proj:  W_out + s B_out A_out     A_out: (r, E), B_out: (E, r)    (a LoraLinear on out_proj)

Each forward runs the attention with these sums in place of its two weights
(``torch.func.functional_call``), so the gradients reach A and B through them; merging writes
them in for good. The layout is peft's (``attn.lora_A``, ``attn.base_layer.out_proj.lora_A``),
so checkpoints map one to one. Unlike peft, the attention's parameters are never deleted and
re-created around a call.

What the weight form cannot do, as in peft: ``lora_dropout`` (it drops a layer's input, and the
projections' inputs live inside the attention) is not applied, with a warning. DoRA and the inits
that decompose a linear layer's weight, and lora_bias, are refused (``lora.check_target``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call

from .base import AddedUpdate, plus, wide
from .lora import LoraConfig, LoraLayer, LoraLinear


class LoraMultiheadAttention(AddedUpdate, LoraLayer):
    """LoRA on the in_proj and out_proj of an ``nn.MultiheadAttention`` (query, key and value of one width)."""

    supports_mixed_batch = False  # its forward swaps weights for the whole call, not per row
    merged_name = "in_proj_weight"  # what merging adds to here (out_proj's LoraLinear merges its own weight)

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        embed_dim = base_layer.embed_dim
        super().__init__(base_layer, embed_dim, 3 * embed_dim)

    # Code around the attention reads its attributes (nn.TransformerEncoderLayer checks them for its
    # fused fast path): the wrapper answers for the module it stands in for.
    embed_dim = property(lambda self: self.base_layer.embed_dim)
    num_heads = property(lambda self: self.base_layer.num_heads)
    head_dim = property(lambda self: self.base_layer.head_dim)
    batch_first = property(lambda self: self.base_layer.batch_first)
    dropout = property(lambda self: self.base_layer.dropout)
    in_proj_bias = property(lambda self: self.base_layer.in_proj_bias)
    out_proj = property(lambda self: self.base_layer.out_proj)  # the LoraLinear holding out_proj's factors
    bias_k = property(lambda self: self.base_layer.bias_k)
    bias_v = property(lambda self: self.base_layer.bias_v)
    add_zero_attn = property(lambda self: self.base_layer.add_zero_attn)
    # Except for this one: nn.TransformerEncoderLayer's fast path computes the attention from the
    # weights it reads here, past this wrapper's forward, and would leave the adapters out. Saying
    # the projections differ in width is what turns that path off (it then calls the wrapper).
    _qkv_same_embed_dim = False

    @property
    def in_proj_weight(self) -> torch.Tensor:
        """The in_proj weight the attention computes with, adapters included. nn.TransformerEncoder
        reads it to decide whether to pack a padded batch into a nested tensor, which it must not
        do while the weights need gradients: the frozen base weight would say they do not."""
        return self.adapted_weights().get("in_proj_weight", self.base_layer.in_proj_weight)

    def update_layer(self, adapter_name: str, config: LoraConfig, key: str) -> None:
        super().update_layer(adapter_name, config, key)
        if config.lora_dropout > 0:
            warnings.warn(
                f"lora_dropout={config.lora_dropout} is not applied on {key!r}, an nn.MultiheadAttention: its LoRA is "
                "added to the weights, where no input passes to drop (peft ignores it there too)"
            )
            self.lora_dropout[adapter_name] = nn.Identity()
        # The same rank and alpha on out_proj, as peft gives it (one target, one rank). The first
        # adapter puts a LoraLinear there, inside the attention: peft's layout, and the place
        # whose .weight the attention reads (undone by unwrap).
        if not isinstance(self.out_proj, LoraLinear):
            self.base_layer.out_proj = LoraLinear(self.out_proj)
        self.out_proj.add_adapter(adapter_name, config, key)

    def create_adapter(self, adapter_name: str, r: int, bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        self.place_adapter(adapter_name, self.base_layer.in_proj_weight)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if isinstance(self.out_proj, LoraLinear):
            self.out_proj.delete_adapter(adapter_name)  # (a no-op when the model deleted it there first)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s B_in A_in`` (3E, E), in at least fp32."""
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return (wide(B) @ wide(A)) * self.scaling[adapter_name]

    def adapted_weights(self) -> dict[str, torch.Tensor]:
        """``W + sum of s B A`` over the active unmerged adapters, for each weight they change, by
        its name in the attention (out_proj's is read through its LoraLinear, from base_layer.weight)."""
        out_proj, weights = self.out_proj, {}
        if names := self.adapters_to_apply():
            weights["in_proj_weight"] = plus(self.base_layer.in_proj_weight, sum(self.delta_weight(n) for n in names))
        if isinstance(out_proj, LoraLinear) and (names := out_proj.adapters_to_apply()):
            weights["out_proj.base_layer.weight"] = plus(out_proj.base_layer.weight,
                                                         sum(out_proj.delta_weight(n) for n in names))
        return weights

    def forward(self, query: torch.Tensor, *args, **kwargs):
        self.unmerge_if_disabled()
        if isinstance(self.out_proj, LoraLinear):
            self.out_proj.unmerge_if_disabled()  # its forward, which would do this, never runs
        weights = self.adapted_weights()
        if not weights:
            return self.base_layer(query, *args, **kwargs)
        return functional_call(self.base_layer, weights, (query, *args), kwargs)

    def unwrap(self, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
        """The attention as it was, out_proj included (unloading unwraps that LoraLinear first;
        a refused injection, which built this wrapper, relies on this alone)."""
        if isinstance(self.out_proj, LoraLinear):
            self.base_layer.out_proj = self.out_proj.unwrap(merge, adapter_names)
        return super().unwrap(merge, adapter_names)

    # -- merging: in_proj_weight here; out_proj's LoraLinear merges its own weight ----------------
    def _base_tensors(self) -> dict[str, torch.Tensor]:
        return {"in_proj_weight": self.base_layer.in_proj_weight.detach()}

