"""The usual per-layer signals, measured on the checkpoints a peel reads: ``peel(..., baselines=True)``.

Three variables with dims (step, layer), beside ``loss_ablate`` (which every
peel records), so that peeling and the signals people use today can be read
side by side:

``grad_norm``
    ``||dL/dtheta_l|| / ||theta_l||``: the L2 norm of the gradient of the
    training loss with respect to every parameter of block l (weights,
    biases, norms), relative to the L2 norm of those parameters. ``L`` is the
    mean next-token cross-entropy over the peel's calibration tokens (the
    training split, the same windows the references are fitted on), the
    model in eval mode. For a quantization-aware model the gradient reaches
    the stored (latent) weights through the straight-through estimator.
``weight_change``
    ``||theta_l(s) - theta_l(s')|| / ||theta_l(s')||`` with s' the previous
    checkpoint of the peel (every parameter of block l, stored weights). NaN
    at the first checkpoint.
``alpha``
    The heavy-tail exponent of the eigenvalue spectrum of ``W^T W`` of each
    linear weight of block l (the adapter's quantized weights, as stored),
    averaged over the block's matrices; estimator in `peelnb.spectral`
    (WeightWatcher's).

What each says about a layer (the direction `PeelAccessor.summary` ranks by)
is in `peelnb.results.RANKINGS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import Tensor, nn

from .adapters import Adapter
from .spectral import matrix_alpha

NAMES = ("grad_norm", "weight_change", "alpha")
"""The baseline variables ``peel(..., baselines=True)`` adds."""
GRAD_CHUNK_TOKENS = 4096
"""Tokens per forward/backward pass of `grad_norm`: a backward pass keeps every activation, so chunks are
smaller than the capture's (on the demo model 16k-token chunks added about 0.5 GB to a peel's peak memory;
4k-token chunks add nothing measurable: ``benchmarks/cost.py``)."""


def _logits(out: object) -> Tensor:
    """Logits from whatever a model's forward returns: a tensor, an output object with ``.logits``, or a tuple."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors]) if tensors else torch.zeros(0)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def block_state(adapter: Adapter, model: nn.Module, layers: Sequence[int]) -> dict[int, list[Tensor]]:
    """Detached copies of every parameter of the given blocks, in ``named_parameters`` order."""
    blocks = adapter.blocks(model)
    return {layer: [p.detach().clone() for p in blocks[layer].parameters()] for layer in layers}


def weight_change(now: dict[int, list[Tensor]], before: dict[int, list[Tensor]] | None) -> dict[int, float]:
    """Relative change ``||now - before|| / ||before||`` per layer; NaN for every layer without ``before``."""
    out = {}
    for layer, params in now.items():
        if before is None or layer not in before:
            out[layer] = math.nan
            continue
        new, old = _flat(params), _flat(before[layer])
        out[layer] = _ratio((new - old).norm().item(), old.norm().item())
    return out


def alpha(adapter: Adapter, model: nn.Module, layers: Sequence[int]) -> dict[int, float]:
    """Mean heavy-tail exponent of each block's linear weights (`peelnb.spectral.matrix_alpha`); NaN if non-finite."""
    blocks = adapter.blocks(model)
    out = {}
    for layer in layers:
        block = blocks[layer]
        params = dict(block.named_parameters())
        values = []
        for name in adapter.quantized_weights(block):
            weight = params[name].detach().double().cpu().numpy()
            values.append(matrix_alpha(weight) if np.isfinite(weight).all() else math.nan)
        out[layer] = float(np.mean(values)) if values else math.nan
    return out


def grad_norm(adapter: Adapter, model: nn.Module, layers: Sequence[int], windows: Tensor, *,
              chunk_tokens: int = GRAD_CHUNK_TOKENS) -> dict[int, float]:
    """Relative norm of the training-loss gradient of each block's parameters, ``||grad|| / ||theta||``.

    Parameters
    ----------
    adapter : Adapter
        The model family.
    model : nn.Module
        The checkpoint, in eval mode; its parameters' ``requires_grad`` flags
        and ``.grad`` are left as they were.
    layers : sequence of int
        Blocks to measure.
    windows : Tensor
        (N, T + 1) token windows; the loss is the mean next-token
        cross-entropy over all of them, accumulated ``chunk_tokens`` at a time.
    chunk_tokens : int
        Tokens per forward/backward pass.

    Returns
    -------
    dict of int to float
    """
    blocks = adapter.blocks(model)
    params = {layer: list(blocks[layer].parameters()) for layer in layers}
    flat = [p for layer in layers for p in params[layer]]
    flags = [p.requires_grad for p in flat]
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in flat]
    n, T = windows.shape[0], windows.shape[1] - 1
    step = max(1, chunk_tokens // T)
    try:
        for p in flat:
            p.requires_grad_(True)
        for start in range(0, n, step):
            chunk = windows[start : start + step]
            with torch.enable_grad():
                logits = _logits(adapter.forward(model, chunk[:, :-1]))
                loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum")
                parts = torch.autograd.grad(loss / (n * T), flat, allow_unused=True)
            for total, part in zip(grads, parts):
                if part is not None:
                    total += part.double()
    finally:
        for p, flag in zip(flat, flags):
            p.requires_grad_(flag)
    out, i = {}, 0
    for layer in layers:
        k = len(params[layer])
        out[layer] = _ratio(_flat(grads[i : i + k]).norm().item(), _flat(params[layer]).norm().item())
        i += k
    return out


class Tracker:
    """Measures the baselines of each checkpoint a peel reads, remembering the previous one's weights.

    Parameters
    ----------
    adapter : Adapter
        The model family.
    layers : sequence of int
        The peeled layers.
    steps : sequence of int
        Every step of the peel, ascending (the step before ``s`` is its previous checkpoint).
    load : callable
        ``load(step)`` gives the model of a step; used only when the previous
        checkpoint was not measured in this session (a resumed peel).
    """

    def __init__(self, adapter: Adapter, layers: Sequence[int], steps: Sequence[int],
                 load: Callable[[int], nn.Module]) -> None:
        self.adapter = adapter
        self.layers = list(layers)
        self.steps = list(steps)
        self.load = load
        self._state: tuple[int, dict[int, list[Tensor]]] | None = None

    def _previous(self, step: int) -> dict[int, list[Tensor]] | None:
        i = self.steps.index(step)
        if i == 0:
            return None
        previous = self.steps[i - 1]
        if self._state is not None and self._state[0] == previous:
            return self._state[1]
        return block_state(self.adapter, self.load(previous), self.layers)

    def measure(self, model: nn.Module, step: int, calibration: Tensor) -> dict[str, dict[int, float]]:
        """``{name: {layer: value}}`` of every baseline for the checkpoint ``model`` at ``step``.

        Parameters
        ----------
        model : nn.Module
            The checkpoint, in eval mode.
        step : int
            Its step (one of ``steps``).
        calibration : Tensor
            (N, T + 1) calibration windows for ``grad_norm``.
        """
        now = block_state(self.adapter, model, self.layers)
        values = {
            "grad_norm": grad_norm(self.adapter, model, self.layers, calibration),
            "weight_change": weight_change(now, self._previous(step)),
            "alpha": alpha(self.adapter, model, self.layers),
        }
        self._state = (step, now)
        return values


def write(ds: xr.Dataset, step: int, values: dict[str, dict[int, float]]) -> None:
    """Store ``{name: {layer: value}}`` (as `Tracker.measure` returns) at ``step`` of a result."""
    for name, per_layer in values.items():
        for layer, value in per_layer.items():
            ds[name].loc[dict(step=step, layer=layer)] = value
