"""Scale a peel out over a Dask cluster: ``peelnb.peel(..., client=client)``.

The unit of work is one (step, layer); the references of all (permutation,
bits) pairs of a layer are still solved together, batched. One task peels
one checkpoint, or a contiguous group of its layers: it loads the checkpoint
and captures it once, keeping only the hidden states of its own layers
(``capture_checkpoint(layers=...)``; more passes only under a
``memory_budget``, as serially). With at least as many checkpoints to peel as
workers, a task is a whole checkpoint: each checkpoint is loaded and captured
once in the whole cluster. With fewer, each checkpoint's layers are split
into just enough groups to keep every worker busy, and the groups of one
checkpoint are sent to different workers (a hint: Dask may still move a task
to balance the load). Earlier steps run first.

What travels, and what does not:

- to every worker once: the settings and the token windows (`Job`, a few
  hundred kB);
- to each task: a loader of its checkpoint (`peelnb.sources.Source.portable`),
  pickled once on the client and scattered once per step: a function and a
  path for run folders, checkpoint files and Hugging Face folders (the
  workers read them from a file system they share), or the model itself for
  models given as objects. Each task unpickles its own copy, so no task
  ever sees a model another task is hooking or switching to eval mode;
- never: the captured activations, the large part, which are computed on the
  worker from the checkpoint;
- back: the cells of each layer (a few floats per permutation and bit-width),
  the checkpoint's hash, and the references' weights when they are exported.

The client writes each step (``out=``, atomically) as soon as it and every
earlier step are complete, in step order, so a crash loses at most the steps
still computing and a re-run resumes from the file. When a task fails, the
steps before it still finish and are written, later ones are cancelled, and
the worker's exception is raised on the client, as the serial peel would
raise it. Warnings raised on a worker are raised again on the client.

Every cell is computed by the same code as in the serial peel
(`peelnb.peeling.checkpoint_layers`), so the Dataset is identical to the
serial one except ``solve_seconds`` (wall times) and the ``created``
attribute, given the same torch build and threads per task.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import _optional
from . import baselines as _baselines
from .adapters import Adapter
from .checkpoints import Checkpoint
from .config import PeelConfig
from .peeling import LayerResult, checkpoint_layers, class_name, evaluating, warn_nonfinite
from .sources import Source


@dataclass(frozen=True)
class Job:
    """What every task of one peel shares; sent to each worker once.

    Attributes
    ----------
    adapter : Adapter
        The model family.
    config : PeelConfig
        View, bits, permutations, solver settings, seed.
    passes : list of list of int
        Capture passes of the memory plan; a task keeps the layers of its group in each.
    layers : list of int
        Every layer the peel covers.
    windows : dict of str to Tensor
        Token windows of the ``"fit"``, ``"select"`` and ``"eval"`` splits.
    lr : float
        The solver's learning rate.
    vocab_size : int
        The model's vocabulary.
    dtype : torch.dtype
        Storage dtype of the captured hidden states.
    export : bool
        Whether the references' weights come back (``references=``).
    baselines : bool
        Whether the first group of each step also measures the baselines.
    """

    adapter: Adapter
    config: PeelConfig
    passes: list[list[int]]
    layers: list[int]
    windows: dict[str, Tensor]
    lr: float
    vocab_size: int
    dtype: torch.dtype
    export: bool = False
    baselines: bool = False

    @property
    def calibration(self) -> Tensor:
        """All calibration windows (fitted and selection), in the order `peel` drew them."""
        return torch.cat([self.windows["fit"], self.windows["select"]])


@dataclass
class StepOutcome:
    """What one checkpoint gave: the cells of its layers and what the client checks and records.

    Attributes
    ----------
    step : int
        The checkpoint's step.
    sha256 : str
        Hash of its tensors.
    architecture : str
        ``module.Class`` of the model.
    loss_model : float or None
        Its held-out loss (None when its weights are not finite).
    layers : list of LayerResult
        The peeled layers, in the peel's order.
    baselines : dict or None
        ``{name: {layer: value}}`` when baselines are measured.
    warnings : list of (type, str)
        Warnings raised while it was peeled.
    """

    step: int
    sha256: str
    architecture: str
    loss_model: float | None
    layers: list[LayerResult]
    baselines: dict[str, dict[int, float]] | None = None
    warnings: list[tuple[type[Warning], str]] = field(default_factory=list)


def groups_of(layers: Sequence[int], workers: int, steps: int) -> list[list[int]]:
    """The layer groups of each checkpoint: ``layers`` split into just enough contiguous groups for the workers.

    ``ceil(workers / steps)`` groups as equal as can be (at least one, at most one per layer).

    Examples
    --------
    >>> groups_of([0, 1, 2, 3, 4], workers=2, steps=1), groups_of([0, 1, 2], workers=4, steps=2)
    ([[0, 1, 2], [3, 4]], [[0, 1], [2]])
    >>> groups_of([0, 1, 2], workers=2, steps=10)
    [[0, 1, 2]]
    """
    n = max(1, min(-(-workers // max(steps, 1)), len(layers)))
    return [[int(x) for x in part] for part in np.array_split(np.asarray(layers, dtype=np.int64), n)]


def peel_group(job: Job, step: int, load: Callable[[], Checkpoint], layers: list[int],
               previous: Callable[[], Checkpoint] | None, measure: bool) -> StepOutcome:
    """One task, on a worker: load a checkpoint, capture it once for ``layers``, peel them.

    Parameters
    ----------
    job : Job
        The peel's shared settings.
    step : int
        The checkpoint's step.
    load : callable
        Loads the checkpoint.
    layers : list of int
        This task's group of layers.
    previous : callable or None
        Loads the previous checkpoint of the peel (for ``weight_change``), when baselines are measured.
    measure : bool
        Measure the baselines of every layer of the peel (the first group of a step does).

    Returns
    -------
    StepOutcome
        The group's cells.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint = load()
        model = checkpoint.model
        passes = [kept for kept in ([layer for layer in p if layer in layers] for p in job.passes) if kept]
        loss_model, results, values = None, [], None
        with evaluating(model):
            if not warn_nonfinite(model, step):
                for loss_model, result in checkpoint_layers(job.adapter, model, step, job.windows, passes,
                                                            job.config, lr=job.lr, vocab_size=job.vocab_size,
                                                            dtype=job.dtype):
                    results.append(result if job.export else replace(result, solution=None))
            if measure:
                steps = [step] if previous is None else [-1, step]
                tracker = _baselines.Tracker(job.adapter, job.layers, steps, lambda _: previous().model)
                values = tracker.measure(model, step, job.calibration)
    return StepOutcome(step, checkpoint.sha256, class_name(type(model)), loss_model, results, values,
                       [(w.category, str(w.message)) for w in caught])


@dataclass(frozen=True)
class Sealed:
    """A checkpoint loader pickled to bytes: every call unpickles a private copy and loads from it."""

    data: bytes

    @classmethod
    def seal(cls, loader: Callable[[], Checkpoint], step: int) -> Sealed:
        """Pickle ``loader`` (with cloudpickle); a clear error if it cannot be."""
        import cloudpickle

        try:
            return cls(cloudpickle.dumps(loader))
        except Exception as err:  # noqa: BLE001 - pickling raises many kinds
            raise TypeError(
                f"the checkpoint of step {step} cannot be sent to the Dask workers ({type(err).__name__}: {err}): "
                "save it (model.save_pretrained(folder), or a peelnb checkpoint file) and peel the paths"
            ) from None

    def __call__(self) -> Checkpoint:
        import cloudpickle

        return cloudpickle.loads(self.data)()


def _merge(parts: list[StepOutcome], layers: list[int]) -> StepOutcome:
    """One step's outcome from its groups' outcomes (the first group carries the baselines)."""
    first = parts[0]
    hashes = {part.sha256 for part in parts}
    if len(hashes) > 1:
        raise RuntimeError(
            f"the checkpoint of step {first.step} changed while it was peeled (its workers read different bytes): "
            "peel checkpoints that are no longer being written"
        )
    order = {layer: i for i, layer in enumerate(layers)}
    merged = sorted((r for part in parts for r in part.layers), key=lambda r: order[r.layer])
    seen: list[tuple[type[Warning], str]] = []
    for part in parts:
        seen.extend(w for w in part.warnings if w not in seen)
    return StepOutcome(first.step, first.sha256, first.architecture, first.loss_model, merged,
                       next((p.baselines for p in parts if p.baselines is not None), None), seen)


def _client(client: Any) -> Any:
    distributed = _optional.require("distributed", "dask", "peel(..., client=...)")
    if not isinstance(client, distributed.Client):
        raise TypeError(
            f"client must be a dask.distributed.Client, got {type(client).__name__}: "
            "client = dask.distributed.Client('tcp://scheduler:8786') (or a LocalCluster)"
        )
    return distributed


def peel_steps(client: Any, source: Source, steps: Sequence[int], job: Job, bar: tqdm) -> Iterator[StepOutcome]:
    """Peel ``steps`` of ``source`` on the cluster of ``client``; their outcomes in step order.

    Parameters
    ----------
    client : dask.distributed.Client
        A client of the cluster.
    source : Source
        The checkpoints.
    steps : sequence of int
        The steps to peel (ascending).
    job : Job
        The peel's shared settings.
    bar : tqdm
        Progress bar over cells, advanced as groups finish.

    Yields
    ------
    StepOutcome
        One per step, in step order, once all its groups are done.

    Raises
    ------
    ImportError
        Without ``dask.distributed`` (``pip install "peelnb[dask]"``).
    TypeError
        If ``client`` is not a Dask client.
    """
    distributed = _client(client)
    if not steps:
        return
    if source.portable is None:
        raise TypeError(f"{source.description} cannot be sent to a Dask cluster: peel it without client=")
    workers = sorted(client.nthreads())
    groups = groups_of(job.layers, len(workers), len(steps))
    cells = len(job.config.permutations) * len(job.config.bits)
    index = {step: i for i, step in enumerate(source.steps)}
    previous = {s: source.steps[index[s] - 1] for s in steps if job.baselines and index[s] > 0}
    needed = sorted({*steps, *previous.values()})
    token = uuid.uuid4().hex[:8]
    shared = client.scatter(job, broadcast=True, hash=False)
    sealed = [Sealed.seal(source.portable(s), s) for s in needed]
    loaders = dict(zip(needed, client.scatter(sealed, hash=False)))
    del sealed
    tasks: dict[Any, tuple[int, int]] = {}
    for i, step in enumerate(steps):
        for g, layers in enumerate(groups):
            where = {"workers": [workers[(i * len(groups) + g) % len(workers)]], "allow_other_workers": True} \
                if workers else {}
            measure = job.baselines and g == 0
            future = client.submit(peel_group, shared, step, loaders[step], layers,
                                   loaders[previous[step]] if measure and step in previous else None, measure,
                                   key=f"peelnb-{token}-step{step}-layers{layers[0]}-{layers[-1]}", priority=-i,
                                   pure=False, **where)
            tasks[future] = (step, g)
    del loaders
    parts: dict[int, dict[int, StepOutcome]] = {step: {} for step in steps}
    pending = list(steps)
    failed: tuple[int, Exception] | None = None
    try:
        for future in distributed.as_completed(list(tasks)):
            step, g = tasks.pop(future)
            if failed is not None and step >= failed[0]:
                continue
            try:
                parts[step][g] = future.result()
            except Exception as err:  # noqa: BLE001 - the worker's own error, raised below as in the serial peel
                failed = (step, err)  # earlier steps still finish and are kept; later ones are cancelled
                client.cancel([f for f, (s, _) in tasks.items() if s >= step])
                continue
            bar.update(cells * len(groups[g]))
            while pending and len(parts[pending[0]]) == len(groups):
                done = parts.pop(pending.pop(0))
                outcome = _merge([done[k] for k in range(len(groups))], job.layers)
                for category, message in outcome.warnings:
                    warnings.warn(message, category, stacklevel=3)
                yield outcome
        if failed is not None:
            raise failed[1]
    finally:
        client.cancel([f for f in tasks if not f.done()])
