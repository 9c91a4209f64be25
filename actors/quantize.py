"""Group-wise asymmetric min-max quantisation, for Fate's lossy transfers (INT4 g64, INT2 g32).

``quantize_dequantize(t, bits, group)`` returns what the device would compute with after
de-quantising (same shape and dtype as ``t``) and the bytes the quantised form takes on the link:
``bits`` per weight plus a float16 scale and minimum per group of ``group`` weights along the
last dimension.
"""

from __future__ import annotations

import torch

PRECISIONS = {"full": None, "int4": (4, 64), "int2": (2, 32)}


def quantize_dequantize(t: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, int]:
    if t.shape[-1] % group:
        raise ValueError(f"last dimension {t.shape[-1]} is not a multiple of the group size {group}")
    levels = 2**bits - 1
    g = t.float().reshape(-1, group)  # [groups, group]
    lo = g.min(dim=1, keepdim=True).values
    scale = ((g.max(dim=1, keepdim=True).values - lo) / levels).clamp_min(1e-12)
    q = ((g - lo) / scale).round().clamp_(0, levels)
    deq = (q * scale.half().float() + lo.half().float()).reshape(t.shape).to(t.dtype)
    nbytes = t.numel() * bits // 8 + g.shape[0] * 2 * 2  # packed weights + fp16 scale and minimum
    return deq, nbytes


def expert_at(tensors: dict[str, torch.Tensor], precision: str) -> tuple[dict[str, torch.Tensor], int]:
    """One expert's tensors at ``precision`` ('full', 'int4', 'int2') and their bytes on the link.

    Tensors whose last dimension does not divide into groups (biases) stay full precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    spec = PRECISIONS[precision]
    out, nbytes = {}, 0
    for name, t in tensors.items():
        if spec is None or t.dim() < 2 or t.shape[-1] % spec[1]:
            out[name], n = t, t.numel() * t.element_size()
        else:
            out[name], n = quantize_dequantize(t, *spec)
        nbytes += n
    return out, nbytes
