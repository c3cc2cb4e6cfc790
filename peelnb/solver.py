"""Local solves: all references of one layer optimized together (DESIGN.md §3.2-3.4).

For one layer, the references of every (bits, permutation) pair are stacked
along a leading dimension R (bits-major: ``r = bits_index * P +
permutation_index``) and trained in one batched loop. Adam is elementwise and
the loss is a sum of per-reference losses, so each reference follows exactly
the trajectory it would follow alone; batching only makes the matmuls larger.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._optim import adam
from .adapters import Adapter
from .adapters.capture import BlockCall, BoundCall
from .config import PeelConfig
from .data import seeded_generator
from .quant import fake_quantize_groups

_INIT_KEY, _ORDER_KEY = 3, 5
Downstream = Callable[[Tensor, Tensor], Tensor]
"""Maps the layer's output (N, T, C) for the sequences ``index`` (N,) to logits (N, T, V) through the frozen rest."""


@dataclass(frozen=True)
class LayerData:
    """Cached tensors of one local problem.

    ``*_in`` are the block's inputs h_{l-1} and ``*_out`` the trained block's
    outputs h_l, (N, T, C), in their storage dtype (cast to the block's dtype
    batch by batch); ``*_tokens`` the next-token targets (N, T); ``*_call``
    the block's other captured arguments. The selection split is None unless
    the best snapshot is selected.
    """

    fit_in: Tensor
    fit_out: Tensor
    fit_tokens: Tensor
    select_in: Tensor | None = None
    select_out: Tensor | None = None
    select_tokens: Tensor | None = None
    fit_call: BlockCall = field(default_factory=BlockCall.plain)
    select_call: BlockCall = field(default_factory=BlockCall.plain)


@dataclass(frozen=True)
class Solution:
    """Solved references of one layer.

    Attributes
    ----------
    params : dict of str to Tensor
        The references' effective (quantized) parameters, stacked (R, ...).
    template : nn.Module
        A copy of the block with its own quantization off, to run ``params``.
    seconds : float
        Wall time of the whole batched solve.
    kept_step : Tensor
        (R,) solver step of the kept snapshot (K unless a snapshot is selected).
    """

    params: dict[str, Tensor]
    template: nn.Module
    seconds: float
    kept_step: Tensor


def permutation_order(n: int, permutation: int, seed: int) -> Tensor:
    """Order in which a solver visits ``n`` calibration samples: natural for 0, else a seeded shuffle."""
    if permutation == 0:
        return torch.arange(n)
    return torch.randperm(n, generator=seeded_generator(seed, _ORDER_KEY, permutation))


class _Objective:
    """Per-reference local loss: relative output error, or next-token loss downstream."""

    def __init__(self, target: str, data: LayerData, downstream: Downstream | None) -> None:
        self.target = target
        self.downstream = downstream
        self.scale = (data.fit_out - data.fit_in).float().pow(2).mean().clamp_min(1e-12)

    def __call__(self, out: Tensor, trained_out: Tensor, tokens: Tensor, index: Tensor | None = None) -> Tensor:
        """(R,) losses of outputs ``out`` (R, B, T, C) of the sequences ``index`` (R, B)."""
        R = out.shape[0]
        if self.target == "output":
            return (out - trained_out).pow(2).mean(dim=(1, 2, 3)) / self.scale
        logits = self.downstream(out.flatten(0, 1), index.flatten())  # (R*B, T, V)
        losses = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
        return losses.view(R, -1).mean(dim=1)


class References:
    """R references of one block: latent weights, bit-widths and data orders.

    Parameters
    ----------
    adapter : Adapter
        The model family.
    block : nn.Module
        The trained block (left untouched).
    config : PeelConfig
        Bits, permutations, initialization and seed.
    layer, n_layer : int
        Index of the block and depth of the model (for the scratch init).
    """

    def __init__(self, adapter: Adapter, block: nn.Module, config: PeelConfig, *, layer: int, n_layer: int) -> None:
        self.adapter = adapter
        self.bits = config.bits
        self.permutations = config.permutations
        self.template = copy.deepcopy(block).requires_grad_(False)
        adapter.disable_quantization(self.template)
        self.quantized = set(adapter.quantized_weights(block))
        self.transposed = set(adapter.transposed_weights(block))
        starts = []
        for p in self.permutations:
            start = copy.deepcopy(self.template)
            if config.init == "scratch":
                adapter.init_block(start, n_layer, seeded_generator(config.seed, _INIT_KEY, layer, p))
            starts.append(dict(start.named_parameters()))
        P = len(self.permutations)
        self.groups = tuple((i * P, (i + 1) * P, b) for i, b in enumerate(self.bits))
        self.latent = {
            name: torch.stack([starts[r % P][name].detach() for r in range(len(self.bits) * P)]).requires_grad_(True)
            for name in starts[0]
        }

    def __len__(self) -> int:
        return len(self.bits) * len(self.permutations)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the references compute in (the trained block's)."""
        return next(iter(self.latent.values())).dtype

    def _quantized(self, name: str, value: Tensor) -> Tensor:
        if name not in self.quantized:
            return value
        if name in self.transposed:  # stored (in, out): scales per output unit are per column
            return fake_quantize_groups(value.transpose(-2, -1), self.groups).transpose(-2, -1)
        return fake_quantize_groups(value, self.groups)

    def effective(self) -> dict[str, Tensor]:
        """Weights the references compute with: linear weights fake-quantized per bits group."""
        return {n: self._quantized(n, v) for n, v in self.latent.items()}

    def __call__(self, params: dict[str, Tensor], h: Tensor, call: BoundCall | None = None) -> Tensor:
        """Outputs (R, B, T, C) of the references with ``params`` on inputs ``h`` (R, B, T, C)."""
        return self.adapter.stacked_call(self.template, params, h, call)


@torch.no_grad()
def _selection_losses(refs: References, params: dict[str, Tensor], objective: _Objective, data: LayerData,
                      chunk: int) -> Tensor:
    """(R,) mean local loss of every reference on the whole selection split."""
    R, total, count = len(refs), torch.zeros(len(refs), dtype=torch.float64), 0
    dtype = refs.dtype
    for start in range(0, data.select_in.shape[0], chunk):
        x = data.select_in[start : start + chunk].to(dtype)
        n = x.shape[0]
        index = torch.arange(start, start + n)
        out = refs(params, x.expand(R, *x.shape), data.select_call.bind(index))
        trained = data.select_out[start : start + chunk].to(dtype).expand(R, *x.shape)
        tokens = data.select_tokens[start : start + chunk].expand(R, *x.shape[:2])
        total += objective(out, trained, tokens, index.expand(R, n)).double() * n
        count += n
    return total / count


def solve(
    adapter: Adapter,
    block: nn.Module,
    data: LayerData,
    config: PeelConfig,
    *,
    layer: int,
    n_layer: int,
    lr: float,
    downstream: Downstream | None = None,
    select_downstream: Downstream | None = None,
    chunk: int = 64,
) -> Solution:
    """Optimize every (bits, permutation) reference of one layer for K steps.

    Parameters
    ----------
    adapter : Adapter
        The model family.
    block : nn.Module
        The trained block of this layer.
    data : LayerData
        Cached inputs, outputs and tokens of the layer.
    config : PeelConfig
        View, bits, permutations, K, batch and seed.
    layer, n_layer : int
        Index of the layer and depth of the model.
    lr : float
        Adam learning rate.
    downstream : callable, optional
        The frozen rest of the network for the fitted sequences (needed for ``target="task"``).
    select_downstream : callable, optional
        The same for the selection sequences (default ``downstream``).
    chunk : int
        Sequences per forward pass when scoring the selection split.

    Returns
    -------
    Solution
        Effective weights of the kept references, stacked bits-major.
    """
    started = time.perf_counter()
    refs = References(adapter, block, config, layer=layer, n_layer=n_layer)
    R, K, batch = len(refs), config.solver_steps, config.batch_size
    objective = _Objective(config.target, data, downstream)
    select_objective = copy.copy(objective)
    select_objective.downstream = select_downstream or downstream
    n_fit = data.fit_in.shape[0]
    orders = torch.stack([permutation_order(n_fit, p, config.seed) for p in config.permutations])
    orders = orders.repeat(len(config.bits), 1)  # (R, n_fit), bits-major like the references
    optimizer = adam(refs.latent.values(), lr=lr)
    best_loss = torch.full((R,), torch.inf, dtype=torch.float64)
    best = {k: v.detach().clone() for k, v in refs.effective().items()}
    kept_step = torch.full((R,), K)
    for k in range(K + 1):
        if config.selects_snapshot and (k % config.selection_every == 0 or k == K):
            params = {n: v.detach() for n, v in refs.effective().items()}
            losses = _selection_losses(refs, params, select_objective, data, chunk)
            improved = losses < best_loss
            best_loss = torch.where(improved, losses, best_loss)
            kept_step[improved] = k
            for name, value in params.items():
                best[name][improved] = value[improved]
        if k == K:
            break
        index = orders[:, (k * batch + torch.arange(batch)) % n_fit]  # (R, batch)
        out = refs(refs.effective(), data.fit_in[index].to(refs.dtype), data.fit_call.bind(index))
        loss = objective(out, data.fit_out[index].to(refs.dtype), data.fit_tokens[index], index).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if not config.selects_snapshot:
        best = {n: v.detach().clone() for n, v in refs.effective().items()}
    return Solution(best, refs.template, time.perf_counter() - started, kept_step)
