"""Fused Triton kernels for the LoRA hot path (filled by the kernels issue)."""
