"""Property tests of the quantizers of DESIGN.md §4 (peelnb.quant)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from peelnb import quant
from peelnb.config import BITS

QUANT_BITS = [b for b in BITS if b != 32.0]
ROW_BITS = [b for b in QUANT_BITS if b != 1.58]  # scale per output row
UNIFORM_BITS = [b for b in ROW_BITS if b != 1.0]
PROPERTY = settings(max_examples=12, deadline=None)

# ---------------------------------------------------------------- helpers

_MAGNITUDES = st.floats(float(np.float32(1e-3)), 1e3, width=32, allow_subnormal=False)
_NONZERO = st.tuples(_MAGNITUDES, st.booleans()).map(lambda m: -m[0] if m[1] else m[0])


def _weights(*, zeros: bool = True, max_dims: int = 2) -> st.SearchStrategy[torch.Tensor]:
    """``(..., out, in)`` float32 weights; magnitudes in [1e-3, 1e3], optionally exact zeros."""
    elements = st.one_of(st.just(0.0), _NONZERO) if zeros else _NONZERO
    shapes = hnp.array_shapes(min_dims=2, max_dims=max_dims, min_side=1, max_side=6)
    return hnp.arrays(np.float32, shapes, elements=elements).map(torch.from_numpy)


def _qmax(bits: float) -> int:
    return 2 ** (int(bits) - 1) - 1


def codes(q: torch.Tensor, bits: float) -> torch.Tensor:
    """Integer codes of ``q`` under the map of DESIGN.md §4, computed independently of peelnb."""
    w = q.double()
    if bits == 1.0:
        return torch.where(w >= 0, 1, -1)
    if bits == 1.58:
        scale = w.abs().mean(dim=(-2, -1), keepdim=True).clamp_min(1e-5)
        return (w / scale).round().clamp(-1, 1).long()
    qmax = _qmax(bits)
    scale = w.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale).round().clamp(-qmax, qmax).long()


def _groups(q: torch.Tensor, bits: float) -> list[torch.Tensor]:
    """The scale groups of ``q``: each output row, or each whole matrix for ternary."""
    if bits == 1.58:
        return list(q.reshape(-1, q.shape[-2] * q.shape[-1]))
    return list(q.reshape(-1, q.shape[-1]))


# ---------------------------------------------------------------- levels


def test_levels_match_the_bit_width():
    assert [quant.levels(b) for b in QUANT_BITS] == [2, 3, 3, 7, 15, 255]


def test_levels_of_full_precision_is_an_error():
    with pytest.raises(ValueError, match="full precision"):
        quant.levels(32)


# ---------------------------------------------------------------- value sets


@pytest.mark.parametrize("bits", QUANT_BITS)
@PROPERTY
@given(w=_weights(max_dims=3))
def test_each_scale_group_takes_at_most_levels_distinct_values(bits, w):
    q = quant.quantize(w, bits)
    assert q.shape == w.shape and q.dtype == w.dtype
    for group in _groups(q, bits):
        assert len(torch.unique(group)) <= quant.levels(bits)


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_a_spread_row_uses_every_level(bits):
    w = torch.linspace(-1, 1, 1001).reshape(1, -1)
    q = quant.quantize(w, bits)
    assert len(torch.unique(q)) == quant.levels(bits)


# ---------------------------------------------------------------- symmetry


@pytest.mark.parametrize("bits", QUANT_BITS)
@PROPERTY
@given(w=_weights(zeros=False, max_dims=3))
def test_quantize_is_odd_for_weights_without_zeros(bits, w):
    assert torch.equal(quant.quantize(-w, bits), -quant.quantize(w, bits))


def test_binary_maps_zero_to_plus_scale():
    w = torch.tensor([[0.0, -0.3, 0.6], [0.0, 0.0, 0.0]])
    q = quant.quantize(w, 1)
    assert torch.allclose(q, torch.tensor([[0.3, -0.3, 0.3], [0.0, 0.0, 0.0]]))
    # the sign of zero is +1 whatever the sign bit of the float
    assert torch.equal(quant.quantize(torch.tensor([[-0.0, -1.0]]), 1), torch.tensor([[0.5, -0.5]]))


# ---------------------------------------------------------------- idempotence


@pytest.mark.parametrize("bits", ROW_BITS)
@PROPERTY
@given(w=_weights(max_dims=3))
def test_requantizing_a_row_quantized_tensor_changes_nothing(bits, w):
    q1 = quant.quantize(w, bits)
    q2 = quant.quantize(q1, bits)
    assert torch.allclose(q2, q1, rtol=1e-5, atol=0)
    assert torch.equal(codes(q2, bits), codes(q1, bits))
    assert torch.equal(codes(q1, bits), codes(w, bits))


@PROPERTY
@given(w=_weights(max_dims=3))
def test_requantizing_ternary_keeps_the_pattern_with_one_new_scale(w):
    q1 = quant.quantize(w, 1.58)
    q2 = quant.quantize(q1, 1.58)
    pattern = codes(q1, 1.58)
    assert torch.equal(codes(q2, 1.58), pattern)
    assert torch.equal(pattern, codes(w, 1.58))
    scale = q1.abs().double().mean(dim=(-2, -1), keepdim=True).clamp_min(1e-5)
    assert torch.allclose(q2.double(), scale * pattern, rtol=1e-5, atol=0)


def test_ternary_scale_shrinks_to_the_share_of_non_zero_entries():
    w = torch.tensor([[1.0, -1.0, 0.0, 0.0]])  # scale 0.5: pattern [1, -1, 0, 0]
    q1 = quant.quantize(w, 1.58)
    assert torch.allclose(q1, torch.tensor([[0.5, -0.5, 0.0, 0.0]]))
    q2 = quant.quantize(q1, 1.58)
    assert torch.allclose(q2, torch.tensor([[0.25, -0.25, 0.0, 0.0]]))


# ---------------------------------------------------------------- scales


@PROPERTY
@given(w=_weights(max_dims=3))
def test_binary_magnitude_is_the_rows_mean_absolute_weight(w):
    q = quant.quantize(w, 1)
    mean = w.double().abs().mean(dim=-1, keepdim=True).expand_as(q)
    assert torch.allclose(q.abs().double(), mean, rtol=1e-5, atol=0)


@PROPERTY
@given(w=_weights(max_dims=3))
def test_ternary_non_zero_magnitude_is_the_tensors_mean_absolute_weight(w):
    q = quant.quantize(w, 1.58)
    scale = w.double().abs().mean(dim=(-2, -1), keepdim=True).clamp_min(1e-5).expand_as(q)
    nonzero = q != 0
    assert torch.allclose(q.abs().double()[nonzero], scale[nonzero], rtol=1e-5, atol=0)


def test_ternary_scale_has_a_floor_of_1e_minus_5():
    w = torch.tensor([[6e-6, -6e-6, 1e-7, 0.0]])  # mean |w| = 3e-6 < 1e-5
    q = quant.quantize(w, 1.58)
    assert torch.allclose(q, torch.tensor([[1e-5, -1e-5, 0.0, 0.0]]), rtol=1e-5, atol=0)


def test_ternary_scale_is_shared_by_all_rows_of_a_matrix():
    w = torch.tensor([[4.0, 4.0], [0.4, -0.4]])  # mean |w| = 2.2 over the whole tensor
    q = quant.quantize(w, 1.58)
    assert torch.allclose(q, torch.tensor([[2.2, 2.2], [0.0, 0.0]]))


@pytest.mark.parametrize("bits", UNIFORM_BITS)
@PROPERTY
@given(w=_weights(max_dims=3))
def test_uniform_row_maximum_is_kept(bits, w):
    q = quant.quantize(w, bits)
    assert torch.allclose(q.abs().amax(dim=-1).double(), w.abs().amax(dim=-1).double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bits", UNIFORM_BITS)
def test_uniform_values_are_integer_multiples_of_the_row_step(bits):
    qmax = _qmax(bits)
    w = torch.tensor([[1.0, 0.49 / qmax, 0.51 / qmax, -0.3], [-2.0, 0.0, 0.9, 2.0]])
    q = quant.quantize(w, bits)
    expected = torch.stack(
        [
            torch.round(w[0] * qmax).clamp(-qmax, qmax) / qmax,
            torch.round(w[1] * qmax / 2).clamp(-qmax, qmax) * 2 / qmax,
        ]
    )
    assert torch.allclose(q, expected, rtol=1e-6, atol=1e-7)
    assert q[0, 1] == 0 and q[0, 2] == pytest.approx(1 / qmax)


@pytest.mark.parametrize("bits", UNIFORM_BITS)
def test_uniform_all_zero_row_stays_zero(bits):
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]])
    q = quant.quantize(w, bits)
    assert torch.equal(q[0], torch.zeros(3))
    assert torch.isfinite(q).all()


# ---------------------------------------------------------------- stacks


@pytest.mark.parametrize("bits", QUANT_BITS)
@PROPERTY
@given(w=_weights(max_dims=4))
def test_leading_dimensions_are_independent_matrices(bits, w):
    q = quant.quantize(w, bits)
    flat_w = w.reshape(-1, *w.shape[-2:])
    flat_q = q.reshape(-1, *w.shape[-2:])
    for wi, qi in zip(flat_w, flat_q):
        assert torch.equal(qi, quant.quantize(wi, bits))


def test_ternary_stack_does_not_share_its_scale_across_matrices():
    w = torch.stack([torch.full((2, 2), 10.0), torch.full((2, 2), 0.1)])
    q = quant.quantize(w, 1.58)
    assert torch.allclose(q[0], torch.full((2, 2), 10.0))
    assert torch.allclose(q[1], torch.full((2, 2), 0.1))


def test_quantize_rejects_vectors():
    with pytest.raises(ValueError, match="out, in"):
        quant.quantize(torch.ones(3), 4)


# ---------------------------------------------------------------- straight-through


@pytest.mark.parametrize("bits", BITS)
@PROPERTY
@given(w=_weights(max_dims=3), seed=st.integers(0, 2**16))
def test_fake_quantize_has_the_value_of_quantize_and_an_identity_gradient(bits, w, seed):
    weight = w.clone().requires_grad_(True)
    out = quant.fake_quantize(weight, bits)
    assert torch.equal(out.detach(), quant.quantize(w, bits))
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
    (out * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream)


def test_fake_quantize_groups_equals_quantizing_each_slice():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(7, 4, 5, generator=generator)
    groups = ((0, 2, 1.0), (2, 3, 1.58), (3, 5, 4.0), (5, 6, 32.0), (6, 7, 8.0))
    weight = w.clone().requires_grad_(True)
    out = quant.fake_quantize_groups(weight, groups)
    for start, stop, bits in groups:
        assert torch.equal(out[start:stop].detach(), quant.quantize(w[start:stop], bits)), bits
    upstream = torch.randn(w.shape, generator=generator)
    (out * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream)


def test_fake_quantize_groups_ternary_scale_is_per_matrix_within_a_group():
    w = torch.stack([torch.full((2, 2), 10.0), torch.full((2, 2), 0.1)])
    out = quant.fake_quantize_groups(w, ((0, 2, 1.58),))
    assert torch.allclose(out, w)


def test_fake_quantize_groups_at_full_precision_is_the_weight():
    w = torch.randn(3, 2, 2)
    assert quant.fake_quantize_groups(w, ((0, 3, 32),)) is w


# ---------------------------------------------------------------- QuantLinear


def test_quantlinear_at_full_precision_equals_nn_linear():
    torch.manual_seed(0)
    plain = nn.Linear(6, 4)
    layer = quant.QuantLinear(6, 4, bits=32)
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(3, 5, 6)
    assert torch.equal(layer(x), plain(x))
    assert isinstance(layer, nn.Linear)
    assert "bits=32" in repr(layer)


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_quantlinear_uses_quantized_weights_and_keeps_latent_ones(bits):
    torch.manual_seed(1)
    layer = quant.QuantLinear(6, 4, bits=bits)
    latent = layer.weight.detach().clone()
    x = torch.randn(3, 6)
    expected = x @ quant.quantize(latent, bits).T + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.equal(layer.weight.detach(), latent)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


# ---------------------------------------------------------------- float16


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_float16_weights_with_large_values_do_not_overflow(bits):
    row = torch.tensor([60000.0, -60000.0, 30000.0, 50000.0] * 8)  # float16 sum of |w| overflows
    w = torch.stack([row, -row]).half()
    assert torch.isinf(w.abs().sum(dim=-1)).all()  # the hazard the float32 scales avoid
    q = quant.quantize(w, bits)
    assert q.dtype == torch.float16
    assert torch.isfinite(q).all()
    reference = quant.quantize(w.float(), bits)
    assert torch.allclose(q.float(), reference, rtol=1e-3, atol=0)
    if bits == 1.0:
        assert float(q[0, 0]) == pytest.approx(50000.0, rel=1e-3)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("bits", [0, 5, 1.5, 16, "four", None])
def test_unknown_bits_raise_naming_the_allowed_values(bits):
    w = torch.ones(2, 2)
    for call in (
        lambda: quant.quantize(w, bits),
        lambda: quant.fake_quantize(w, bits),
        lambda: quant.levels(bits),
        lambda: quant.QuantLinear(2, 2, bits=bits),
    ):
        with pytest.raises(ValueError, match=r"1, 1\.58, 2, 3, 4, 8, 32"):
            call()
