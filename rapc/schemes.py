"""Pruning schemes as projections: a pure function from a weight and a ratio to the mask it keeps.

A conv weight is [out, in, kh, kw] and its GEMM view [out, in*kh*kw]; a linear
weight is [out, in] and follows the same rules. ``ratio`` is the fraction of
units pruned; at least one unit is always kept, so no layer is cut in two.
Projecting onto the scheme's set is keeping the largest-norm units, which is
what ADMM's Z-update needs: Z = W * project(W, ratio).

A new scheme is one mask function and its registration; what the projector must know about
it besides the function is given at registration (see SCHEMES), never tested by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from rapc.registry import Registry

if TYPE_CHECKING:  # config.py validates scheme names against SCHEMES, so it imports this module, not the reverse
    from rapc.config import PruningConfig

Scheme = Callable[..., torch.Tensor]
SCHEMES: Registry[Scheme] = Registry("pruning scheme")
# Given at registration, read by the projector (projection.py):
#   channels="out" | "in"  the scheme keeps whole output channels (filters) or whole input channels, by L2 norm.
#                          The projector ranks them jointly over each coupling group, so the same channels go
#                          from every coupled layer (and, for "out", the pruned filters' bias and BatchNorm):
#                          every zero channel is removable. Without it a scheme is projected per layer.
#   options=f              f(PruningConfig) -> the mask function's keyword arguments beyond (weight, ratio).


class Unfit(ValueError):
    """Raised by a mask function for a weight whose shape the scheme cannot take; the projector
    leaves that layer dense and says why."""


def n_keep(n: int, ratio: float, round_to: int = 1) -> int:
    """Units kept of ``n`` at ``ratio``: at least one, and with ``round_to`` rounded up to a multiple of it,
    never more than ``n`` (as torch-pruning's round_to: channel counts that runtimes' kernels tile well).
    Up, not down: rounding never prunes more than the ratio asks, and never a whole layer."""
    kept = min(n, max(1, int(round((1.0 - ratio) * n))))
    return min(n, math.ceil(kept / round_to) * round_to)


def widths(n: int, round_to: int = 1) -> list[int]:
    """Every count n_keep can give for ``n`` units, ascending: the multiples of round_to up to n, and n."""
    return sorted({*range(round_to, n + 1, round_to), n})


def top_mask(scores: torch.Tensor, ratio: float, round_to: int = 1) -> torch.Tensor:
    """Boolean mask of the n_keep(len, ratio, round_to) largest scores (ties broken by position)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[: n_keep(scores.numel(), ratio, round_to)]] = True
    return keep


def _along(keep: torch.Tensor, dim: int, weight: torch.Tensor) -> torch.Tensor:
    shape = [1] * weight.dim()
    shape[dim] = -1
    return keep.view(shape).expand_as(weight)


def filter_scores(weight: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each output filter (row of the GEMM view)."""
    return weight.detach().flatten(1).pow(2).sum(1)


def channel_scores(weight: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each input channel's slice W[:, c]."""
    return weight.detach().transpose(0, 1).flatten(1).pow(2).sum(1)


@SCHEMES.register("filter", channels="out")
def filter_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep whole filters: removable as output channels."""
    return _along(top_mask(filter_scores(weight), ratio), 0, weight)


@SCHEMES.register("channel", channels="in")
def channel_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep whole input channels: removable as input channels."""
    return _along(top_mask(channel_scores(weight), ratio), 1, weight)


@SCHEMES.register("column")
def column_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep whole GEMM columns (in, kh, kw) across all filters: the paper's column pruning."""
    gemm = weight.detach().flatten(1)
    keep = top_mask(gemm.pow(2).sum(0), ratio)
    return keep.expand_as(gemm).reshape(weight.shape)


@SCHEMES.register("irregular")
def irregular_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the largest-magnitude weights anywhere in the layer."""
    return top_mask(weight.detach().abs().flatten(), ratio).view_as(weight)


def _nm_options(cfg: PruningConfig) -> dict[str, Any]:
    return {"n": cfg.nm[0], "m": cfg.nm[1]}


@SCHEMES.register("nm", options=_nm_options)
def nm_mask(weight: torch.Tensor, ratio: float = 0.5, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n largest of every m consecutive input channels at each (out, kh, kw): the
    layout of TensorRT's 2:4 sparse kernels. The ratio is implied by n:m and ignored."""
    if weight.shape[1] % m:
        raise Unfit(f"{weight.shape[1]} input channels, not a multiple of {m}")
    moved = weight.detach().abs().movedim(1, -1)  # [out, kh, kw, in]
    blocks = moved.reshape(*moved.shape[:-1], -1, m)
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    keep.scatter_(-1, blocks.topk(n, dim=-1, sorted=False).indices, True)
    return keep.reshape(moved.shape).movedim(-1, 1)
