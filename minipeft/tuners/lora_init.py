"""LoRA initialised from the base weight itself (PiSSA, OLoRA), and its conversion to plain LoRA;
also the orthogonal init, which leaves the base alone (``orthogonal_factors``).

Plain LoRA starts with ``B = 0``, so the update ``s B A`` is zero and the model is unchanged.
PiSSA (Meng et al. 2024) and OLoRA (Buyukakyuz 2024) instead start A and B on a dominant part
of the frozen weight ``W`` (out x in) and take that part out of ``W``, so that the layer still
computes the same function at initialisation:

    W_res = W - s B0 A0,        W_res + s B0 A0 = W        (the base layer keeps W_res)

PiSSA (``init_lora_weights="pissa"``): the singular value decomposition ``W = U S V^T``, singular
values descending; the top r directions become the adapter, split evenly between the factors:

    B0 = U_r sqrt(S_r / s)       (out, r)
    A0 = sqrt(S_r / s) V_r^T     (r, in)           so  s B0 A0 = U_r S_r V_r^T

``U_r S_r V_r^T`` is the best rank-r approximation of W (Eckart-Young), so training starts on
the principal directions and the residual keeps the rest. ``"pissa_niter_<n>"`` computes U_r,
S_r, V_r with ``torch.svd_lowrank`` (randomised SVD with n subspace iterations, Halko et al.
2011), far cheaper on large W but approximate and random (seed torch for a repeatable init);
W_res is computed from the factors actually kept, so the identity above holds either way.

OLoRA (``init_lora_weights="olora"``, any case): the QR decomposition ``W = Q R`` (Q: orthonormal
columns, R: upper triangular); the first r columns of Q and rows of R become the adapter:

    B0 = Q[:, :r]  (out, r),     A0 = R[:r]  (r, in)           so  s B0 A0 = s Q_r R_r

(not divided by s as PiSSA is: the part taken out of W is ``s Q_r R_r``, as in peft).

Numbers: the decomposition runs in float32, as in peft (a float64 weight, which peft refuses,
stays float64 here), and W_res is cast back to the weight's dtype, as in peft. The factors are kept in float32 beside a
half-precision base like every LoRA adapter here (``adapter_placement``); peft rounds them to the
base's dtype first, so on a bf16/fp16 base minipeft's A0, B0 are peft's plus that rounding.
Only linear layers are decomposed: ``nn.Linear`` and GPT-2's ``Conv1D`` (PiSSA decomposes its
stored (in, out) weight transposed, as peft does). OLoRA on a ``Conv1D`` is refused: peft 0.21
decomposes the stored matrix untransposed there, which gives factors of the wrong shapes.

Because the base now holds ``W_res``, the adapter only makes sense on that base: ``unload()`` and
``disable_adapter()`` give the residual model (as in peft), merging gives ``W_res + s B A``, the
fine-tuned weight. Loading a saved PiSSA/OLoRA adapter onto the original model decomposes W
again (from the saved config) before the trained A and B are copied in.

Conversion to plain LoRA (``save_pretrained(..., path_initial_model_for_weight_conversion=DIR)``)
-----------------------------------------------------------------------------------------------
DIR holds A0, B0, the adapter as saved right after initialisation; its config says either the
adapter's own init or True (peft's documented workflow sets init_lora_weights=True for that save,
so that loading DIR does not decompose again). DIR is only read: peft 0.21 also rewrites its
adapter_config.json, because it loads DIR back into the model to read A0, B0. After training,

    W_res + s B A  =  W + s (B A - B0 A0)

so on the original W the same layer is plain LoRA with the update ``s (B A - B0 A0)``, a
product of rank-2r factors:

    B A - B0 A0 = [B, -B0] [A; A0] = B' A'
    A' = cat([A, A0], dim=0)      (2r, in)
    B' = cat([B, -B0], dim=1)     (out, 2r)

The rank doubles, so lora_alpha is raised to keep ``s``: ``2 alpha / 2r = alpha / r`` (LoRA),
``sqrt(2) alpha / sqrt(2r) = alpha / sqrt(r)`` (rsLoRA); rank_pattern and alpha_pattern
likewise, and init_lora_weights becomes True (the base is not changed). peft writes the same
config, except that it refuses rsLoRA together with rank_pattern/alpha_pattern (it would double
alpha_pattern, which is wrong under rsLoRA; minipeft multiplies every alpha by sqrt(2) there).
Every other tensor of the adapter (a DoRA magnitude, a head trained whole, trained biases)
carries over unchanged: on the original base ``W + s B' A' = W_res + s B A`` row for row, so
DoRA's norms are the same. peft 0.21 keeps only the lora_A / lora_B tensors in a converted
checkpoint and so loses those (minipeft's strict load then refuses such a file of peft's, naming
the missing keys).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re

import torch

from ..config import PeftConfig, PeftType
from ..targeting import out_in_features

PISSA, OLORA, ORTHOGONAL = "pissa", "olora", "orthogonal"
LOFTQ = "loftq"  # the base weight quantized: lora_loftq.py
EVA = "eva"  # data-driven, after injection: lora_eva.py
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
# What LoraConfig.init_lora_weights accepts, for error messages.
INIT_CHOICES = ("True, False, 'gaussian', 'orthogonal', 'pissa', 'pissa_niter_<n>' (n >= 0 subspace iterations), "
                "'olora', 'loftq' or 'eva'")


def orthogonal_factors(r: int, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``init_lora_weights="orthogonal"``: A (r, in) and B (out, r), both random and non-zero,
    whose product is exactly zero, so the adapted model starts as the base one (as with B = 0)
    while both factors already receive gradients.

    Q, the Q of a random (r, r) matrix, has orthonormal rows; Q_o and Q_e are its odd and even
    ones (r/2 each), so Q_e Q_o^T = 0. With Gaussian G_A (in, r/2) and G_B (out, r/2):

        A = (G_A Q_o)^T / 10,   B = G_B Q_e / 10,   B A = G_B (Q_e Q_o^T) G_A^T / 100 = 0

    Drawn in peft's order and shapes (Q's matrix, then G_A, then G_B^T), so the same seed gives
    peft's factors. r must be even.
    """
    q, _ = torch.linalg.qr(torch.randn(r, r))
    q_odd, q_even = q[0::2], q[1::2]  # rows 0, 2, ... and 1, 3, ...: (r/2, r) each
    A = torch.randn(fan_in, r // 2).mm(q_odd).T / 10.0
    B = torch.randn(r // 2, fan_out).T.mm(q_even) / 10.0
    return A, B


def base_changing_init(init: bool | str) -> str | None:
    """``"pissa"``, ``"olora"`` or ``"loftq"`` when ``init_lora_weights`` asks for one of the
    initialisations that rewrite the base weight; None for the others (True, False, "gaussian",
    "orthogonal", "eva"). Spelled as peft accepts them: "pissa" / "pissa_niter_<n>" and "loftq"
    exactly, "olora" in any case."""
    if isinstance(init, str):
        if init == PISSA or _PISSA_NITER.fullmatch(init):
            return PISSA
        if init.lower() == OLORA:
            return OLORA
        if init == LOFTQ:
            return LOFTQ
    return None


def check_decomposable(init: str, key: str, weight: torch.Tensor, r: int, fan_in_fan_out: bool) -> None:
    """The errors ``decompose`` would meet on the weight of layer ``key``, raised before anything
    changes. ``weight``: as the layer stores it ((in, out) when ``fan_in_fan_out``)."""
    method = base_changing_init(init)
    if method == LOFTQ and fan_in_fan_out:
        raise ValueError(f"init_lora_weights='loftq' on {key!r}, a GPT-2 Conv1D: LoftQ is for nn.Linear layers, as "
                         "in peft (whose LoftQ gives a Conv1D factors of the wrong shapes); target nn.Linear layers")
    if method == LOFTQ and weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) and weight.is_floating_point():
        raise TypeError(f"init_lora_weights='loftq' on {key!r}, whose weight is {weight.dtype}: bitsandbytes quantizes "
                        "float32, float16 and bfloat16 weights; cast the model to one of them first")
    if method == LOFTQ and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("init_lora_weights='loftq' quantizes the base weights as bitsandbytes stores them, and "
                          "bitsandbytes is not installed: pip install bitsandbytes")
    if method == OLORA and fan_in_fan_out:
        raise ValueError(
            f"init_lora_weights={init!r} on {key!r}, a GPT-2 Conv1D (weight stored as (in, out)): peft 0.21 runs "
            "OLoRA's QR on the stored matrix there, which gives A and B of the wrong shapes, so minipeft refuses "
            "rather than write an adapter peft cannot load. Use init_lora_weights='pissa' (which handles Conv1D) "
            "or target nn.Linear layers"
        )
    if not weight.is_floating_point():
        raise TypeError(
            f"init_lora_weights={init!r} decomposes the weight of {key!r}, which is {weight.dtype}; PiSSA/OLoRA/LoftQ need "
            "a floating-point weight (float32, float16 or bfloat16): initialise in full precision and quantise the "
            "residual model afterwards"
        )
    out_features, in_features = out_in_features(weight, fan_in_fan_out)
    if r > min(out_features, in_features):
        what = "columns of Q" if method == OLORA else "singular directions"
        raise ValueError(
            f"init_lora_weights={init!r} takes the top r {what} of {key!r}'s ({out_features} x {in_features}) weight, "
            f"which has at most {min(out_features, in_features)}; r={r} is more. Lower r, or give this module its "
            "own rank in rank_pattern"
        )


@torch.no_grad()
def decompose(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's or OLoRA's initial factors ``(A0 (r, in), B0 (out, r))`` of ``weight`` (out, in),
    computed in float32 or better (see the module docstring for the math)."""
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
    if base_changing_init(init) == OLORA:
        Q, R = torch.linalg.qr(weight)  # Q (out, k), R (k, in), k = min(out, in)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    niter = _PISSA_NITER.fullmatch(init)
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=int(niter.group(1)))  # weight ~ U diag(S) V^T
        Vh = V.T
    root = (S / scaling).sqrt()  # (r,): the singular values, shared between the factors
    return root[:, None] * Vh, U * root


@torch.no_grad()
def residual(weight: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W - s B0 A0`` in float32 or better (``weight``: (out, in)); the caller casts it back.
    (s B0) A0 is the order peft computes it in, so that the two agree to the last bit."""
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
    return weight - (scaling * B0.to(weight.dtype)) @ A0.to(weight.dtype)


# -- conversion to plain LoRA -----------------------------------------------------------------------
# Scaling fields: an initial adapter with other values made B0 A0 for another s.
SCALING_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


def convert_to_lora(
    config: PeftConfig,
    tensors: dict[str, torch.Tensor],
    initial_config: PeftConfig,
    initial_tensors: dict[str, torch.Tensor],
    source: str = "the initial adapter",
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """A trained PiSSA/OLoRA adapter (``config``, ``tensors``: checkpoint keys, as saved) as the
    plain LoRA adapter that computes the same on the original base weights, given the adapter as
    it was at initialisation (``initial_config``, ``initial_tensors``, read from ``source``).
    Checks that the two belong together first; returns new objects, the inputs are unchanged."""
    check_convertible(config)
    _check_initial_adapter(config, tensors, initial_config, initial_tensors, source)
    return converted_config(config), converted_tensors(tensors, initial_tensors)


def check_convertible(config: PeftConfig) -> None:
    """A ValueError unless ``config`` is a LoRA adapter whose initialisation changed the base
    weights (PiSSA / OLoRA): only those need, and allow, conversion."""
    if config.peft_type == PeftType.LORA and base_changing_init(config.init_lora_weights) == LOFTQ:
        raise ValueError("path_initial_model_for_weight_conversion converts a PiSSA/OLoRA adapter, whose base holds "
                         "W - s B0 A0; a LoftQ adapter's base holds the quantized weight, which is no low-rank update "
                         "away from W: save it as it is, and load it with its base (from_pretrained quantizes it again)")
    if config.peft_type == PeftType.LORA and base_changing_init(config.init_lora_weights):
        return
    init = getattr(config, "init_lora_weights", None)
    hint = (
        " If you set init_lora_weights=True on the config to save the initial adapter (peft's workflow), set it back "
        "to the PiSSA/OLoRA value before saving the trained one."
        if init is True
        else ""
    )
    raise ValueError(
        "path_initial_model_for_weight_conversion converts a PiSSA/OLoRA adapter (init_lora_weights 'pissa', "
        f"'pissa_niter_<n>' or 'olora'), whose base weights hold the residual; this one is {config.peft_type.value} "
        f"with init_lora_weights={init!r}, which leaves the base weights as they were, so it needs no conversion: "
        f"save it without that argument.{hint}"
    )


def converted_config(config: PeftConfig) -> PeftConfig:
    """``config`` for rank-2r factors with the same scaling, initialised as plain LoRA."""
    new = copy.deepcopy(config)
    # scaling = alpha / r (or alpha / sqrt(r)): doubling r needs alpha times 2 (or sqrt(2)).
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    new.r = 2 * config.r
    new.lora_alpha = config.lora_alpha * alpha_factor
    new.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    new.alpha_pattern = {k: v * alpha_factor for k, v in config.alpha_pattern.items()}
    new.init_lora_weights = True
    return new


def converted_tensors(tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A' = [A; A0], B' = [B, -B0] for every factor; every other tensor as it is."""
    out = {}
    for key, value in tensors.items():
        kind = factor_kind(key)
        if kind == "A":
            out[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0)  # (2r, in)
        elif kind == "B":
            out[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1)  # (out, 2r)
        else:
            out[key] = value
    return out


def factor_kind(key: str) -> str | None:
    """``"A"`` / ``"B"`` for a checkpoint key of a LoRA factor (``...lora_A.weight``), else None."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return parts[-2][-1]
    return None


def _check_initial_adapter(config, tensors, initial_config, initial_tensors, source: str) -> None:
    """ValueErrors for every way the initial adapter read from ``source`` does not belong to this one."""
    what = f"{source} (path_initial_model_for_weight_conversion)"
    if initial_config.peft_type != PeftType.LORA:
        raise ValueError(f"{what} holds a {initial_config.peft_type.value} adapter, not the initial LoRA adapter")
    init = initial_config.init_lora_weights  # True when saved as peft's workflow says, else the same init
    if init is not True and str(init).lower() != config.init_lora_weights.lower():
        raise ValueError(
            f"{what} holds an adapter initialised with init_lora_weights={init!r}, but this adapter was initialised "
            f"with {config.init_lora_weights!r}; give the folder saved right after this adapter was initialised"
        )
    differ = [f for f in SCALING_FIELDS if getattr(initial_config, f) != getattr(config, f)]
    if differ:
        detail = ", ".join(f"{f}={getattr(initial_config, f)!r} there, {getattr(config, f)!r} here" for f in differ)
        raise ValueError(f"{what} was saved with another rank or scaling than this adapter ({detail})")
    factors = sorted(k for k in tensors if factor_kind(k))
    initial_factors = sorted(k for k in initial_tensors if factor_kind(k))
    if factors != initial_factors:
        missing = [k for k in factors if k not in initial_tensors]
        extra = [k for k in initial_factors if k not in tensors]
        raise ValueError(
            f"{what} has other LoRA layers than this adapter (missing there: {missing[:3]}, only there: {extra[:3]}); "
            "give the folder saved right after this adapter was initialised"
        )
    for key in factors:
        if initial_tensors[key].shape != tensors[key].shape:
            raise ValueError(
                f"{what}: {key!r} has shape {tuple(initial_tensors[key].shape)} there and "
                f"{tuple(tensors[key].shape)} here; give the folder saved right after this adapter was initialised"
            )
    if all(not initial_tensors[k].any() for k in factors if factor_kind(k) == "B"):
        raise ValueError(
            f"{what}: every lora_B there is zero, which is plain LoRA's initialisation, not PiSSA's or OLoRA's "
            "(whose B0 holds part of W); it was not saved from this adapter right after initialisation"
        )
