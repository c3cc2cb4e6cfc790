"""Peel checkpoints: capture, local solves, verification; fills the result Dataset.

For every checkpoint (``step``) the model runs once over calibration and
evaluation tokens with hooks that keep each block's input. Then, for every
``layer``, the references of all (``permutation``, ``bits``) pairs are solved
together (`peelnb.solver`) and verified by splicing them into the checkpoint:
their outputs go through the cached downstream blocks and the head, never
through the layers below.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__, results
from ._io import atomic_path
from .adapters import Adapter, adapter_for
from .checkpoints import Checkpoint, Run, load_checkpoint, state_hash
from .config import PeelConfig, check_bits
from .data import Corpus, random_windows, seeded_generator, spread_windows
from .quant import quantize
from .solver import LayerData, Solution, solve

log = logging.getLogger(__name__)

REPLACE_LR = 3e-3
HEADROOM_LR = 1e-4
SELF_CHECK_SEQUENCES = 4
SELF_CHECK_TOLERANCE = 1e-4
CHUNK_TOKENS = 16384
CALIB_EVAL_SHARE = 4
"""``loss_ref_calib`` is measured on a quarter as many (fitted) calibration tokens as evaluation tokens."""
_CALIB_KEY = 11


class PeelWarning(UserWarning):
    """A checkpoint or layer peelnb could not compute; its cells are NaN."""


@dataclass(frozen=True)
class _Source:
    """Where checkpoints come from: their steps, a loader, and the run if any."""

    steps: list[int]
    load: Callable[[int], Checkpoint]
    run: Run | None
    description: str


def _source(checkpoints: Any) -> _Source:
    """Normalize a run folder, a `Run`, or a mapping step -> model/path."""
    if isinstance(checkpoints, (str, Path, Run)):
        run = checkpoints if isinstance(checkpoints, Run) else Run(checkpoints)
        if not run.steps:
            raise ValueError(f"run folder {str(run.path)!r} holds no checkpoints yet")
        return _Source(run.steps, run.load, run, f"run {run.path}")
    if isinstance(checkpoints, Mapping):
        if not checkpoints:
            raise ValueError("the mapping of checkpoints is empty: give at least one step -> model")
        items = {}
        for step, item in checkpoints.items():
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
                raise TypeError(f"checkpoint keys must be integer steps, got {step!r}")
            items[int(step)] = item

        def load(step: int) -> Checkpoint:
            item = items[step]
            if isinstance(item, (str, Path)):
                loaded = load_checkpoint(item)
                return Checkpoint(step, loaded.model, loaded.lr, loaded.sha256)
            if not isinstance(item, nn.Module):
                raise TypeError(f"checkpoint {step} is a {type(item).__name__}; give a model or a checkpoint path")
            model = copy.deepcopy(item).eval()
            return Checkpoint(step, model, None, state_hash(model.state_dict()))

        return _Source(sorted(items), load, None, "models")
    if isinstance(checkpoints, nn.Module):
        raise TypeError("pass checkpoints as a mapping {step: model}, e.g. peel({1000: model})")
    raise TypeError(f"checkpoints must be a run folder or a mapping step -> model, got {type(checkpoints).__name__}")


def _corpus(data: Any, run: Run | None, vocab_size: int) -> Corpus:
    """Turn ``data`` (None, a text path, token ids or a Corpus) into a Corpus the model can read."""
    if isinstance(data, Corpus):
        corpus = data
    elif isinstance(data, Tensor):
        corpus = Corpus.from_tokens(data, vocab_size=vocab_size)
    elif isinstance(data, (str, Path)):
        if run is None:
            raise ValueError(
                "a text file needs the model's tokenizer: peel a run folder, or pass token ids (a tensor) or a Corpus"
            )
        from .data import load_text

        corpus = Corpus.from_text(load_text(data), name=str(data), tokenizer=run.tokenizer)
    elif data is None:
        if run is not None:
            corpus = run.corpus()
        else:
            corpus = Corpus.bundled()
            if corpus.vocab_size != vocab_size:
                raise ValueError(
                    f"the model has {vocab_size} token ids, the bundled corpus {corpus.vocab_size}: pass data="
                )
    else:
        raise TypeError(f"data must be None, a text file, a tensor of token ids or a Corpus, got {type(data).__name__}")
    if corpus.vocab_size > vocab_size:
        raise ValueError(
            f"the data uses {corpus.vocab_size} token ids but the model knows {vocab_size}: "
            "encode the data with the model's own tokenizer"
        )
    return corpus


def peel_windows(corpus: Corpus, n_ctx: int, *, calib_tokens: int, eval_tokens: int,
                 seed: int) -> tuple[Tensor, Tensor]:
    """The calibration and evaluation windows `peel` draws, each ``(n, n_ctx + 1)`` token ids.

    Calibration windows start at seeded random places in the training split;
    evaluation windows are spread evenly over the held-out split. `peel` uses
    exactly these (`peelnb.byhand` too, to reproduce its numbers).
    """
    n_calib = max(2, calib_tokens // n_ctx)
    calib = random_windows(corpus.train, n_calib, n_ctx, seeded_generator(seed, _CALIB_KEY))
    evaluation = spread_windows(corpus.heldout, max(1, eval_tokens // n_ctx), n_ctx)
    return calib, evaluation


LayerOut = Callable[[Tensor], Tensor]
"""Maps a layer's inputs (n, T, C) to R candidate outputs (R, n, T, C)."""


class _Replay:
    """The frozen network from a layer boundary on: blocks, head, and next-token loss."""

    def __init__(self, adapter: Adapter, model: nn.Module) -> None:
        self.adapter = adapter
        self.model = model
        self.blocks = list(adapter.blocks(model))

    def logits(self, first: int, h: Tensor) -> Tensor:
        """Logits of hidden states ``h`` (N, T, C) entering block ``first`` (``L`` = head only)."""
        for block in self.blocks[first:]:
            h = self.adapter.call(block, h)
        return self.adapter.head(self.model, h)

    @torch.no_grad()
    def verify(self, first: int, layer_out: LayerOut, x: Tensor, tokens: Tensor, *, candidates: int = 1,
               trained: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Splice candidate outputs into the network and score them, chunk by chunk.

        Parameters
        ----------
        first : int
            Block that receives the candidates' outputs (``L``: the head only).
        layer_out : callable
            Maps inputs (n, T, C) to the candidates' outputs (R, n, T, C).
        x : Tensor
            (N, T, C) inputs of the replaced layer.
        tokens : Tensor
            (N, T) next-token targets.
        candidates : int
            R, the number of candidates ``layer_out`` returns.
        trained : Tensor, optional
            (N, T, C) the trained layer's outputs, to measure ``local_err``.

        Returns
        -------
        loss : Tensor
            (R,) mean next-token loss, float64.
        err : Tensor or None
            (R,) relative L2 error against the trained layer's residual contribution.
        """
        N, T = tokens.shape
        R = candidates
        loss_sum, err_sum, contribution = torch.zeros(R, dtype=torch.float64), torch.zeros(R, dtype=torch.float64), 0.0
        step = max(1, CHUNK_TOKENS // (R * T))
        for start in range(0, N, step):
            chunk = slice(start, start + step)
            out = layer_out(x[chunk])  # (R, n, T, C)
            logits = self.logits(first, out.flatten(0, 1))
            ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens[chunk].repeat(R, 1).flatten(), reduction="none")
            loss_sum += ce.view(R, -1).double().sum(dim=1)
            if trained is not None:
                y = trained[chunk]
                err_sum += (out - y).pow(2).flatten(1).sum(dim=1).double()
                contribution += (y - x[chunk]).pow(2).sum().item()
        err = (err_sum / max(contribution, 1e-24)).sqrt() if trained is not None else None
        return loss_sum / (N * T), err


def _capture(adapter: Adapter, model: nn.Module, windows: Tensor) -> list[Tensor]:
    """[h_0, ..., h_L] of ``windows`` (N, T + 1), each (N, T, C), from one hooked forward pass.

    Hidden states are copied into preallocated storage as the forward pass
    produces them, so the pass frees its activations as it would unhooked.
    """
    N = windows.shape[0]
    n_hidden = len(adapter.blocks(model)) + 1
    hidden: list[Tensor] = []
    start = 0

    def keep(index: int, h: Tensor) -> None:
        if len(hidden) == index:
            hidden.append(torch.empty((N, *h.shape[1:]), dtype=h.dtype, device=h.device))
        hidden[index][start : start + h.shape[0]].copy_(h)

    step = max(1, CHUNK_TOKENS // (windows.shape[1] - 1))
    with torch.no_grad(), adapter.capturing(model, keep):
        for start in range(0, N, step):
            model(windows[start : start + step, :-1])
    if len(hidden) != n_hidden:
        raise RuntimeError(f"capture saw {len(hidden)} of the model's {n_hidden} hidden states: "
                           "its forward pass does not call every block")
    return hidden


def _self_check(adapter: Adapter, model: nn.Module, hidden: list[Tensor], step: int) -> None:
    """Each trained block replayed on its cached input must reproduce its cached output."""
    with torch.no_grad():
        for layer, block in enumerate(adapter.blocks(model)):
            x = hidden[layer][:SELF_CHECK_SEQUENCES]
            expected = hidden[layer + 1][:SELF_CHECK_SEQUENCES]
            diff = (adapter.call(block, x) - expected).abs().max().item()
            if not diff <= SELF_CHECK_TOLERANCE * (1 + expected.abs().max().item()):
                raise RuntimeError(
                    f"self-check failed at step {step}, layer {layer}: the block replayed on its cached input "
                    f"differs from its cached output by {diff:.3g}. The block is not a pure function of its input "
                    "(dropout left on, state, extra arguments): peel models in eval mode, or describe the block "
                    "with an Adapter"
                )


def _nonfinite(model: nn.Module) -> list[str]:
    return [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]


def _rtn_params(adapter: Adapter, block: nn.Module, bits: list[float]) -> dict[str, Tensor]:
    """Block parameters stacked once per bit-width, linear weights round-to-nearest quantized."""
    quantized = set(adapter.quantized_weights(block))
    return {
        name: torch.stack([quantize(p, b) if name in quantized else p for b in bits])
        for name, p in block.named_parameters()
    }


def _headroom_lr(source: _Source) -> tuple[float, str]:
    if source.run is not None:
        final = source.run.final_lr
        return min(HEADROOM_LR, final / 3), f"min(1e-4, final training rate {final:g} / 3)"
    return HEADROOM_LR, "default 1e-4 (final training rate unknown)"


def _reference_file(folder: Path, step: int, layer: int) -> Path:
    return folder / f"step_{step:07d}" / f"layer_{layer:03d}.safetensors"


def _reference_key(bits: float, permutation: int, name: str) -> str:
    return f"bits={bits:g}/permutation={permutation}/{name}"


def _export(folder: Path, solution: Solution, config: PeelConfig, step: int, layer: int) -> None:
    """Write the effective weights of every reference of one layer to one safetensors file."""
    P = len(config.permutations)
    tensors = {
        _reference_key(b, p, name): value[i * P + j].contiguous()
        for name, value in solution.params.items()
        for i, b in enumerate(config.bits)
        for j, p in enumerate(config.permutations)
    }
    meta = {"step": str(step), "layer": str(layer), "view": config.view, "peel": json.dumps(config.to_dict())}
    with atomic_path(_reference_file(folder, step, layer)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def splice(model: nn.Module, references: str | Path, *, step: int, layer: int, permutation: int, bits: float) -> nn.Module:
    """A copy of ``model`` with block ``layer`` replaced by an exported reference.

    Parameters
    ----------
    model : nn.Module
        The checkpoint the reference was solved for (left unchanged).
    references : str or Path
        Folder given as ``peel(..., references=...)``.
    step, layer, permutation : int
        Which reference.
    bits : float
        Its bit-width; the weights are already quantized and are used as stored.

    Returns
    -------
    nn.Module
        The spliced copy, in eval mode.
    """
    path = _reference_file(Path(references), step, layer)
    if not path.is_file():
        raise FileNotFoundError(f"no exported reference for step {step}, layer {layer} under {str(references)!r}")
    prefix = _reference_key(check_bits(bits), permutation, "")
    with safe_open(str(path), framework="pt") as fh:
        state = {key[len(prefix) :]: fh.get_tensor(key) for key in fh.keys() if key.startswith(prefix)}
    if not state:
        raise ValueError(f"{str(path)!r} holds no reference for bits={bits:g}, permutation={permutation}")
    adapter = adapter_for(model)
    spliced = copy.deepcopy(model).eval()
    block = adapter.blocks(spliced)[layer]
    block.load_state_dict(state)
    adapter.disable_quantization(block)
    return spliced


def _attrs(config: PeelConfig, source: _Source, corpus: Corpus, model: nn.Module, adapter: Adapter, lr: float,
           lr_source: str, n_ctx: int, calib: int, evaluation: int) -> dict[str, Any]:
    model_config = getattr(model, "config", None)
    fault = source.run.train_config.fault if source.run else None
    return {
        "peelnb_version": __version__,
        "torch_version": str(torch.__version__),
        "model": json.dumps({"adapter": adapter.name, "class": type(model).__name__,
                             "config": model_config.to_dict() if hasattr(model_config, "to_dict") else None}),
        "source": source.description,
        "fault": str(fault) if fault else "none",
        "view": config.view,
        "target": config.target,
        "init": config.init,
        "solver": "adam",
        "solver_steps": config.solver_steps,
        "solver_lr": lr,
        "solver_lr_source": lr_source,
        "solver_batch": config.batch_size,
        "selection_fraction": config.selection_fraction if config.selects_snapshot else 0.0,
        "selection_every": config.selection_every if config.selects_snapshot else 0,
        "n_ctx": n_ctx,
        "calib_tokens": calib,
        "eval_tokens": evaluation,
        "corpus": corpus.name,
        "seed": config.seed,
        "peel_config": json.dumps(config.to_dict()),
    }


_SETTINGS = ("view", "target", "init", "solver_steps", "solver_lr", "solver_batch", "selection_fraction",
             "selection_every", "n_ctx", "calib_tokens", "eval_tokens", "corpus", "seed", "model", "source")


def _resume(path: Path, fresh: xr.Dataset) -> xr.Dataset:
    """``fresh`` with the steps already computed in ``path`` filled in; a clear error if settings differ."""
    old = results.open(path)
    differ = [k for k in _SETTINGS if old.attrs.get(k) != fresh.attrs.get(k)]
    for dim in ("layer", "permutation", "bits"):
        if not np.array_equal(old[dim].values, fresh[dim].values):
            differ.append(dim)
    if differ:
        raise ValueError(
            f"{str(path)!r} holds a peel with other settings ({', '.join(differ)}): "
            "choose another output path or delete it"
        )
    common = [s for s in old["step"].values if s in fresh["step"].values]
    merged = fresh.copy(deep=True)
    for name in [*results.VARIABLES, "checkpoint_sha256"]:
        merged[name].loc[dict(step=common)] = old[name].sel(step=common)
    merged.attrs["created"] = old.attrs.get("created", fresh.attrs["created"])
    return merged


def _done(ds: xr.Dataset, step: int) -> bool:
    return bool(ds["loss_ref"].sel(step=step).notnull().all())


def peel(
    checkpoints: Any,
    data: Any = None,
    *,
    view: str = "replace",
    target: str | None = None,
    init: str | None = None,
    bits: tuple[float, ...] = (1.0, 1.58, 4.0, 32.0),
    permutations: int | tuple[int, ...] = 3,
    layers: tuple[int, ...] | None = None,
    solver_steps: int = 50,
    lr: float | None = None,
    batch_size: int | None = None,
    calib_tokens: int = 32768,
    eval_tokens: int = 4096,
    selection_fraction: float = 0.25,
    selection_every: int = 10,
    seed: int = 0,
    out: str | Path | None = None,
    references: str | Path | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Peel every layer of every checkpoint: a verified reference per (step, layer, permutation, bits).

    Parameters
    ----------
    checkpoints : str, Path, Run or mapping
        A run folder (written by ``peelnb train``/``peelnb demo``) or a mapping
        ``{step: model or checkpoint path}``.
    data : None, str, Path, Tensor or Corpus
        Tokens: None uses the run's (bundled) corpus; a text file is encoded
        with the run's tokenizer; a 1-D tensor of token ids is split
        deterministically into calibration and held-out parts.
    view : {"replace", "headroom"}
        ``replace`` (default): a fresh block fitted to the layer's own output;
        a layer it matches is under-optimized. ``headroom``: the trained layer
        optimized alone on the next-token loss; a positive gap is loss left on
        the table (the best snapshot, K = 0 included, is kept).
    target, init : str, optional
        Override the view's objective (``"output"``/``"task"``) or start
        (``"scratch"``/``"trained"``).
    bits : tuple of float
        Reference bit-widths (1, 1.58, 2, 3, 4, 8, 32).
    permutations : int or tuple of int
        Solver orderings; their spread is the noise floor.
    layers : tuple of int, optional
        Layers to peel (default all).
    solver_steps : int
        K, Adam steps per local solve.
    lr : float, optional
        Adam learning rate (default 3e-3 for replace; for headroom a third of
        the run's final training rate, at most 1e-4).
    batch_size : int, optional
        Calibration sequences per solver step (default 2 for the replace
        view, 8 for headroom).
    calib_tokens, eval_tokens : int
        Calibration tokens (training split; at least 10 x d_model) and
        held-out evaluation tokens.
    selection_fraction, selection_every : float, int
        Best-snapshot selection split and interval (``init="trained"`` only).
    seed : int
        Seeds sampling, shuffles and scratch inits; the same seed gives an
        identical Dataset.
    out : str or Path, optional
        netCDF file rewritten atomically, or ``.zarr`` store appended to, after every
        checkpoint; an existing one with the same settings is resumed (its steps are not recomputed).
    references : str or Path, optional
        Folder to export every reference's weights to (one safetensors file
        per step and layer); see `splice`.
    progress : bool
        Show a progress bar over the (step, layer, permutation, bits) grid.

    Returns
    -------
    xarray.Dataset
        The result of DESIGN.md §5, dims (step, layer, permutation, bits).

    Raises
    ------
    ValueError
        Bad settings, a layer out of range, too little data, a checkpoint
        that does not fit the model, or ``out`` holding another peel.
    FileNotFoundError
        A path that does not exist.

    Warns
    -----
    PeelWarning
        A checkpoint with NaN/inf weights: its cells are NaN, the rest is computed.
    """
    config = PeelConfig(
        view=view, target=target, init=init, bits=bits, permutations=permutations, layers=layers,
        solver_steps=solver_steps, lr=lr, batch_size=batch_size, calib_tokens=calib_tokens,
        eval_tokens=eval_tokens, selection_fraction=selection_fraction, selection_every=selection_every, seed=seed,
    )
    source = _source(checkpoints)
    first = source.load(source.steps[0])
    adapter = adapter_for(first.model)
    n_layer = len(adapter.blocks(first.model))
    layer_ids = list(config.layers) if config.layers is not None else list(range(n_layer))
    bad = [i for i in layer_ids if i >= n_layer]
    if bad:
        raise ValueError(f"layer index {bad[0]} is out of range: the model has {n_layer} layers (0..{n_layer - 1})")
    model_config = first.model.config
    n_ctx, d_model = model_config.n_ctx, model_config.d_model
    corpus = _corpus(data, source.run, model_config.vocab_size)
    corpus.check_context(n_ctx)
    if config.calib_tokens < 10 * d_model:
        raise ValueError(
            f"calib_tokens={config.calib_tokens} is below 10 x d_model = {10 * d_model}: a reference would fit "
            "noise; raise calib_tokens"
        )
    calib, evaluation = peel_windows(corpus, n_ctx, calib_tokens=config.calib_tokens,
                                     eval_tokens=config.eval_tokens, seed=config.seed)
    n_calib = calib.shape[0]
    n_select = max(1, round(config.selection_fraction * n_calib)) if config.selects_snapshot else 0
    fit, select = calib[: n_calib - n_select], calib[n_calib - n_select :]
    if config.target == "output" or lr is not None:
        solver_lr, lr_source = (lr, "given") if lr is not None else (REPLACE_LR, "replace default")
    else:
        solver_lr, lr_source = _headroom_lr(source)

    ds = results.new_dataset(
        source.steps, layer_ids, list(config.permutations), list(config.bits),
        attrs=_attrs(config, source, corpus, first.model, adapter, solver_lr, lr_source, n_ctx,
                     calib.shape[0] * n_ctx, evaluation.shape[0] * n_ctx),
        layer_names=[f"blocks.{i}" for i in layer_ids],
    )
    ds = ds.assign_coords(checkpoint_sha256=("step", np.full(len(source.steps), "", dtype="<U64")))
    if out is not None and Path(out).exists():
        ds = _resume(Path(out), ds)
    grid = len(source.steps) * len(layer_ids) * len(config.permutations) * len(config.bits)
    bar = tqdm(total=grid, desc="peel", unit="cell", disable=not progress, leave=False)
    seen_hashes: dict[str, int] = {}
    for step in source.steps:
        if _done(ds, step):
            bar.update(grid // len(source.steps))
            continue
        checkpoint = first if step == source.steps[0] else source.load(step)
        ds["checkpoint_sha256"].loc[dict(step=step)] = checkpoint.sha256
        if checkpoint.sha256 in seen_hashes:
            warnings.warn(
                f"checkpoints at steps {seen_hashes[checkpoint.sha256]} and {step} are byte-identical: "
                "their rows repeat the same model, not training dynamics",
                PeelWarning,
                stacklevel=2,
            )
        seen_hashes.setdefault(checkpoint.sha256, step)
        _peel_checkpoint(ds, checkpoint, adapter, config, layer_ids, fit, select, evaluation, solver_lr,
                         references, bar)
        if out is not None:
            results.save_step(ds, out, step)
    bar.close()
    return ds


def _peel_checkpoint(ds: xr.Dataset, checkpoint: Checkpoint, adapter: Adapter, config: PeelConfig,
                     layer_ids: list[int], fit: Tensor, select: Tensor, evaluation: Tensor, lr: float,
                     references: str | Path | None, bar: tqdm) -> None:
    """Fill the cells of one checkpoint in ``ds``."""
    step, model = checkpoint.step, checkpoint.model
    cells = len(layer_ids) * len(config.permutations) * len(config.bits)
    bad = _nonfinite(model)
    if bad:
        warnings.warn(
            f"checkpoint at step {step} has NaN/inf weights in {', '.join(bad[:3])}"
            f"{' and more' if len(bad) > 3 else ''}: its results are NaN",
            PeelWarning,
            stacklevel=3,
        )
        bar.update(cells)
        return
    model.eval().requires_grad_(False)
    started = time.perf_counter()
    hidden = {name: _capture(adapter, model, windows) for name, windows in
              (("fit", fit), ("select", select), ("eval", evaluation)) if windows.shape[0]}
    _self_check(adapter, model, hidden["eval"], step)
    tokens = {"fit": fit[:, 1:], "select": select[:, 1:], "eval": evaluation[:, 1:]}
    replay = _Replay(adapter, model)
    blocks = list(adapter.blocks(model))
    n_layer = len(blocks)
    h_eval = hidden["eval"]
    loss_model = replay.verify(n_layer, lambda x: x[None], h_eval[n_layer], tokens["eval"])[0].item()
    ds["loss_model"].loc[dict(step=step)] = loss_model
    n_calib_eval = min(fit.shape[0], max(1, evaluation.shape[0] // CALIB_EVAL_SHARE))
    P = len(config.permutations)
    for layer in layer_ids:
        block = blocks[layer]
        at = dict(step=step, layer=layer)
        x_eval, y_eval = h_eval[layer], h_eval[layer + 1]
        ds["loss_ablate"].loc[at] = replay.verify(layer + 1, lambda x: x[None], x_eval, tokens["eval"])[0].item()
        low = [b for b in config.bits if b != 32.0]
        if low:
            template, rtn = _unquantized(adapter, block), _rtn_params(adapter, block, low)
            loss_q, _ = replay.verify(layer + 1, lambda x: adapter.stacked_call(template, rtn, x.expand(len(low), *x.shape)),
                                      x_eval, tokens["eval"], candidates=len(low))
            ds["loss_model_q"].loc[dict(at, bits=low)] = loss_q.numpy()
        if 32.0 in config.bits:
            ds["loss_model_q"].loc[dict(at, bits=32.0)] = loss_model
        data = LayerData(
            hidden["fit"][layer], hidden["fit"][layer + 1], tokens["fit"],
            *((hidden["select"][layer], hidden["select"][layer + 1], tokens["select"])
              if "select" in hidden else (None, None, None)),
        )
        solution = solve(adapter, block, data, config, layer=layer, n_layer=n_layer, lr=lr,
                         downstream=lambda h, first=layer + 1: replay.logits(first, h))
        R = len(config.bits) * P

        def reference_outputs(x: Tensor, solution: Solution = solution) -> Tensor:
            return adapter.stacked_call(solution.template, solution.params, x.expand(R, *x.shape))

        loss_ref, err = replay.verify(layer + 1, reference_outputs, x_eval, tokens["eval"], candidates=R, trained=y_eval)
        loss_cal, _ = replay.verify(layer + 1, reference_outputs, hidden["fit"][layer][:n_calib_eval],
                                    tokens["fit"][:n_calib_eval], candidates=R)

        def grid(values: Tensor) -> np.ndarray:
            return values.double().view(len(config.bits), P).T.numpy()  # (permutation, bits)

        ds["loss_ref"].loc[at] = grid(loss_ref)
        ds["loss_ref_calib"].loc[at] = grid(loss_cal)
        ds["local_err"].loc[at] = grid(err)
        ds["solve_seconds"].loc[at] = solution.seconds / R
        if references is not None:
            _export(Path(references), solution, config, step, layer)
        bar.update(R)
    log.info("peeled step %d in %.1f s (held-out loss %.4f)", step, time.perf_counter() - started, loss_model)


def _unquantized(adapter: Adapter, block: nn.Module) -> nn.Module:
    template = copy.deepcopy(block)
    adapter.disable_quantization(template)
    return template
