"""Property tests for the pruning projections in rapc.schemes.

Every expectation is computed here from the weight itself (norms in float64,
structure read off the mask), never by calling the scheme's own scoring helpers.
Weights are continuous random draws, so ties in the norms have probability zero
and "keep the largest" names exactly one mask.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rapc.errors import RapcError
from rapc.schemes import SCHEMES, channel_mask, column_mask, filter_mask, irregular_mask, n_keep, nm_mask, top_mask, widths

SETTINGS = settings(max_examples=50, deadline=None)

dims = st.integers(1, 12)
kernels = st.integers(1, 3)
conv_shapes = st.tuples(dims, dims, kernels, kernels)
linear_shapes = st.tuples(dims, dims)
shapes = st.one_of(conv_shapes, linear_shapes)
ratios = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)
# ratios where rounding (1 - ratio) * n would give zero for small layers, up to the last float below 1
high_ratios = st.one_of(st.just(math.nextafter(1.0, 0.0)), st.floats(0.9, 1.0, exclude_max=True))
seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([torch.float32, torch.float64])


def make_weight(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def tolerance(dtype: torch.dtype) -> float:
    # the scheme ranks in the weight's dtype, the test in float64; allow only rounding-level disagreement
    return 1e-5 if dtype == torch.float32 else 1e-12


def assert_keeps_largest(scores: torch.Tensor, keep: torch.Tensor, tol: float) -> None:
    """Every kept score >= every pruned score (the kept set is the top-k of the scores, k = kept count)."""
    assert scores.shape == keep.shape
    if keep.all() or not keep.any():
        return
    lowest_kept = scores[keep].min().item()
    highest_pruned = scores[~keep].max().item()
    assert lowest_kept >= highest_pruned - tol * max(1.0, abs(highest_pruned)), (lowest_kept, highest_pruned)


def assert_basic_mask(mask: torch.Tensor, weight: torch.Tensor) -> None:
    assert isinstance(mask, torch.Tensor)
    assert mask.shape == weight.shape
    assert mask.dtype == torch.bool
    assert not mask.requires_grad


def uniform_units(units: torch.Tensor) -> torch.Tensor:
    """units: [n_units, unit_size] bool. Asserts each unit is all-kept or all-pruned; returns per-unit keep."""
    kept = units.all(1)
    pruned = ~units.any(1)
    assert bool((kept | pruned).all()), "a unit is partly kept: the mask is not structured"
    return kept


def filter_units(t: torch.Tensor) -> torch.Tensor:  # [out, in*kh*kw]
    return t.reshape(t.shape[0], -1)


def channel_units(t: torch.Tensor) -> torch.Tensor:  # [in, out*kh*kw]
    return torch.stack([t[:, c].reshape(-1) for c in range(t.shape[1])])


def column_units(t: torch.Tensor) -> torch.Tensor:  # [in*kh*kw, out]
    return t.reshape(t.shape[0], -1).T


STRUCTURED = {
    "filter": (filter_mask, filter_units, lambda w: w.shape[0]),
    "channel": (channel_mask, channel_units, lambda w: w.shape[1]),
    "column": (column_mask, column_units, lambda w: w[0].numel()),
}


def check_structured(scheme: str, shape: tuple[int, ...], ratio: float, seed: int, dtype: torch.dtype) -> None:
    project, units_of, n_units = STRUCTURED[scheme]
    weight = make_weight(shape, seed, dtype)
    before = weight.clone()
    mask = project(weight, ratio)

    assert torch.equal(weight, before), "the projection modified its input"
    assert_basic_mask(mask, weight)
    keep = uniform_units(units_of(mask))
    assert keep.numel() == n_units(weight)
    assert int(keep.sum()) == n_keep(n_units(weight), ratio)
    assert int(keep.sum()) >= 1
    norms = units_of(weight.double()).norm(dim=1)
    assert_keeps_largest(norms, keep, tolerance(dtype))
    assert torch.equal(project(weight * mask, ratio), mask), "projecting the projected weight changed the mask"


# --- n_keep and top_mask -----------------------------------------------------------------------


@SETTINGS
@given(n=st.integers(1, 5000), ratio=ratios)
def test_n_keep_is_between_one_and_n_and_rounds_the_kept_fraction(n, ratio):
    k = n_keep(n, ratio)
    assert isinstance(k, int)
    assert 1 <= k <= n
    target = (1.0 - ratio) * n
    if target >= 0.5 + 1e-9:
        assert abs(k - target) <= 0.5 + 1e-9
    else:
        assert k == 1


@SETTINGS
@given(n=st.integers(1, 5000))
def test_n_keep_keeps_everything_at_ratio_zero(n):
    assert n_keep(n, 0.0) == n


@SETTINGS
@given(n=st.integers(1, 5000), ratio=high_ratios)
def test_n_keep_keeps_at_least_one_unit_near_ratio_one(n, ratio):
    assert n_keep(n, ratio) >= 1


@SETTINGS
@given(n=st.integers(1, 5000), ratio=ratios, round_to=st.sampled_from([2, 4, 8, 16, 64]))
def test_n_keep_with_round_to_rounds_the_kept_count_up_to_a_multiple_never_past_n(n, ratio, round_to):
    k, unrounded = n_keep(n, ratio, round_to), n_keep(n, ratio)
    assert k % round_to == 0 or k == n  # a multiple, or the whole layer when n itself is not one
    assert unrounded <= k < unrounded + round_to and k <= n  # up to the next multiple: never prunes more than asked
    assert k in widths(n, round_to)


@SETTINGS
@given(n=st.integers(1, 200), ratio=ratios, seed=seeds)
def test_top_mask_keeps_exactly_the_largest_scores(n, ratio, seed):
    scores = make_weight((n,), seed).abs()
    keep = top_mask(scores, ratio)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    assert int(keep.sum()) == n_keep(n, ratio)
    assert_keeps_largest(scores, keep, 0.0)


# --- filter / channel / column -------------------------------------------------------------------


@SETTINGS
@given(shape=shapes, ratio=ratios, seed=seeds, dtype=dtypes)
def test_filter_keeps_the_largest_whole_filters(shape, ratio, seed, dtype):
    check_structured("filter", shape, ratio, seed, dtype)


@SETTINGS
@given(shape=shapes, ratio=ratios, seed=seeds, dtype=dtypes)
def test_channel_keeps_the_largest_whole_input_channels(shape, ratio, seed, dtype):
    check_structured("channel", shape, ratio, seed, dtype)


@SETTINGS
@given(shape=shapes, ratio=ratios, seed=seeds, dtype=dtypes)
def test_column_keeps_the_largest_whole_gemm_columns(shape, ratio, seed, dtype):
    check_structured("column", shape, ratio, seed, dtype)


@SETTINGS
@given(scheme=st.sampled_from(sorted(STRUCTURED)), shape=shapes, ratio=high_ratios, seed=seeds)
def test_structured_schemes_keep_at_least_one_unit_near_ratio_one(scheme, shape, ratio, seed):
    check_structured(scheme, shape, ratio, seed, torch.float64)


@SETTINGS
@given(scheme=st.sampled_from(sorted(STRUCTURED)), shape=shapes, seed=seeds)
def test_structured_schemes_keep_everything_at_ratio_zero(scheme, shape, seed):
    project, _, _ = STRUCTURED[scheme]
    weight = make_weight(shape, seed)
    assert bool(project(weight, 0.0).all())


def test_filter_on_a_known_weight_keeps_the_heaviest_rows():
    weight = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 0.5], [2.0, 2.0]])  # squared norms 2, 9, 0.25, 8
    mask = filter_mask(weight, 0.5)
    assert mask.tolist() == [[False, False], [True, True], [False, False], [True, True]]


def test_channel_on_a_known_conv_weight_keeps_the_heaviest_input_channel():
    weight = torch.zeros(2, 3, 1, 1)
    weight[:, 0] = 1.0  # norm^2 2
    weight[0, 1] = 3.0  # norm^2 9
    weight[1, 2] = 2.0  # norm^2 4
    mask = channel_mask(weight, 0.6)  # round(0.4 * 3) = 1 kept
    assert mask[:, 1].all() and not mask[:, 0].any() and not mask[:, 2].any()


def test_column_on_a_known_conv_weight_keeps_the_heaviest_kernel_positions():
    weight = torch.zeros(2, 1, 2, 2)
    weight[:, 0, 0, 1] = 5.0
    weight[:, 0, 1, 0] = 1.0
    weight[0, 0, 1, 1] = 3.0
    mask = column_mask(weight, 0.5)  # 2 of 4 columns kept
    expected = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    expected[:, 0, 0, 1] = True
    expected[:, 0, 1, 1] = True
    assert torch.equal(mask, expected)


# --- irregular -----------------------------------------------------------------------------------


@SETTINGS
@given(shape=shapes, ratio=ratios, seed=seeds, dtype=dtypes)
def test_irregular_keeps_the_largest_magnitude_entries(shape, ratio, seed, dtype):
    weight = make_weight(shape, seed, dtype)
    before = weight.clone()
    mask = irregular_mask(weight, ratio)

    assert torch.equal(weight, before), "the projection modified its input"
    assert_basic_mask(mask, weight)
    assert int(mask.sum()) == n_keep(weight.numel(), ratio)
    assert_keeps_largest(weight.double().abs().reshape(-1), mask.reshape(-1), tolerance(dtype))
    assert torch.equal(irregular_mask(weight * mask, ratio), mask), "projecting the projected weight changed the mask"


@SETTINGS
@given(shape=shapes, ratio=high_ratios, seed=seeds)
def test_irregular_keeps_at_least_one_entry_near_ratio_one(shape, ratio, seed):
    weight = make_weight(shape, seed)
    mask = irregular_mask(weight, ratio)
    assert int(mask.sum()) == n_keep(weight.numel(), ratio) >= 1
    # the single largest-magnitude entry is always among the kept ones
    assert bool(mask.reshape(-1)[weight.abs().reshape(-1).argmax()])


# --- n:m -----------------------------------------------------------------------------------------


@st.composite
def nm_cases(draw):
    m = draw(st.integers(1, 6))
    n = draw(st.integers(0, m))
    blocks = draw(st.integers(1, 3))
    out = draw(dims)
    if draw(st.booleans()):
        shape = (out, m * blocks, draw(kernels), draw(kernels))
    else:
        shape = (out, m * blocks)
    return shape, n, m


def nm_blocks(t: torch.Tensor, m: int) -> torch.Tensor:
    """[positions, blocks, m]: each row of m consecutive input channels at one (out, kh, kw)."""
    rows = []
    for o in range(t.shape[0]):
        for pos in (t[o].reshape(t.shape[1], -1).T if t.dim() > 2 else t[o].reshape(1, -1)):
            rows.append(pos.reshape(-1, m))
    return torch.stack(rows)


@SETTINGS
@given(case=nm_cases(), ratio=ratios, seed=seeds, dtype=dtypes)
def test_nm_keeps_the_n_largest_of_every_m_consecutive_input_channels(case, ratio, seed, dtype):
    shape, n, m = case
    weight = make_weight(shape, seed, dtype)
    before = weight.clone()
    mask = nm_mask(weight, ratio, n=n, m=m)

    assert torch.equal(weight, before), "the projection modified its input"
    assert_basic_mask(mask, weight)
    keep_blocks = nm_blocks(mask, m)
    mag_blocks = nm_blocks(weight.double().abs(), m)
    assert bool((keep_blocks.sum(-1) == n).all()), "a block does not keep exactly n entries"
    assert int(mask.sum()) == n * weight.numel() // m
    for keep, mag in zip(keep_blocks.reshape(-1, m), mag_blocks.reshape(-1, m)):
        assert_keeps_largest(mag, keep, tolerance(dtype))
    assert torch.equal(nm_mask(weight * mask, ratio, n=n, m=m), mask), "projecting the projected weight changed the mask"


@SETTINGS
@given(case=nm_cases(), ratio_a=ratios, ratio_b=ratios, seed=seeds)
def test_nm_ignores_the_ratio(case, ratio_a, ratio_b, seed):
    shape, n, m = case
    weight = make_weight(shape, seed)
    assert torch.equal(nm_mask(weight, ratio_a, n=n, m=m), nm_mask(weight, ratio_b, n=n, m=m))


@SETTINGS
@given(out=dims, blocks=st.integers(1, 3), seed=seeds)
def test_nm_defaults_to_two_of_four(out, blocks, seed):
    weight = make_weight((out, 4 * blocks, 3, 3), seed)
    mask = nm_mask(weight)
    assert bool((nm_blocks(mask, 4).sum(-1) == 2).all())


@SETTINGS
@given(m=st.integers(2, 6), data=st.data(), conv=st.booleans())
def test_nm_rejects_input_dims_that_are_not_a_multiple_of_m(m, data, conv):
    n = data.draw(st.integers(0, m))
    in_ = m * data.draw(st.integers(0, 2)) + data.draw(st.integers(1, m - 1))
    shape = (data.draw(dims), in_, 3, 3) if conv else (data.draw(dims), in_)
    with pytest.raises(ValueError, match=rf"{in_}.*multiple of {m}"):
        nm_mask(torch.randn(shape), 0.5, n=n, m=m)


def test_nm_on_a_known_linear_weight_keeps_the_two_largest_of_each_four():
    weight = torch.tensor([[0.1, -0.9, 0.5, 0.2, 4.0, 3.0, -2.0, 1.0]])
    mask = nm_mask(weight, 0.0, n=2, m=4)
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]


# --- all schemes / registry ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEMES))  # every registered scheme, a new one too
def test_schemes_detach_parameters_and_leave_them_unchanged(name):
    weight = torch.nn.Parameter(torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(0)))
    before = weight.detach().clone()
    mask = SCHEMES.get(name)(weight, 0.5)
    assert mask.dtype == torch.bool and mask.shape == weight.shape and not mask.requires_grad
    assert torch.equal(weight.detach(), before)
    assert weight.grad is None


def test_registry_holds_the_five_schemes_in_the_order_of_the_docs():
    assert list(SCHEMES)[:5] == ["filter", "channel", "column", "irregular", "nm"]
    assert SCHEMES.get("filter") is filter_mask
    assert SCHEMES.get("channel") is channel_mask
    assert SCHEMES.get("column") is column_mask
    assert SCHEMES.get("irregular") is irregular_mask
    assert SCHEMES.get("nm") is nm_mask
    assert "filter" in SCHEMES and "pattern" not in SCHEMES


@pytest.mark.parametrize("unknown", ["pattern", "Filter", "", "n:m"])
def test_unknown_scheme_raises_rapc_error_listing_the_known_schemes(unknown):
    with pytest.raises(RapcError) as info:
        SCHEMES.get(unknown)
    message = str(info.value)
    assert repr(unknown) in message
    for name in ("channel", "column", "filter", "irregular", "nm"):
        assert name in message
