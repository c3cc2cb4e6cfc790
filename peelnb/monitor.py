"""Peel a model every N steps of a plain training loop, appending each step to a Zarr store.

`PeelMonitor` is called once per training step. Every ``every`` steps it
peels the model with `peelnb.peel` on the same calibration and evaluation
windows each time (drawn from the data with the monitor's seed),
appends that step to the store atomically (`peelnb.results.append_step`),
and keeps account of the time it spends. The model, its training mode and
gradient flags, and torch's global random number generators are left exactly
as they were, so the training run is the one it would have been without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from . import results
from .adapters import adapter_for
from .config import PeelConfig
from .data import Corpus
from .peeling import peel
from .sources import checkpoint_source, corpus_for

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _training_state_kept() -> Iterator[None]:
    """Restore torch's global RNG states (CPU and initialized CUDA devices) and grad mode on exit."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    grad = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_grad_enabled(grad)


class PeelMonitor:
    """Peel a model every ``every`` training steps and append each step to a Zarr store.

    Call it in the training loop as ``monitor(model, step)``. The store can
    be opened (`peelnb.open`) or explored (`peelnb.explore`) while training
    runs; re-creating the monitor on an existing store resumes it (steps the
    store holds are skipped).

    Parameters
    ----------
    store : str or Path
        A ``.zarr`` store, created at the first peel.
    data : None, Tensor or Corpus
        Tokens, as for `peelnb.peel`: None uses the bundled corpus (encoded
        with ``tokenizer=`` when given; a model whose vocabulary differs
        from the bundled characters' is refused at the first peel), a 1-D
        tensor of token ids is split into calibration and held-out parts.
        Calibration and evaluation windows are drawn from it with ``seed``:
        every peeled step sees the same tokens.
    every : int
        Peel at the steps that are multiples of ``every``.
    view : {"replace", "headroom"}
        As in `peelnb.peel`.
    layers : tuple of int, optional
        Layers to peel (default all): fewer layers, less overhead.
    bits : tuple of float
        Reference bit-widths.
    permutations : int or tuple of int
        Solver orderings (their spread is the noise floor).
    solver_steps : int
        K, Adam steps per local solve.
    calib_tokens, eval_tokens : int
        Calibration and held-out evaluation tokens.
    seed : int
        Seeds the windows, shuffles and inits; the same for every step.
    **options
        Further keyword arguments of `peelnb.peel` (``target``, ``init``,
        ``lr``, ``batch_size``, ``references``, ...).

    Raises
    ------
    ValueError
        Bad settings, a store that is not ``.zarr``, or a store holding a peel
        with other settings.
    ImportError
        When the zarr package is not installed.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from peelnb import PeelMonitor
    >>> from peelnb.config import ModelConfig
    >>> from peelnb.model import GPT
    >>> model = GPT(ModelConfig(vocab_size=73, n_layer=2, d_model=16, n_head=2, n_ctx=16))
    >>> tokens = torch.arange(4000) % 73
    >>> monitor = PeelMonitor(os.path.join(tempfile.mkdtemp(), "run.zarr"), tokens, every=2,
    ...                       solver_steps=5, calib_tokens=512, eval_tokens=128)
    >>> for step in range(3):
    ...     _ = monitor(model, step)  # a training step would come before
    >>> monitor.steps
    [0, 2]
    """

    def __init__(
        self,
        store: str | Path,
        data: Tensor | Corpus | None = None,
        *,
        every: int = 100,
        view: str = "replace",
        layers: tuple[int, ...] | None = None,
        bits: tuple[float, ...] = (1.58, 32.0),
        permutations: int | tuple[int, ...] = 2,
        solver_steps: int = 25,
        calib_tokens: int = 32768,
        eval_tokens: int = 4096,
        seed: int = 0,
        **options: Any,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        for name in ("out", "progress"):
            if name in options:
                raise TypeError(f"PeelMonitor does not take {name}=: the store is its output, and it shows no bar")
        if not results.is_zarr(store):
            raise ValueError(f"{str(store)!r} is not a Zarr store: PeelMonitor appends to a path ending in .zarr")
        results.require_zarr()
        self.store = Path(store)
        self.every = int(every)
        self.options = dict(view=view, layers=layers, bits=bits, permutations=permutations,
                            solver_steps=solver_steps, calib_tokens=calib_tokens, eval_tokens=eval_tokens,
                            seed=seed, **options)
        fields = {field.name for field in dataclasses.fields(PeelConfig)}
        self._config = PeelConfig(**{k: v for k, v in self.options.items() if k in fields}).to_dict()
        self._data = data
        self._steps = self._resume()
        self._started: float | None = None
        self._seconds = 0.0

    def _resume(self) -> set[int]:
        """Steps the store already holds; a clear error if it was peeled with other settings."""
        if not self.store.exists():
            return set()
        ds = results.open(self.store)
        stored = ds.attrs.get("peel_config")
        if stored is not None:
            ours = json.loads(json.dumps(self._config))
            theirs = json.loads(stored)
            differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            if differ:
                detail = "; ".join(f"{k}: store {theirs.get(k)!r}, monitor {ours.get(k)!r}" for k in differ)
                raise ValueError(
                    f"{str(self.store)!r} holds a peel with other settings ({detail}): "
                    "monitor with the store's settings, or give another store"
                )
        return {int(s) for s in ds["step"].values}

    @property
    def steps(self) -> list[int]:
        """Steps the store holds, sorted (resumed ones included)."""
        return sorted(self._steps)

    @property
    def peel_seconds(self) -> float:
        """Seconds this monitor spent peeling and writing, in total."""
        return self._seconds

    @property
    def wall_seconds(self) -> float:
        """Seconds since the monitor's first call (0 before it)."""
        return 0.0 if self._started is None else time.perf_counter() - self._started

    @property
    def overhead(self) -> float:
        """Share of the wall time since the first call spent peeling (0 to 1)."""
        wall = self.wall_seconds
        return self._seconds / wall if wall > 0 else 0.0

    def __call__(self, model: nn.Module, step: int, *, force: bool = False) -> xr.Dataset | None:
        """Peel ``model`` at ``step`` if it is due and not in the store yet; append it.

        Parameters
        ----------
        model : nn.Module
            The model being trained; its weights, gradients, modes and flags are left as they were.
        step : int
            The training step.
        force : bool
            Peel even if ``step`` is not a multiple of ``every`` (e.g. the last step).

        Returns
        -------
        xarray.Dataset or None
            The peeled step, or None when nothing was due.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        step = int(step)
        started = time.perf_counter()
        if self._started is None:
            self._started = started
        if (step % self.every and not force) or step in self._steps:
            return None
        if self._data is None:  # resolved once, as peel would: the vocabulary checked, tokenizer= applied
            source = checkpoint_source({step: model})
            vocab_size = (self.options.get("adapter") or adapter_for(model)).dims(model).vocab_size
            self._data = corpus_for(None, source, vocab_size, tokenizer=self.options.get("tokenizer"))
        with _training_state_kept():
            ds = peel({step: model}, self._data, progress=False, **self.options)
            results.append_step(ds, self.store)
        self._steps.add(step)
        seconds = time.perf_counter() - started
        self._seconds += seconds
        log.info(
            "PeelMonitor: step %d peeled in %.2f s; %.1f s of the %.1f s since the first call spent peeling (%.1f%%)",
            step, seconds, self._seconds, self.wall_seconds, 100 * self.overhead,
        )
        return ds

    def __repr__(self) -> str:
        return (f"PeelMonitor({str(self.store)!r}, every={self.every}, steps={len(self._steps)}, "
                f"peel_seconds={self._seconds:.1f}, overhead={self.overhead:.1%})")
