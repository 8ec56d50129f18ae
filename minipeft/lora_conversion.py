"""Any adapter that merges into its weights, as a LoRA (peft's ``convert_to_lora`` / ``save_as_lora``).

An adapter layer that can be merged changes its base weight from W to W' (and, for some, the
bias from b to b'). The change ``ΔW = W' - W`` is a matrix like any other, and its singular
value decomposition ``ΔW = U S V^T`` (singular values descending) gives the best approximation
of rank k in the Frobenius norm (Eckart-Young), ``U_k S_k V_k^T``. As a LoRA with scaling 1
(lora_alpha = r):

    B = U_k S_k   (out, k),      A = V_k^T   (k, in),      B A = U_k S_k V_k^T

So LoHa, LoKr, VeRA, FourierFT, C3A, MiSS, a DoRA or any other LoRA, and also the adapters that
transform W rather than add to it (OFT, BOFT, HRA, (IA)^3, RoAd: ΔW then holds W, and the LoRA
serves this base model alone) become plain LoRA: for tools that read LoRA only, for mixed
batches, or to lower a rank. ``rank``: an int k for every layer, or a float t in (0, 1] for the
smallest k per layer whose singular values hold a fraction t of ΔW's energy ``sum S_i^2``
(peft's rule; the ranks then differ per layer). With ``rank=1.0`` the LoRA computes what the
adapter did, up to rounding, at each update's full rank (rounding leaves tiny singular values
where the update has none: a float just below 1 drops them).

Layers: linear ones (nn.Linear, GPT-2's Conv1D), embeddings and ungrouped convolutions, the
layouts LoRA itself adapts (as matrices: a conv kernel (out, in, k...) as (out, in * k...), an
embedding's update as its (dim, num_embeddings) transpose, as ``LoraLayer.lora_factors``). A
changed bias becomes lora_B's bias (``lora_bias=True``). Modules trained whole
(``modules_to_save``) and a LoRA's ``trainable_token_indices`` are carried over as they are.
(peft converts linear layers alone, and refuses a changed bias; its LoRA cannot load every
convolution minipeft's can, a dilated one for instance.)
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from .checkpoint import adapter_key_map, write_adapters
from .config import default_and_pattern
from .injection import adapter_layers
from .model import PeftModel
from .targeting import CONVOLUTIONS, is_gpt2_conv1d, logical_name
from .tuners.base import AdapterLayer, TrainedCopies, wide
from .tuners.lora import LoraConfig
from .tuners.trainable_tokens import TrainableTokensLayer


def convert_to_lora(model: nn.Module, rank: int | float, adapter_name: str = "default"
                    ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """``(LoraConfig, state_dict)`` of a LoRA approximating adapter ``adapter_name`` of ``model`` (a
    PeftModel) at rank ``rank`` (module docstring); the state dict is keyed as a checkpoint of
    it is. Reads the model, changes nothing."""
    _check_rank(rank)
    if not isinstance(model, PeftModel):
        raise TypeError(f"convert_to_lora takes a PeftModel, got {type(model).__name__}: the adapter's config says "
                        "which modules it trains whole and which biases, which the LoRA must carry")
    source = model.peft_config.get(adapter_name)
    if source is None:
        raise ValueError(f"no adapter {adapter_name!r} to convert; the model holds {sorted(model.peft_config)}")
    if source.is_prompt_learning:
        raise TypeError(f"adapter {adapter_name!r} is {source.peft_type.value}: virtual tokens beside the model change "
                        "no weight, so there is no update for a LoRA to approximate")
    if getattr(source, "bias", "none") != "none":
        raise ValueError(f"adapter {adapter_name!r} trains the base model's biases (bias={source.bias!r}), which a "
                         "LoRA checkpoint would carry as another option; convert an adapter trained with bias='none'")
    base = model.get_base_model()
    layers = [(name, layer) for name, layer in adapter_layers(base) if adapter_name in layer.adapter_names]
    carried = [layer for _, layer in layers if _is_carried(layer, source)]
    converted = [(logical_name(base, name) or name, layer) for name, layer in layers if not _is_carried(layer, source)]
    around = _wrappers_by_base(base)
    refused = [f"{key!r} ({why})" for key, layer in converted if (why := _why_not(layer, adapter_name, around))]
    if refused:
        raise TypeError(f"cannot convert adapter {adapter_name!r} to LoRA: {', '.join(refused[:5])}"
                        f"{' ...' if len(refused) > 5 else ''}. LoRA takes the update of a layer that merges into "
                        "the weight of a linear layer, an embedding or an ungrouped convolution")
    if not converted:
        raise ValueError(f"adapter {adapter_name!r} has no layer to convert, only modules it trains whole or tokens")

    factors, too_high = {}, []  # key -> (base, A, B, Δb or None)
    for key, layer in converted:
        delta, bias = _update(layer, adapter_name)
        U, S, Vh = torch.linalg.svd(_as_rows(layer.get_base_layer(), delta), full_matrices=False)
        k = rank if isinstance(rank, int) else _energy_rank(S, rank)
        if k > S.numel():
            too_high.append(f"{key!r} (full rank {S.numel()})")
            continue
        factors[key] = (layer.get_base_layer(), Vh[:k], U[:, :k] * S[:k], bias)  # A (k, fan_in), B (fan_out, k)
    if too_high:
        raise ValueError(f"rank={rank} is above the full rank of {', '.join(too_high[:5])}"
                         f"{' ...' if len(too_high) > 5 else ''}: give a lower rank, or a float for an energy fraction")
    # A changed bias is lora_B's bias, which lora_bias gives every layer (zero where it did not change).
    lora_bias = any(bias is not None for *_, bias in factors.values())
    embeddings = [key for key, (base, *_) in factors.items() if isinstance(base, nn.Embedding)]
    if lora_bias and embeddings:
        raise ValueError(f"adapter {adapter_name!r} changes biases, which LoRA holds with lora_bias=True, which LoRA "
                         f"refuses on embeddings, and it adapts {embeddings[:3]}: convert it in two adapters")
    tensors = {}
    for key, (layer_base, A, B, bias) in factors.items():
        if lora_bias and bias is None:
            bias = B.new_zeros(B.shape[0])
        tensors.update(_lora_tensors("base_model.model." + key, layer_base, A, B, bias))  # (a PeftModel's keys)
    tensors.update(_carried_tensors(model, adapter_name, carried))
    ranks = {key: A.shape[0] for key, (_, A, _, _) in factors.items()}

    r, rank_pattern = default_and_pattern(ranks)
    config = LoraConfig(
        r=r, lora_alpha=r, rank_pattern=rank_pattern, alpha_pattern=dict(rank_pattern),  # scaling alpha / r = 1
        target_modules=_exact_targets(sorted(ranks), base),
        lora_bias=lora_bias,
        fan_in_fan_out=any(is_gpt2_conv1d(layer.get_base_layer()) for _, layer in converted),
        modules_to_save=getattr(source, "modules_to_save", None),
        trainable_token_indices=getattr(source, "trainable_token_indices", None),  # (LoRA's alone)
        task_type=source.task_type,
        base_model_name_or_path=source.base_model_name_or_path,
    )
    return config, tensors


def save_as_lora(path: str | os.PathLike, model: nn.Module, rank: int | float, adapter_name: str = "default") -> None:
    """``convert_to_lora``, saved as an adapter checkpoint in the folder ``path`` (both files
    written whole before either replaces a previous one), which ``PeftModel.from_pretrained``
    loads."""
    config, tensors = convert_to_lora(model, rank, adapter_name)
    write_adapters([(path, config, tensors)])


def _exact_targets(names: list[str], model: nn.Module) -> list[str] | str:
    """target_modules selecting ``names`` and no other module: the list of them, unless an entry
    would also match another module's name (a list entry matches names ending in "." + it),
    then the regex of them all, which matches whole names."""
    everything = {n for name, _ in model.named_modules() if (n := logical_name(model, name))}
    chosen = set(names)
    if any(other not in chosen and other.endswith("." + name) for name in names for other in everything):
        return "|".join(re.escape(name) for name in names)
    return names


def _check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"rank is an int (the LoRA's rank) or a float in (0, 1] (an energy fraction), got {rank!r}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"rank is at least 1, got {rank}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"a float rank is the fraction of each update's energy to keep, in (0, 1]; got {rank}")


def _is_carried(layer: AdapterLayer, source) -> bool:
    """Modules trained whole, and a LoRA's trained tokens: LoRA has them too, as they are."""
    return isinstance(layer, TrainedCopies) or (
        isinstance(layer, TrainableTokensLayer) and getattr(source, "trainable_token_indices", None) is not None)


def _why_not(layer: AdapterLayer, adapter_name: str, around: dict[int, list[AdapterLayer]]) -> str | None:
    """Why ``layer``'s adapter has no LoRA form here, or None. ``around``: every adapter wrapper
    of the model by the id of the base layer it wraps (``_wrappers_by_base``)."""
    base = layer.get_base_layer()
    if isinstance(layer, TrainableTokensLayer):
        return "trained tokens, which a LoRA carries as its trainable_token_indices: convert the LoRA they came with"
    if not (layer.mergeable and layer.folds_into_weight):
        return f"{type(layer).__name__} does not merge into a weight"
    if not (isinstance(base, (nn.Linear, nn.Embedding)) or is_gpt2_conv1d(base)
            or (isinstance(base, CONVOLUTIONS) and base.groups == 1)):
        return f"its base is a {type(base).__name__}" + (f" with groups={base.groups}" if hasattr(base, "groups") else "")
    # Another wrapper's merged adapter is in the base weight too, and so it would be in this update.
    merged_beside = [name for other in around[id(base)] if other is not layer for name in other.merged_adapters]
    if merged_beside:
        return f"adapter(s) {merged_beside} of another wrapper are merged into its weight: unmerge_adapter() first"
    return layer.merge_blocker(adapter_name)


def _wrappers_by_base(model: nn.Module) -> dict[int, list[AdapterLayer]]:
    """Every adapter wrapper of ``model`` by the id of the base layer it wraps (nested wrappers
    of several methods share one)."""
    found: dict[int, list[AdapterLayer]] = {}
    for _, layer in adapter_layers(model):
        found.setdefault(id(layer.get_base_layer()), []).append(layer)
    return found


def _update(layer: AdapterLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ΔW, Δb or None) of the adapter, in at least fp32: merged into widened copies of the base
    tensors as they were before any merge, so that nothing rounds to the weight's dtype."""
    before = {name: wide(t) for name, t in layer.unmerged_base_tensors().items()}
    after, _ = layer.merged_tensors(adapter_name, before)
    bias = after["bias"] - before["bias"] if "bias" in after else None
    return after["weight"] - before["weight"], bias


def _as_rows(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """``delta``, stored as ``base`` stores its weight, as the matrix LoRA's B A approximates."""
    if isinstance(base, nn.Embedding) or is_gpt2_conv1d(base):
        return delta.T  # (dim, num_embeddings); Conv1D stores (in, out)
    return delta.flatten(1)  # (out, in), a convolution's (out, in * k...)


def _lora_tensors(key: str, base: nn.Module, A: torch.Tensor, B: torch.Tensor,
                  bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """LoRA's checkpoint tensors for the module named ``key``: A (k, fan_in) and B (fan_out, k)
    shaped as LoRA's parameters for ``base`` are (``tuners/lora.py``)."""
    if isinstance(base, nn.Embedding):
        return {f"{key}.lora_embedding_A": A.contiguous(), f"{key}.lora_embedding_B": B.contiguous()}
    if isinstance(base, CONVOLUTIONS):  # A: a conv with the base's kernel, B: a 1x1 conv
        A = A.reshape(A.shape[0], *base.weight.shape[1:])
        B = B.reshape(*B.shape, *(1,) * (base.weight.dim() - 2))
    tensors = {f"{key}.lora_A.weight": A.contiguous(), f"{key}.lora_B.weight": B.contiguous()}
    if bias is not None:
        tensors[f"{key}.lora_B.bias"] = bias
    return tensors


def _energy_rank(S: torch.Tensor, fraction: float) -> int:
    """The smallest k whose first k singular values hold ``fraction`` of ``sum S_i^2``."""
    energy = torch.cumsum(S.double() ** 2, dim=0)
    k = int(torch.searchsorted(energy, fraction * energy[-1])) + 1
    return min(k, S.numel())


def _carried_tensors(model: nn.Module, adapter_name: str, carried: list[AdapterLayer]) -> dict[str, torch.Tensor]:
    """The carried layers' tensors under the keys they are saved under, which LoRA's checkpoint shares."""
    wanted = {id(p) for layer in carried for p in layer.adapter_parameters(adapter_name)}
    state = model.state_dict(keep_vars=True)
    return {ckpt: state[key].detach() for ckpt, key in adapter_key_map(model, adapter_name).items()
            if id(state[key]) in wanted}
