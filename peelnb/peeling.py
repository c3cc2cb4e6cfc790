"""Peel checkpoints: capture, local solves, verification; fills the result Dataset.

Two separable steps do the work. `capture_checkpoint` runs one checkpoint over
calibration and evaluation tokens with hooks that keep each block's input and
its full call (`peelnb.adapters.capture`), and checks that every trained block
replayed on its cached input reproduces its cached output. `peel_layer` then
solves the references of all (``permutation``, ``bits``) pairs of one layer
together (`peelnb.solver`) and verifies them by splicing them into the
checkpoint: their outputs go through the downstream blocks, replayed with
their captured arguments, and the head, never through the layers below.
`peel` drives the two over every checkpoint and layer and fills the Dataset.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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

from . import __version__, memory, results
from . import baselines as _baselines
from ._io import atomic_path
from .adapters import Adapter, adapter_for
from .adapters.capture import CHUNK_TOKENS, BlockCall, Captured, capture
from .checkpoints import Checkpoint
from .config import PeelConfig, check_bits
from .data import Corpus, random_windows, seeded_generator, spread_windows
from .quant import quantize
from .solver import LayerData, Solution, solve
from .sources import Source, checkpoint_source, corpus_for

log = logging.getLogger(__name__)
memory_log = logging.getLogger("peelnb.memory")
"""Says before each peel what memory it will use (INFO); the CLI shows it."""

REPLACE_LR = 3e-3
HEADROOM_LR = 1e-4
SELF_CHECK_SEQUENCES = 4
SELF_CHECK_TOLERANCE = 1e-4
LOGIT_BYTES = 2**28
"""Logits of one verification chunk stay under this size (256 MiB): fewer tokens per chunk for large vocabularies."""
CALIB_EVAL_SHARE = 4
"""``loss_ref_calib`` is measured on a quarter as many (fitted) calibration tokens as evaluation tokens."""
_CALIB_KEY = 11
SPLITS = ("fit", "select", "eval")


class PeelWarning(UserWarning):
    """A checkpoint or layer peelnb could not compute; its cells are NaN."""


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


LayerOut = Callable[[Tensor, Tensor], Tensor]
"""Maps a layer's inputs (n, T, C) of the sequences ``index`` (n,) to R candidate outputs (R, n, T, C)."""


def _compute_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def verify_tokens(vocab_size: int) -> int:
    """Tokens per verification chunk: `CHUNK_TOKENS`, fewer when the logits would exceed `LOGIT_BYTES`."""
    return max(1, min(CHUNK_TOKENS, LOGIT_BYTES // (4 * vocab_size)))


class _Replay:
    """The frozen network from a layer boundary on: blocks replayed with their captured calls, head, loss."""

    def __init__(self, adapter: Adapter, model: nn.Module, vocab_size: int) -> None:
        self.adapter = adapter
        self.model = model
        self.blocks = list(adapter.blocks(model))
        self.dtype = _compute_dtype(model)
        self.chunk_tokens = verify_tokens(vocab_size)

    def logits(self, first: int, h: Tensor, calls: Sequence[BlockCall], index: Tensor) -> Tensor:
        """Logits of hidden states ``h`` (N, T, C) of the sequences ``index`` (N,) entering block ``first``."""
        for i in range(first, len(self.blocks)):
            h = self.adapter.call(self.blocks[i], h, calls[i].bind(index))
        return self.adapter.head(self.model, h)

    @torch.no_grad()
    def verify(self, first: int, layer_out: LayerOut, x: Tensor, tokens: Tensor, calls: Sequence[BlockCall], *,
               candidates: int = 1, trained: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Splice candidate outputs into the network and score them, chunk by chunk.

        Parameters
        ----------
        first : int
            Block that receives the candidates' outputs (``L``: the head only).
        layer_out : callable
            Maps inputs (n, T, C) of the sequences ``index`` (n,) to the candidates' outputs (R, n, T, C).
        x : Tensor
            (N, T, C) inputs of the replaced layer (any storage dtype).
        tokens : Tensor
            (N, T) next-token targets.
        calls : sequence of BlockCall
            How each block was called for these N sequences.
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
        step = max(1, self.chunk_tokens // (R * T))
        for start in range(0, N, step):
            chunk = slice(start, start + step)
            xc = x[chunk].to(self.dtype)
            index = torch.arange(start, start + xc.shape[0])
            out = layer_out(xc, index)  # (R, n, T, C)
            logits = self.logits(first, out.flatten(0, 1), calls, index.repeat(R))
            ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens[chunk].repeat(R, 1).flatten(), reduction="none")
            loss_sum += ce.view(R, -1).double().sum(dim=1)
            if trained is not None:
                y = trained[chunk].to(self.dtype)
                err_sum += (out - y).pow(2).flatten(1).sum(dim=1).double()
                contribution += (y - xc).pow(2).sum().item()
        err = (err_sum / max(contribution, 1e-24)).sqrt() if trained is not None else None
        return loss_sum / (N * T), err


def _identity(x: Tensor, index: Tensor) -> Tensor:
    return x[None]


def _capture(adapter: Adapter, model: nn.Module, windows: Tensor, keep: Sequence[int] | None = None,
             dtype: torch.dtype | None = None) -> Captured:
    """[h_0, ..., h_L] of ``windows`` (N, T + 1), each (N, T, C), and every block's call, from hooked forward passes.

    Hidden states are copied into preallocated storage as the forward pass
    produces them, so the pass frees its activations as it would unhooked.
    Only the hidden states in ``keep`` are stored (default all), in ``dtype``.
    """
    return capture(adapter, model, windows, keep=keep, dtype=dtype)


def _self_check(adapter: Adapter, model: nn.Module, hidden: Captured, step: int) -> None:
    """Each trained block replayed on its cached input (and call) must reproduce its cached output."""
    dtype = _compute_dtype(model)
    index = torch.arange(min(SELF_CHECK_SEQUENCES, next(h for h in hidden.hidden if h is not None).shape[0]))
    with torch.no_grad():
        for layer, block in enumerate(adapter.blocks(model)):
            if hidden[layer] is None or hidden[layer + 1] is None:
                continue
            x = hidden[layer][index].to(dtype)
            expected = hidden[layer + 1][index]
            tolerance = max(SELF_CHECK_TOLERANCE, 4 * torch.finfo(expected.dtype).eps)
            got = adapter.call(block, x, hidden.calls[layer].bind(index)).to(expected.dtype)
            diff = (got.float() - expected.float()).abs().max().item()
            if not diff <= tolerance * (1 + expected.float().abs().max().item()):
                raise RuntimeError(
                    f"self-check failed at step {step}, layer {layer}: the block replayed on its cached input "
                    f"differs from its cached output by {diff:.3g}. The block is not a pure function of its input "
                    "and captured arguments (dropout left on, state, a cache): peel models in eval mode, or "
                    "describe the block with an Adapter"
                )


def _nonfinite(model: nn.Module) -> list[str]:
    return [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]


def _rtn_params(adapter: Adapter, block: nn.Module, bits: list[float]) -> dict[str, Tensor]:
    """Block parameters stacked once per bit-width, linear weights round-to-nearest quantized (per output row)."""
    quantized = set(adapter.quantized_weights(block))
    transposed = set(adapter.transposed_weights(block))

    def rtn(name: str, p: Tensor, b: float) -> Tensor:
        if name not in quantized:
            return p
        return quantize(p.transpose(-2, -1), b).transpose(-2, -1) if name in transposed else quantize(p, b)

    return {name: torch.stack([rtn(name, p, b) for b in bits]) for name, p in block.named_parameters()}


def _headroom_lr(source: Source) -> tuple[float, str]:
    if source.final_lr is not None:
        final = source.final_lr
        return min(HEADROOM_LR, final / 3), f"min(1e-4, final training rate {final:g} / 3)"
    return HEADROOM_LR, "default 1e-4 (final training rate unknown)"


@dataclass
class CheckpointCapture:
    """What the local problems of one checkpoint need, captured once (`capture_checkpoint`).

    Attributes
    ----------
    step : int
        The checkpoint's training step.
    adapter : Adapter
        The model family.
    model : nn.Module
        The checkpoint, in eval mode.
    splits : dict of str to Captured
        Hidden states and block calls of the ``"fit"``, ``"select"`` (when
        the best snapshot is selected) and ``"eval"`` sequences.
    tokens : dict of str to Tensor
        Next-token targets (N, T) of each split.
    replay : _Replay
        The frozen network, to verify candidates.
    """

    step: int
    adapter: Adapter
    model: nn.Module
    splits: dict[str, Captured]
    tokens: dict[str, Tensor]
    replay: _Replay

    @property
    def n_layer(self) -> int:
        """Depth of the model."""
        return len(self.replay.blocks)

    def loss_model(self) -> float:
        """Held-out loss of the checkpoint as trained (needs h_L of the evaluation split)."""
        h = self.splits["eval"]
        return self.replay.verify(self.n_layer, _identity, h[self.n_layer], self.tokens["eval"], h.calls)[0].item()


def capture_checkpoint(adapter: Adapter, model: nn.Module, step: int, windows: dict[str, Tensor], *,
                       vocab_size: int, layers: Sequence[int] | None = None,
                       dtype: torch.dtype | None = None) -> CheckpointCapture:
    """Capture one checkpoint for the given layers, and self-check the replay.

    Parameters
    ----------
    adapter : Adapter
        The model family.
    model : nn.Module
        The checkpoint, in eval mode with gradients off.
    step : int
        Its training step (for messages).
    windows : dict of str to Tensor
        Token windows (N, T + 1) of the ``"fit"``, ``"select"`` and ``"eval"`` splits (empty ones are skipped).
    vocab_size : int
        The model's vocabulary (sizes the verification chunks).
    layers : sequence of int, optional
        Layers to keep hidden states for (h_l and h_{l+1}); default all. The
        evaluation split also keeps h_L, for the model's own loss.
    dtype : torch.dtype, optional
        Storage dtype of the hidden states (default the model's).

    Returns
    -------
    CheckpointCapture

    Raises
    ------
    RuntimeError
        If a trained block replayed on its cached input does not reproduce its cached output.
    """
    n_layer = len(adapter.blocks(model))
    keep = sorted(memory.kept_hidden(list(range(n_layer)) if layers is None else list(layers)))
    splits = {
        name: _capture(adapter, model, w, keep=sorted({*keep, n_layer}) if name == "eval" else keep, dtype=dtype)
        for name, w in windows.items() if w.shape[0]
    }
    _self_check(adapter, model, splits["eval"], step)
    tokens = {name: w[:, 1:] for name, w in windows.items() if w.shape[0]}
    return CheckpointCapture(step, adapter, model, splits, tokens, _Replay(adapter, model, vocab_size))


@dataclass(frozen=True)
class LayerResult:
    """The cells of one (step, layer): baselines and every reference, verified (`peel_layer`).

    Arrays are (permutation, bits); ``loss_model_q`` maps each bit-width below
    32 to the round-to-nearest loss. ``solution`` is None when a Dask worker
    sends the result back without the references' weights (nothing to export).
    """

    layer: int
    loss_ablate: float
    loss_model_q: dict[float, float]
    loss_ref: np.ndarray
    loss_ref_calib: np.ndarray
    local_err: np.ndarray
    solve_seconds: float
    solution: Solution | None


def peel_layer(captured: CheckpointCapture, layer: int, config: PeelConfig, *, lr: float) -> LayerResult:
    """Solve and verify every (permutation, bits) reference of one layer of a captured checkpoint.

    Parameters
    ----------
    captured : CheckpointCapture
        The checkpoint, captured with this layer's hidden states.
    layer : int
        The layer.
    config : PeelConfig
        View, bits, permutations, solver settings, seed.
    lr : float
        The solver's learning rate.

    Returns
    -------
    LayerResult
    """
    adapter, replay, tokens = captured.adapter, captured.replay, captured.tokens
    fit, ev = captured.splits["fit"], captured.splits["eval"]
    select = captured.splits.get("select")
    block = replay.blocks[layer]
    n_layer = captured.n_layer
    x_eval, y_eval = ev[layer], ev[layer + 1]
    loss_ablate = replay.verify(layer + 1, _identity, x_eval, tokens["eval"], ev.calls)[0].item()
    low = [b for b in config.bits if b != 32.0]
    loss_q: dict[float, float] = {}
    if low:
        template, rtn = _unquantized(adapter, block), _rtn_params(adapter, block, low)

        def rtn_outputs(x: Tensor, index: Tensor) -> Tensor:
            return adapter.stacked_call(template, rtn, x.expand(len(low), *x.shape), ev.calls[layer].bind(index))

        values, _ = replay.verify(layer + 1, rtn_outputs, x_eval, tokens["eval"], ev.calls, candidates=len(low))
        loss_q = dict(zip(low, values.tolist()))
    data = LayerData(
        fit[layer], fit[layer + 1], tokens["fit"],
        *((select[layer], select[layer + 1], tokens["select"]) if select is not None else (None, None, None)),
        fit_call=fit.calls[layer],
        **({"select_call": select.calls[layer]} if select is not None else {}),
    )
    select_calls = select.calls if select is not None else None

    def downstream(h: Tensor, index: Tensor, calls: Sequence[BlockCall] = fit.calls) -> Tensor:
        return replay.logits(layer + 1, h, calls, index)

    solution = solve(adapter, block, data, config, layer=layer, n_layer=n_layer, lr=lr, downstream=downstream,
                     select_downstream=(lambda h, index: downstream(h, index, select_calls)) if select else None)
    R, P = len(config.bits) * len(config.permutations), len(config.permutations)

    def reference_outputs(x: Tensor, index: Tensor, calls: Sequence[BlockCall] = ev.calls) -> Tensor:
        return adapter.stacked_call(solution.template, solution.params, x.expand(R, *x.shape),
                                    calls[layer].bind(index))

    loss_ref, err = replay.verify(layer + 1, reference_outputs, x_eval, tokens["eval"], ev.calls, candidates=R,
                                  trained=y_eval)
    n_calib_eval = min(fit[layer].shape[0], max(1, x_eval.shape[0] // CALIB_EVAL_SHARE))
    loss_cal, _ = replay.verify(layer + 1, lambda x, i: reference_outputs(x, i, fit.calls), fit[layer][:n_calib_eval],
                                tokens["fit"][:n_calib_eval], fit.calls, candidates=R)

    def grid(values: Tensor) -> np.ndarray:
        return values.double().view(len(config.bits), P).T.numpy()  # (permutation, bits)

    return LayerResult(layer, loss_ablate, loss_q, grid(loss_ref), grid(loss_cal), grid(err), solution.seconds / R,
                       solution)


def warn_nonfinite(model: nn.Module, step: int, *, stacklevel: int = 2) -> bool:
    """Warn (`PeelWarning`) and return True when the checkpoint has NaN/inf weights: its cells stay NaN."""
    bad = _nonfinite(model)
    if bad:
        warnings.warn(
            f"checkpoint at step {step} has NaN/inf weights in {', '.join(bad[:3])}"
            f"{' and more' if len(bad) > 3 else ''}: its results are NaN",
            PeelWarning,
            stacklevel=stacklevel,
        )
    return bool(bad)


def checkpoint_layers(adapter: Adapter, model: nn.Module, step: int, windows: dict[str, Tensor],
                      passes: Sequence[Sequence[int]], config: PeelConfig, *, lr: float, vocab_size: int,
                      dtype: torch.dtype) -> Iterator[tuple[float, LayerResult]]:
    """Peel the layers of one checkpoint, one capture per pass: ``(loss_model, result)`` per layer, in order.

    The serial peel and each Dask task (`peelnb.cluster`) go through this, so
    both compute every cell the same way. ``model`` is in eval mode with
    gradients off.
    """
    loss_model = None
    for layers in passes:
        captured = capture_checkpoint(adapter, model, step, windows, vocab_size=vocab_size, layers=layers,
                                      dtype=dtype)
        if loss_model is None:
            loss_model = captured.loss_model()
        for layer in layers:
            yield loss_model, peel_layer(captured, layer, config, lr=lr)
        del captured


def _write_layer(ds: xr.Dataset, step: int, result: LayerResult, loss_model: float) -> None:
    at = dict(step=step, layer=result.layer)
    ds["loss_ablate"].loc[at] = result.loss_ablate
    for bits, value in result.loss_model_q.items():
        ds["loss_model_q"].loc[dict(at, bits=bits)] = value
    if 32.0 in ds["bits"].values:
        ds["loss_model_q"].loc[dict(at, bits=32.0)] = loss_model
    ds["loss_ref"].loc[at] = result.loss_ref
    ds["loss_ref_calib"].loc[at] = result.loss_ref_calib
    ds["local_err"].loc[at] = result.local_err
    ds["solve_seconds"].loc[at] = result.solve_seconds


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with gradients off; every module's mode and parameter's flag restored on leaving."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode
        for param, flag in flags:
            param.requires_grad_(flag)


def _unquantized(adapter: Adapter, block: nn.Module) -> nn.Module:
    template = copy.deepcopy(block)
    adapter.disable_quantization(template)
    return template


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


def splice(model: nn.Module, references: str | Path, *, step: int, layer: int, permutation: int,
           bits: float) -> nn.Module:
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


def _attrs(config: PeelConfig, source: Source, corpus: Corpus, model: nn.Module, adapter: Adapter, lr: float,
           lr_source: str, n_ctx: int, calib: int, evaluation: int, dtype: torch.dtype,
           plan: memory.MemoryPlan, budget: int | None) -> dict[str, Any]:
    model_config = getattr(model, "config", None)
    fault = source.run.train_config.fault if source.run else None
    attrs = {
        "peelnb_version": __version__,
        "torch_version": str(torch.__version__),
        "model": json.dumps({"adapter": adapter.name, "class": type(model).__name__,
                             "config": model_config.to_dict() if hasattr(model_config, "to_dict") else None},
                            default=str),
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
        "capture_dtype": str(dtype).removeprefix("torch."),
        "memory_estimate_bytes": plan.total_bytes,
        "memory_cache_bytes": plan.cache_bytes,
        "capture_passes": len(plan.passes),
        "peel_config": json.dumps(config.to_dict()),
    }
    if budget is not None:
        attrs["memory_budget_bytes"] = budget
    return attrs


_SETTINGS = ("view", "target", "init", "solver_steps", "solver_lr", "solver_batch", "selection_fraction",
             "selection_every", "n_ctx", "calib_tokens", "eval_tokens", "corpus", "seed", "model", "source",
             "capture_dtype", "baselines")
_LEGACY = {"capture_dtype": "float32"}
"""What results written before a setting existed used."""


def _shown(value: object) -> str:
    """A setting as the resume error shows it: plain numbers, long lists shortened."""
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(map(str, value[:3]))}, ..., {value[-1]}] ({len(value)} values)"
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _resume(path: Path, fresh: xr.Dataset) -> xr.Dataset:
    """``fresh`` with the steps already computed in ``path`` filled in; a clear error if settings differ."""
    old = results.open(path)
    pairs = {k: (old.attrs.get(k, _LEGACY.get(k)), fresh.attrs.get(k)) for k in _SETTINGS}
    pairs.update({d: (old[d].values.tolist(), fresh[d].values.tolist()) for d in ("layer", "permutation", "bits")})
    differ = {k: (a, b) for k, (a, b) in pairs.items() if a != b}
    if differ:
        detail = "; ".join(f"{k}: stored {_shown(a)}, requested {_shown(b)}" for k, (a, b) in differ.items())
        raise ValueError(
            f"{str(path)!r} holds a peel with other settings ({detail}): to resume it, peel with the stored "
            "settings; otherwise choose another output path or delete it"
        )
    common = [s for s in old["step"].values if s in fresh["step"].values]
    merged = fresh.copy(deep=True)
    for name in [*results.VARIABLES, *[n for n in results.OPTIONAL_VARIABLES if n in fresh], "checkpoint_sha256"]:
        merged[name].loc[dict(step=common)] = old[name].sel(step=common)
    merged.attrs["created"] = old.attrs.get("created", fresh.attrs["created"])
    return merged


def _done(ds: xr.Dataset, step: int) -> bool:
    return bool(ds["loss_ref"].sel(step=step).notnull().all())


def class_name(cls: type) -> str:
    """``module.QualifiedName`` of a model class: compares classes across processes."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_architecture(first: str, first_step: int, architecture: str, step: int) -> None:
    if architecture != first:
        raise ValueError(
            f"the checkpoints mix architectures: {first.rsplit('.', 1)[-1]} (step {first_step}) and "
            f"{architecture.rsplit('.', 1)[-1]} (step {step}); peel each architecture's checkpoints separately"
        )


def _note_hash(ds: xr.Dataset, step: int, sha256: str, seen: dict[str, int]) -> None:
    """Record a checkpoint's hash; warn when an earlier step had the same bytes."""
    ds["checkpoint_sha256"].loc[dict(step=step)] = sha256
    if sha256 in seen:
        warnings.warn(
            f"checkpoints at steps {seen[sha256]} and {step} are byte-identical: "
            "their rows repeat the same model, not training dynamics",
            PeelWarning,
            stacklevel=3,
        )
    seen.setdefault(sha256, step)


def _window(n_ctx: int | None, dims: Any) -> int:
    """The peel's context window: ``n_ctx`` if given (within the model's), else the adapter's default."""
    if n_ctx is None:
        return dims.default_ctx
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx <= 0:
        raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    if dims.n_ctx is not None and n_ctx > dims.n_ctx:
        raise ValueError(f"n_ctx={n_ctx} exceeds the model's context of {dims.n_ctx} tokens: lower n_ctx")
    return int(n_ctx)


def _layer_names(adapter: Adapter, model: nn.Module, layers: list[int]) -> list[str]:
    """Module paths of the blocks (``transformer.h.3``), ``blocks.<l>`` where the model does not say."""
    paths = {id(module): name for name, module in model.named_modules()}
    blocks = adapter.blocks(model)
    return [paths.get(id(blocks[i]), f"blocks.{i}") for i in layers]


def _plan(adapter: Adapter, model: nn.Module, layers: list[int], windows: dict[str, Tensor], config: PeelConfig,
          d_model: int, vocab_size: int, dtype: torch.dtype, budget: int | None) -> memory.MemoryPlan:
    T = windows["eval"].shape[1] - 1
    item = torch.empty((), dtype=dtype).element_size()
    n_all = sum(w.shape[0] for w in windows.values())
    blocks = adapter.blocks(model)
    block_bytes = max(sum(p.numel() * p.element_size() for p in blocks[i].parameters()) for i in layers)
    R = len(config.bits) * len(config.permutations)
    return memory.plan(
        layers, len(blocks), hidden_bytes=n_all * T * d_model * item,
        eval_hidden_bytes=windows["eval"].shape[0] * T * d_model * item,
        model_bytes=sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
        solver_bytes=R * block_bytes * memory.ADAM_COPIES,
        verify_bytes=verify_tokens(vocab_size) * vocab_size * 4 * memory.LOGIT_COPIES, budget=budget,
    )


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
    solver_steps: int | None = None,
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
    adapter: Adapter | None = None,
    revisions: Sequence[str] | None = None,
    tokenizer: Any = None,
    n_ctx: int | None = None,
    capture_dtype: str = "float32",
    memory_budget: int | str | None = None,
    baselines: bool = False,
    client: Any = None,
) -> xr.Dataset:
    """Peel every layer of every checkpoint: a verified reference per (step, layer, permutation, bits).

    Parameters
    ----------
    checkpoints : str, Path, Run, mapping or nn.Module
        A run folder (written by ``peelnb train``/``peelnb demo``); a mapping
        ``{step: model, checkpoint file or Hugging Face model folder}``; a
        Hugging Face causal LM (``AutoModelForCausalLM``); a Hugging Face
        model folder; a folder of checkpoint folders (``checkpoint-500/`` as
        the Trainer writes them, ``step1000/``: the step is read from the
        names); or a model folder or hub model id with ``revisions``.
    data : None, str, Path, Tensor or Corpus
        Tokens: None uses the run's (bundled) corpus, or for a Hugging Face
        model the bundled text encoded with its tokenizer; a text file is
        encoded with the run's tokenizer or ``tokenizer``; a 1-D tensor of
        token ids is split deterministically into calibration and held-out
        parts.
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
    solver_steps : int, optional
        K, Adam steps per local solve (default 25 for the replace view, 50
        for headroom: the planted-fault suite's evidence, docs/detection.md).
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
    adapter : Adapter, optional
        Describes a model family peelnb does not recognize (see
        ``docs/adapters.md``); default: chosen from the model.
    revisions : list of str, optional
        With a hub model id: revisions read from the local Hugging Face cache
        (never downloaded); with a folder: its subfolders. Steps are read from
        the names (``step1000``, ``checkpoint-1000``).
    tokenizer : tokenizer or str or Path, optional
        A Hugging Face tokenizer (or its folder) to encode a text ``data``
        with; default the one saved with the model, if any.
    n_ctx : int, optional
        Context window of the peel (default the model's, at most 128 tokens
        for Hugging Face models).
    capture_dtype : {"float32", "bfloat16", "float16"}
        Storage dtype of the cached hidden states (computation stays in the
        model's dtype).
    memory_budget : int or str, optional
        Bytes (or a size such as ``"2GB"``) the cached hidden states may
        take; beyond it layers are peeled in passes, each re-capturing only
        the hidden states it needs. The results are identical.
    baselines : bool
        Also record the usual per-layer signals, dims (step, layer):
        ``grad_norm``, ``weight_change`` and ``alpha`` (`peelnb.baselines`).
    client : dask.distributed.Client, optional
        Peel on a Dask cluster (``pip install "peelnb[dask]"``): each
        checkpoint is loaded and captured once per worker, its layers split
        among the workers (`peelnb.cluster`, ``docs/dask.md``). The Dataset
        is identical to the serial one but for the timings (``solve_seconds``).
        Default: in this process.

    Returns
    -------
    xarray.Dataset
        The result of DESIGN.md §5, dims (step, layer, permutation, bits).

    Raises
    ------
    ValueError
        Bad settings, a layer out of range, too little data, data outside
        the model's vocabulary, checkpoints mixing architectures, a
        checkpoint that does not fit the model, or ``out`` holding another peel.
    TypeError
        A model peelnb has no adapter for (the message says how to describe it).
    FileNotFoundError
        A path, or a revision in the local Hugging Face cache, that does not exist.
    ImportError
        A Hugging Face path without ``transformers`` (``pip install "peelnb[hf]"``), or a
        ``client`` without ``dask.distributed`` (``pip install "peelnb[dask]"``).

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
    dtype = memory.capture_dtype(capture_dtype)
    budget = None if memory_budget is None else memory.parse_bytes(memory_budget)
    if adapter is not None and not isinstance(adapter, Adapter):
        raise TypeError(f"adapter must be an instance of a peelnb.adapters.Adapter subclass, got {adapter!r}")
    source = checkpoint_source(checkpoints, revisions=revisions)
    first: Checkpoint | None = source.load(source.steps[0])
    model = first.model
    family = adapter if adapter is not None else adapter_for(model)
    n_layer = len(family.blocks(model))
    if n_layer == 0:
        raise TypeError(f"{type(family).__name__} found no decoder blocks in {type(model).__name__}")
    layer_ids = list(config.layers) if config.layers is not None else list(range(n_layer))
    bad = [i for i in layer_ids if i >= n_layer]
    if bad:
        raise ValueError(f"layer index {bad[0]} is out of range: the model has {n_layer} layers (0..{n_layer - 1})")
    dims = family.dims(model)
    window = _window(n_ctx, dims)
    corpus = corpus_for(data, source, dims.vocab_size, tokenizer=tokenizer)
    corpus.check_context(window)
    if config.calib_tokens < 10 * dims.d_model:
        raise ValueError(
            f"calib_tokens={config.calib_tokens} is below 10 x d_model = {10 * dims.d_model}: a reference would fit "
            "noise; raise calib_tokens"
        )
    calib, evaluation = peel_windows(corpus, window, calib_tokens=config.calib_tokens,
                                     eval_tokens=config.eval_tokens, seed=config.seed)
    n_calib = calib.shape[0]
    n_select = max(1, round(config.selection_fraction * n_calib)) if config.selects_snapshot else 0
    windows = {"fit": calib[: n_calib - n_select], "select": calib[n_calib - n_select :], "eval": evaluation}
    if config.target == "output" or lr is not None:
        solver_lr, lr_source = (lr, "given") if lr is not None else (REPLACE_LR, "replace default")
    else:
        solver_lr, lr_source = _headroom_lr(source)
    plan = _plan(family, model, layer_ids, windows, config, dims.d_model, dims.vocab_size, dtype, budget)
    memory_log.info(plan.describe())

    ds = results.new_dataset(
        source.steps, layer_ids, list(config.permutations), list(config.bits),
        attrs=_attrs(config, source, corpus, model, family, solver_lr, lr_source, window,
                     calib.shape[0] * window, evaluation.shape[0] * window, dtype, plan, budget),
        layer_names=_layer_names(family, model, layer_ids), optional=_baselines.NAMES if baselines else (),
    )
    if baselines:
        ds.attrs["baselines"] = 1
    tracker = _baselines.Tracker(family, layer_ids, source.steps, lambda s: source.load(s).model) \
        if baselines else None
    ds = ds.assign_coords(checkpoint_sha256=("step", np.full(len(source.steps), "", dtype="<U64")))
    if out is not None and Path(out).exists():
        ds = _resume(Path(out), ds)
    architecture, first_step = class_name(type(model)), source.steps[0]
    del model
    grid = len(source.steps) * len(layer_ids) * len(config.permutations) * len(config.bits)
    bar = tqdm(total=grid, desc="peel", unit="cell", disable=not progress, leave=False)
    seen_hashes: dict[str, int] = {}
    if client is not None:
        from . import cluster

        todo = [s for s in source.steps if not _done(ds, s)]
        bar.update(grid // len(source.steps) * (len(source.steps) - len(todo)))
        del first
        job = cluster.Job(family, config, plan.passes, layer_ids, windows, solver_lr, dims.vocab_size, dtype,
                          export=references is not None, baselines=baselines)
        for outcome in cluster.peel_steps(client, source, todo, job, bar):
            _check_architecture(architecture, first_step, outcome.architecture, outcome.step)
            _note_hash(ds, outcome.step, outcome.sha256, seen_hashes)
            if outcome.loss_model is not None:
                ds["loss_model"].loc[dict(step=outcome.step)] = outcome.loss_model
            for result in outcome.layers:
                _write_layer(ds, outcome.step, result, outcome.loss_model)
                if references is not None:
                    _export(Path(references), result.solution, config, outcome.step, result.layer)
            if outcome.baselines is not None:
                _baselines.write(ds, outcome.step, outcome.baselines)
            if out is not None:
                results.save_step(ds, out, outcome.step)
        bar.close()
        return ds
    for step in source.steps:
        if _done(ds, step):
            bar.update(grid // len(source.steps))
            first = None
            continue
        checkpoint = first if first is not None and step == first_step else source.load(step)
        first = None
        _check_architecture(architecture, first_step, class_name(type(checkpoint.model)), step)
        _note_hash(ds, step, checkpoint.sha256, seen_hashes)
        with evaluating(checkpoint.model):
            _peel_checkpoint(ds, checkpoint, family, config, plan, windows, solver_lr, references, bar,
                             vocab_size=dims.vocab_size, dtype=dtype)
            if tracker is not None:
                _baselines.write(ds, step, tracker.measure(checkpoint.model, step, calib))
        del checkpoint
        if out is not None:
            results.save_step(ds, out, step)
    bar.close()
    return ds


def _peel_checkpoint(ds: xr.Dataset, checkpoint: Checkpoint, adapter: Adapter, config: PeelConfig,
                     plan: memory.MemoryPlan, windows: dict[str, Tensor], lr: float,
                     references: str | Path | None, bar: tqdm, *, vocab_size: int, dtype: torch.dtype) -> None:
    """Fill the cells of one checkpoint in ``ds``, one capture pass per group of layers of the plan."""
    step, model = checkpoint.step, checkpoint.model
    R = len(config.permutations) * len(config.bits)
    if warn_nonfinite(model, step, stacklevel=4):
        bar.update(R * sum(len(layers) for layers in plan.passes))
        return
    started = time.perf_counter()
    loss_model = math.nan
    for loss_model, result in checkpoint_layers(adapter, model, step, windows, plan.passes, config, lr=lr,
                                                vocab_size=vocab_size, dtype=dtype):
        ds["loss_model"].loc[dict(step=step)] = loss_model
        _write_layer(ds, step, result, loss_model)
        if references is not None:
            _export(Path(references), result.solution, config, step, result.layer)
        bar.update(R)
    log.info("peeled step %d in %.1f s (held-out loss %.4f)", step, time.perf_counter() - started, loss_model)
