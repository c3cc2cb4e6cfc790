"""Repair a model with its headroom references: splice them in and measure the held-out loss.

A headroom peel (``peel(..., view="headroom", references=DIR)``) finds, for
each layer, weights that lower the model's loss with every other layer kept
as trained, and exports them. `repair` splices the best of them (over
permutations) into a copy of the checkpoint, one layer or several, and
measures the copy's held-out loss on the peel's own evaluation tokens: for a
single layer that is the ``loss_ref`` the peel recorded; for several layers,
each solved with the others as trained, the measured loss says how well the
repairs combine.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import Tensor, nn

from .adapters import Adapter, adapter_for
from .baselines import _logits
from .checkpoints import state_hash
from .data import BUNDLED_NAME, Corpus
from .peeling import peel_windows, splice
from .results import validate

log = logging.getLogger(__name__)


@torch.no_grad()
def heldout_loss(adapter: Adapter, model: nn.Module, windows: Tensor, *, batch_size: int = 64) -> float:
    """Mean next-token loss (nats/token) of ``model`` on ``(n, T + 1)`` windows, accumulated in float64."""
    total = 0.0
    for chunk in windows.split(batch_size):
        logits = _logits(adapter.forward(model, chunk[:, :-1]))
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").double().item()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def _corpus(ds: xr.Dataset, data: Corpus | Tensor | None, vocab_size: int) -> Corpus:
    if isinstance(data, Corpus):
        return data
    if isinstance(data, Tensor):
        return Corpus.from_tokens(data, vocab_size=vocab_size)
    if data is not None:
        raise TypeError(f"data must be None, a Corpus or a tensor of token ids, got {type(data).__name__}")
    if ds.attrs.get("corpus") != BUNDLED_NAME:
        raise ValueError(
            f"the peel read {ds.attrs.get('corpus')!r}, not the bundled corpus: pass the same data as data= "
            "(a Corpus or the token ids given to peel)"
        )
    return Corpus.bundled()


def _layers(ds: xr.Dataset, layers: Sequence[int] | None, step: int, bits: float) -> list[int]:
    if layers is None:
        flags = ds.peel.flagged().sel(step=step, bits=bits)
        return [int(layer) for layer in flags["layer"].values[flags.values]]
    chosen = [layers] if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool) else list(layers)
    known = ds["layer"].values.tolist()
    bad = [layer for layer in chosen if isinstance(layer, bool) or layer not in known]
    if bad:
        raise ValueError(f"layer {bad[0]!r} was not peeled; the result's layers are {known}")
    return sorted({int(layer) for layer in chosen})


def repair(
    model: nn.Module,
    ds: xr.Dataset,
    *,
    references: str | Path,
    layers: int | Sequence[int] | None = None,
    bits: float = 32.0,
    step: int | None = None,
    data: Corpus | Tensor | None = None,
) -> tuple[nn.Module, float]:
    """Splice the best headroom references into a copy of ``model``; return it with its held-out loss.

    Parameters
    ----------
    model : nn.Module
        The checkpoint the headroom peel read at ``step`` (left unchanged).
    ds : xarray.Dataset
        The headroom peel's result (``view="headroom"``, or ``target="task"``).
    references : str or Path
        The folder given as ``peel(..., references=...)``.
    layers : int or sequence of int, optional
        Layers to repair; default the layers the result flags at (``step``,
        ``bits``): those whose reference beats the trained layer by more than
        the flag tolerance.
    bits : float
        Bit-width of the references to splice (one of the result's).
    step : int, optional
        The checkpoint's step; default the last step with results.
    data : Corpus or Tensor, optional
        The data given to the peel, when it was not the bundled corpus: the
        held-out loss is measured on the peel's own evaluation windows.

    Returns
    -------
    model : nn.Module
        A repaired copy, in eval mode: each chosen layer replaced by its best
        reference over permutations (lowest recorded ``loss_ref``).
    loss : float
        Its held-out loss, nats/token, on the peel's evaluation tokens. With
        one layer repaired it reproduces ``ds.loss_ref`` at that cell.

    Raises
    ------
    ValueError
        If ``ds`` is not a headroom peel, ``step``, ``bits`` or a layer is not
        in it, or ``model`` is not the checkpoint the peel read at ``step``.
    FileNotFoundError
        If ``references`` holds no reference for a chosen layer.

    Examples
    --------
    >>> import tempfile, peelnb
    >>> from peelnb.config import ModelConfig
    >>> from peelnb.model import GPT
    >>> model = GPT(ModelConfig(vocab_size=peelnb.data.Corpus.bundled().vocab_size, n_layer=2, d_model=16, n_ctx=16))
    >>> refs = tempfile.mkdtemp()
    >>> ds = peelnb.peel({0: model}, view="headroom", bits=(32,), permutations=1, solver_steps=5,
    ...                  calib_tokens=1024, eval_tokens=256, references=refs, progress=False)
    >>> repaired, loss = peelnb.repair(model, ds, references=refs, layers=[1])
    >>> abs(loss - float(ds["loss_ref"].sel(step=0, layer=1, bits=32).min())) < 1e-5
    True
    """
    validate(ds)
    if ds.attrs.get("target") != "task":
        raise ValueError(
            f"repair splices headroom references, but this result is a {ds.attrs.get('view', 'replace')!r} peel: "
            "peel with view='headroom' and references=DIR"
        )
    done = ds["step"].values[ds["loss_ref"].notnull().any(("layer", "permutation", "bits")).values]
    if step is None:
        if not len(done):
            raise ValueError("the result holds no computed step yet")
        step = int(done[-1])
    if step not in done:
        raise ValueError(f"step {step} has no results; steps with results: {done.tolist()}")
    match = np.isclose(ds["bits"].values, float(bits))
    if not match.any():
        raise ValueError(f"bits={bits:g} is not in the result; bits: {ds['bits'].values.tolist()}")
    bits = float(ds["bits"].values[match][0])
    expected = str(ds["checkpoint_sha256"].sel(step=step).item()) if "checkpoint_sha256" in ds.coords else ""
    if expected and state_hash(model.state_dict()) != expected:
        raise ValueError(
            f"model is not the checkpoint the peel read at step {step} (its tensors differ): pass that checkpoint, "
            "e.g. run.load(step).model"
        )
    chosen = _layers(ds, layers, step, bits)
    adapter = adapter_for(model)
    repaired = model
    for layer in chosen:
        losses = ds["loss_ref"].sel(step=step, layer=layer, bits=bits)
        permutation = int(losses["permutation"].values[int(np.nanargmin(losses.values))])
        repaired = splice(repaired, references, step=step, layer=layer, permutation=permutation, bits=bits)
        log.info("repaired layer %d with the reference of permutation %d", layer, permutation)
    if not chosen:
        repaired = copy.deepcopy(model).eval()
    dims = adapter.dims(model)
    corpus = _corpus(ds, data, dims.vocab_size)
    _, evaluation = peel_windows(corpus, int(ds.attrs["n_ctx"]), calib_tokens=int(ds.attrs["calib_tokens"]),
                                 eval_tokens=int(ds.attrs["eval_tokens"]), seed=int(ds.attrs["seed"]))
    return repaired, heldout_loss(adapter, repaired.eval(), evaluation)
