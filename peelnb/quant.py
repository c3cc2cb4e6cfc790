"""Weight quantizers of DESIGN.md §4 and the straight-through linear layer.

One piece of code serves quantization-aware training of a model and the
references of a peel. Weights are ``(..., out, in)`` tensors: any leading
dimensions are independent matrices (peelnb stacks many references of one
layer that way), "per output row" reduces over the last dimension and "per
tensor" over the last two. Scales are computed in float32.

| bits | map | scale |
|---|---|---|
| 1 | sign(w) * mean(abs(w)), sign(0) = +1 | per output row |
| 1.58 | round(w / s) clipped to {-1, 0, 1}, times s = max(mean(abs(w)), 1e-5) | per tensor (BitNet b1.58) |
| 2, 3, 4, 8 | round(w / s) clipped to +-(2^(b-1) - 1), times s = max(abs(w)) / (2^(b-1) - 1) | per output row |
| 32 | unchanged | - |

BitNet's ternary scale is not a fixed point: quantizing a ternary matrix again
keeps its pattern of -1, 0, +1 but shrinks the scale to the share of non-zero
entries. Splice quantized weights into a layer whose quantizer is off
(``bits=32``), never re-quantize them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import check_bits

FULL_PRECISION = 32.0
TERNARY = 1.58
TERNARY_MIN_SCALE = 1e-5


def levels(bits: float) -> int:
    """Number of distinct quantized values one scale group can take.

    Examples
    --------
    >>> levels(1), levels(1.58), levels(4)
    (2, 3, 15)
    """
    bits = check_bits(bits)
    if bits == 1.0:
        return 2
    if bits == TERNARY:
        return 3
    if bits == FULL_PRECISION:
        raise ValueError("full precision (bits=32) has no finite set of levels")
    return 2 * (2 ** (int(bits) - 1) - 1) + 1


def quantize(weight: Tensor, bits: float) -> Tensor:
    """Round-to-nearest quantize ``weight`` to ``bits`` (no gradient trick).

    Parameters
    ----------
    weight : Tensor
        ``(..., out, in)`` weights; leading dimensions are separate matrices.
    bits : float
        One of 1, 1.58, 2, 3, 4, 8, 32.

    Returns
    -------
    Tensor
        Dequantized weights, same shape and dtype as ``weight``.

    Examples
    --------
    >>> quantize(torch.tensor([[0.3, -0.1, 0.0]]), 1)
    tensor([[ 0.1333, -0.1333,  0.1333]])
    """
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return weight
    if weight.dim() < 2:
        raise ValueError(f"quantize expects (..., out, in) weights, got shape {tuple(weight.shape)}")
    w = weight.float()
    if bits == 1.0:
        scale = w.abs().mean(dim=-1, keepdim=True)
        q = torch.where(w >= 0, scale, -scale)
    elif bits == TERNARY:
        scale = w.abs().mean(dim=(-2, -1), keepdim=True).clamp_min_(TERNARY_MIN_SCALE)
        q = torch.div(w, scale).round_().clamp_(-1, 1).mul_(scale)
    else:
        qmax = 2 ** (int(bits) - 1) - 1
        scale = w.abs().amax(dim=-1, keepdim=True).div_(qmax)
        safe = torch.where(scale > 0, scale, 1.0)
        q = torch.div(w, safe).round_().clamp_(-qmax, qmax).mul_(scale)
    return q.to(weight.dtype)


class _StraightThrough(torch.autograd.Function):
    """Quantize groups of stacked matrices in the forward pass; identity gradient."""

    @staticmethod
    def forward(ctx, weight: Tensor, groups: tuple[tuple[int, int, float], ...]) -> Tensor:  # noqa: ANN001
        out = torch.empty_like(weight)
        for start, stop, bits in groups:
            out[start:stop] = quantize(weight[start:stop], bits)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return grad, None


def fake_quantize(weight: Tensor, bits: float) -> Tensor:
    """Quantize in the forward pass, pass gradients straight through.

    The value equals ``quantize(weight, bits)``; the gradient with respect to
    ``weight`` is the identity (straight-through estimator).
    """
    if check_bits(bits) == FULL_PRECISION:
        return weight
    return _StraightThrough.apply(weight, ((0, len(weight), bits),))


def fake_quantize_groups(weight: Tensor, groups: tuple[tuple[int, int, float], ...]) -> Tensor:
    """`fake_quantize` of stacked matrices, ``weight[start:stop]`` at ``bits`` for each group.

    ``weight`` is ``(R, out, in)``; ``groups`` are ``(start, stop, bits)``
    slices of the leading dimension covering it. One autograd node, no copies
    of the gradient.
    """
    if all(check_bits(bits) == FULL_PRECISION for _, _, bits in groups):
        return weight
    return _StraightThrough.apply(weight, tuple(groups))


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose weight is fake-quantized to ``bits`` in every forward.

    The stored weight stays in full precision (the latent weight of
    quantization-aware training); ``bits=32`` makes it a plain linear layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: float = FULL_PRECISION) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.bits = check_bits(bits)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, fake_quantize(self.weight, self.bits), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits:g}"
