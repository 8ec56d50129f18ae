"""What OFT, HRA and BOFT share: a frozen weight multiplied on its input side by a learned square matrix.

The three methods keep a layer's weight ``W`` (out, d) and learn an orthogonal-ish ``M`` (d, d), OFT as
block rotations, HRA as a product of Householder reflections, BOFT as butterfly products of rotations:

    W' = W M,        y = x W'^T + b = (x M^T) W^T + b,        x: (..., d)

so the rows of ``W`` (one per output neuron) are all transformed alike. A linear layer's forward
applies ``M^T`` to its input and calls the frozen layer: no copy of the weight is made, and a
wrapper inside it (another method's adapter on the same layer) gets the transformed input, as the
weight it adapts will once merged. A convolution is a linear map of each flattened
patch, so its kernel rows (out, in / groups x k...) are multiplied by ``M`` and the layer's own
convolution (stride, padding, dilation, groups) runs with them: nothing acts on the input alone.

Several adapters active on one layer compose as their merges do: merging ``M_1`` then ``M_2``
gives ``W M_1 M_2``, so the forward applies ``M_2^T`` to ``x`` first, then ``M_1^T``. These
matrices do not commute, so the active adapters of a layer merge only in their order (an adapter
merged out of turn would change the model; it is refused, and so is merging a wrapper around
another method's unmerged adapter, ``PeftModel._check_nested_merges``). Merging writes ``W M``;
unmerging multiplies by ``M^{-1}``.

A method subclasses these layers and provides one operation, ``apply_map(t, name, transpose,
inverse, in_forward)``: ``t @ M`` along ``t``'s last axis, or ``M^T``, ``M^{-1}``, ``M^{-T}``,
without building the (d, d) matrix where it can avoid it. A method may also scale each output
feature (BOFT's magnitude ``s``: (out,)), ``W' = diag(s) W M``: it sets ``scales_outputs`` and
provides ``output_scale``. The bias is not scaled: ``y = s * (x M^T W^T) + b``, ``b`` the bias of
the layer inside as it computes (another method's adapter there may change it, and merging that
adapter writes it into the base bias). A row scale and a map on the input side commute, so the
order rule above is unchanged.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..targeting import CONVOLUTIONS
from .base import AdapterLayer, wide


def index_cache(make):
    """``make`` (an index tensor from sizes and a device) computed once per arguments in eager
    calls, where each would otherwise be a launch per forward; traced afresh under torch.compile,
    which warns at a cached function and folds such constants into its graph anyway. Made outside
    inference mode: an inference tensor, kept, could not be saved for a later backward."""

    def make_normal(*args):
        with torch.inference_mode(False):
            return make(*args)

    cached = functools.cache(make_normal)

    @functools.wraps(make)
    def lookup(*args):
        return make(*args) if torch.compiler.is_compiling() else cached(*args)
    return lookup


class InputTransformLayer(AdapterLayer):
    """Around a linear layer (``nn.Linear``, GPT-2's ``Conv1D``, whose weight is stored (d, out)):
    the input multiplied by each active adapter's ``M^T``."""

    supports_mixed_batch = True
    mergeable = True
    # Whether adapters also scale each output feature (``output_scale``; module docstring).
    scales_outputs = False

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out

    def transformed_size(self) -> int:
        """``d``, the size of the vectors ``M`` acts on."""
        weight = self.get_base_layer().weight
        return weight.shape[0] if self.fan_in_fan_out else weight.shape[1]

    def apply_map(self, t: torch.Tensor, adapter_name: str, transpose: bool, inverse: bool = False,
                  in_forward: bool = True) -> torch.Tensor:
        """``t @ M`` for adapter ``adapter_name`` (``M^T`` with ``transpose``, ``M^{-1}`` with
        ``inverse``), along the last axis, in at least the adapter's precision. ``in_forward``:
        for a forward (training-time randomness and in-place constraints act), not a merge."""
        raise TypeError(f"{type(self).__name__} must define apply_map")

    def output_scale(self, adapter_name: str) -> torch.Tensor:
        """The scale ``s`` (out,) of each output feature, where ``scales_outputs``."""
        raise TypeError(f"{type(self).__name__} sets scales_outputs = True but does not define output_scale")

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        routed = self.row_routing is not None
        adapters = None if routed else self.adapters_to_apply()
        if routed:  # each row by its own adapter (a copy: rows are written in place)
            mapped = self.apply_adapters(x.clone(), x, self._mapped_input)
        else:  # the adapter merged last acts on x first (module docstring)
            mapped = self.apply_adapters(x, x, self._mapped_input, adapters=adapters[::-1])
        result = self.base_layer(mapped, *args, **kwargs)
        if self.scales_outputs:
            # The bias, expanded to result's shape, goes where apply_adapters takes the input: a
            # mixed batch slices it by rows as it slices result (an inner wrapper's differs by row).
            bias = self._bias_inside(mapped, args, kwargs)
            bias = (result.new_zeros(()) if bias is None else bias).expand_as(result)
            result = self.apply_adapters(result, bias, self._scaled_output, adapters=adapters)
        return result

    def _mapped_input(self, t: torch.Tensor, _x: torch.Tensor, name: str) -> torch.Tensor:
        """``t M^T`` for adapter ``name``, returned in ``t``'s dtype."""
        return self.apply_map(t, name, transpose=True).to(t.dtype)

    def _bias_inside(self, mapped: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The bias of the layer this one wraps, as it computes: the base layer's own, or where
        another method's wrapper sits inside, that wrapper's output at zero input (an adapter
        there may change the bias: RoAd, (IA)^3 on outputs, LoRA's lora_bias). Merging that
        adapter writes exactly this into the base bias, so the output scale keeps its meaning
        whichever of the two adapters is merged."""
        if not isinstance(self.base_layer, AdapterLayer):
            return self.get_base_layer().bias
        # One zero row does, but in a mixed batch, whose rows the layer inside routes by adapter.
        rows = mapped.shape[:-1] if self.row_routing is not None else (1,) * (mapped.dim() - 1)
        zeros = mapped.new_zeros((*rows, mapped.shape[-1]))
        return self.base_layer(zeros, *args, **kwargs)

    def _scaled_output(self, result: torch.Tensor, bias: torch.Tensor, name: str) -> torch.Tensor:
        """``s * (result - b) + b``: adapter ``name``'s scale on the layer's output, not on its bias
        (``bias`` of ``result``'s shape)."""
        scale = self.output_scale(name).to(result.dtype)
        return (result - bias) * scale + bias

    def scale_rows(self, weight: torch.Tensor, name: str, inverse: bool) -> torch.Tensor:
        """The stored weight with output feature ``j`` multiplied by ``s_j`` (divided, with
        ``inverse``); the weight itself where the method scales nothing."""
        if not self.scales_outputs:
            return weight
        scale = self.output_scale(name).to(weight.dtype)
        scale = 1 / scale if inverse else scale
        # (out, d) for nn.Linear and convolutions (out, in, k...); (d, out) for GPT-2's Conv1D
        return weight * scale if self.fan_in_fan_out else weight * scale.view(-1, *[1] * (weight.dim() - 1))

    # -- merging ------------------------------------------------------------------------------
    def weight_times(self, weight: torch.Tensor, name: str, inverse: bool = False, in_forward: bool = False):
        """The stored weight times ``M`` (or ``M^{-1}``) on its input side, its rows scaled where
        the method scales outputs: ``diag(s) W M`` for a (out, d) weight, ``M^T W diag(s)`` for
        GPT-2's (d, out) one."""
        if self.fan_in_fan_out:
            mapped = self.apply_map(weight.T, name, transpose=False, inverse=inverse, in_forward=in_forward).T
        else:
            mapped = self.apply_map(weight, name, transpose=False, inverse=inverse, in_forward=in_forward)
        return self.scale_rows(mapped, name, inverse)

    def merge_order(self) -> list[str]:
        """The active adapters of this layer merge only in their order (module docstring)."""
        return [a for a in self.active_adapters if a in self.adapter_names]

    @torch.no_grad()
    def merged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]):
        weight = tensors["weight"]
        return {"weight": self.weight_times(wide(weight), adapter_name).to(weight.dtype)}, None

    @torch.no_grad()
    def unmerged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], kept: torch.Tensor | None):
        if self.scales_outputs and (self.output_scale(adapter_name) == 0).any():
            raise ValueError(f"cannot unmerge adapter {adapter_name!r}: its output scale has zero entries, so the "
                             "rows they scaled are lost from the merged weight; reload the base weights instead")
        weight = tensors["weight"]
        return {"weight": self.weight_times(wide(weight), adapter_name, inverse=True).to(weight.dtype)}


class InputTransformConv(InputTransformLayer):
    """Around ``nn.Conv1d/2d/3d``: the kernel's rows (out, in / groups x k...) multiplied by ``M``,
    and the layer's own convolution run with them."""

    def transformed_size(self) -> int:
        return self.get_base_layer().weight[0].numel()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        if self.row_routing is not None:
            result = self.base_layer(x, *args, **kwargs)
            return self.apply_adapters(result, x, lambda _, rows, name: self._convolve(rows, [name]))
        adapters = self.adapters_to_apply()
        return self._convolve(x, adapters) if adapters else self.base_layer(x, *args, **kwargs)

    def _convolve(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """The convolution with its kernel multiplied by each adapter's ``M`` in turn (as merged in turn)."""
        conv = self.get_base_layer()
        weight = conv.weight
        for name in adapter_names:
            weight = self.weight_times(weight, name, in_forward=True)
        return conv._conv_forward(x, weight.to(conv.weight.dtype), conv.bias)

    def weight_times(self, weight: torch.Tensor, name: str, inverse: bool = False, in_forward: bool = False):
        rows = self.apply_map(weight.flatten(1), name, transpose=False, inverse=inverse, in_forward=in_forward)
        return self.scale_rows(rows.reshape(weight.shape), name, inverse)


def refuse_wrapped_convolution(target: nn.Module, base: nn.Module, layer_class: type, method: str, key: str) -> None:
    """The methods here run a convolution themselves, with its kernel changed: around another
    method's wrapper that would skip that adapter."""
    if isinstance(base, CONVOLUTIONS) and target is not base and not isinstance(target, layer_class):
        raise ValueError(
            f"cannot apply {method} to {key!r}: another method's wrapper is around the convolution, and {method} "
            "runs the convolution itself with a changed kernel, which would skip that adapter. Add the "
            f"{method} adapters to a convolution first, before any other method's (which may then wrap them)"
        )
