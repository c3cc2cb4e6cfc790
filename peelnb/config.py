"""Settings for models, training runs and peeling, with validation.

Every setting object is a frozen dataclass that validates itself on creation,
so a bad value fails where it is written, with a message that names the fix.
``to_dict``/``from_dict`` give the plain JSON form stored in run folders and in
result attributes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

BITS: tuple[float, ...] = (1.0, 1.58, 2.0, 3.0, 4.0, 8.0, 32.0)
"""Weight bit-widths peelnb knows (DESIGN.md §4); 1.58 is ternary, 32 is full precision."""

FAULT_KINDS: tuple[str, ...] = ("frozen", "slow", "reset", "noise")
VIEWS: tuple[str, ...] = ("replace", "headroom")
TARGETS: tuple[str, ...] = ("output", "task")
INITS: tuple[str, ...] = ("scratch", "trained")
VIEW_SETTINGS: dict[str, tuple[str, str]] = {
    "replace": ("output", "scratch"),
    "headroom": ("task", "trained"),
}
"""What each view means as (target, init)."""
SOLVER_BATCH: dict[str, int] = {"output": 2, "task": 8}
"""Default calibration sequences per solver step, by local objective."""
SOLVER_STEPS: dict[str, int] = {"output": 25, "task": 50}
"""Default K by local objective. The planted-fault suite (docs/detection.md) found the replace view as good at
K = 25 (and 10) as at 50, for 27% less time, and false flags at 100; the headroom view best at 50."""


def check_bits(bits: float) -> float:
    """Return ``bits`` as one of the canonical floats in `BITS`.

    Parameters
    ----------
    bits : float
        A bit-width such as ``1``, ``1.58``, ``4`` or ``32``.

    Returns
    -------
    float
        The matching entry of `BITS`.

    Raises
    ------
    ValueError
        If ``bits`` is not a known bit-width.

    Examples
    --------
    >>> check_bits(4)
    4.0
    """
    try:
        value = float(bits)
    except (TypeError, ValueError):
        value = math.nan
    for known in BITS:
        if abs(value - known) < 1e-9:
            return known
    allowed = ", ".join(f"{b:g}" for b in BITS)
    raise ValueError(f"unknown bits value {bits!r}: use one of {allowed} (1.58 is ternary, 32 full precision)")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _int_ids(name: str, value: Any) -> tuple[int, ...]:
    """A collection of integers (no strings, floats or booleans) as a sorted tuple without repeats."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list, set, frozenset, range)):
        raise ValueError(f"{name} must be a list of integers, got {value!r}")
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in value):
        raise ValueError(f"{name} must be integers, got {value!r}")
    return tuple(sorted({int(i) for i in value}))


def _numbers(name: str, value: Any) -> list[Any]:
    """The items of a list of numbers; a clear error for a bare number or a string."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list, set, frozenset)):
        raise ValueError(f"{name} must be a list of numbers, e.g. (1, 1.58, 4, 32), got {value!r}")
    return list(value)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


class _Serializable:
    """``to_dict``/``from_dict`` for the dataclasses below."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the settings."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # noqa: ANN206 - returns cls
        """Build settings from `to_dict` output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class ModelConfig(_Serializable):
    """Shape of a peelnb GPT model.

    Parameters
    ----------
    vocab_size : int
        Number of token ids.
    n_layer, n_head, d_model, n_ctx : int
        Blocks, attention heads, residual width and context length.
    bits : float
        Bit-width of every linear layer inside the blocks (quantization-aware
        training below 32); embeddings, norms and the head stay full precision.
    """

    vocab_size: int
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 128
    n_ctx: int = 128
    bits: float = 32.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "n_ctx"):
            _positive_int(name, getattr(self, name))
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        object.__setattr__(self, "bits", check_bits(self.bits))


@dataclass(frozen=True)
class Fault(_Serializable):
    """A fault planted in one layer during training, for teaching and validation.

    Parameters
    ----------
    kind : {"frozen", "slow", "reset", "noise"}
        ``frozen``: the layer is never updated. ``slow``: its learning rate is
        scaled by 0.02. ``reset``: it is re-initialized at 80% of training.
        ``noise``: Gaussian noise of half each weight's standard deviation is
        added to it after training.
    layer : int
        0-based index of the faulty block.
    """

    kind: str
    layer: int

    def __post_init__(self) -> None:
        _choice("fault kind", self.kind, FAULT_KINDS)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"fault layer must be a non-negative integer, got {self.layer!r}")

    @classmethod
    def parse(cls, text: str) -> Fault:
        """Parse ``"KIND:LAYER"``, e.g. ``"frozen:3"``.

        Examples
        --------
        >>> Fault.parse("frozen:3")
        Fault(kind='frozen', layer=3)
        """
        kind, sep, layer = text.partition(":")
        if not sep or not re.fullmatch(r"[0-9]+", layer.strip()):
            raise ValueError(f"fault {text!r} must look like KIND:LAYER, e.g. frozen:3 "
                             f"(kinds: {', '.join(FAULT_KINDS)})")
        return cls(kind.strip(), int(layer))

    def __str__(self) -> str:
        return f"{self.kind}:{self.layer}"


@dataclass(frozen=True)
class TrainConfig(_Serializable):
    """Settings of a training run.

    Parameters
    ----------
    steps : int
        Optimizer steps.
    batch_size : int
        Sequences per step (each ``n_ctx`` tokens).
    lr, lr_min : float
        Peak learning rate after warm-up, and the final rate of the cosine decay.
    warmup : int
        Linear warm-up steps.
    weight_decay, grad_clip : float
        AdamW weight decay (matrices only) and gradient-norm clip.
    checkpoints : tuple of int
        Steps after which a checkpoint is saved (0 is the initialization);
        the final step is always saved. Empty means five evenly spaced
        checkpoints from 0 to ``steps``.
    eval_every, eval_tokens : int
        How often and on how many held-out tokens the held-out loss is logged.
    seed : int
        Seeds initialization, batches and faults.
    fault : Fault or None
        A planted fault, or None for a clean run.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    lr_min: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoints: tuple[int, ...] = ()
    eval_every: int = 100
    eval_tokens: int = 8192
    seed: int = 0
    fault: Fault | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_tokens"):
            _positive_int(name, getattr(self, name))
        for name in ("lr", "lr_min"):
            _positive_float(name, getattr(self, name))
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min ({self.lr_min}) must not exceed lr ({self.lr})")
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup, weight_decay and grad_clip must be >= 0")
        if isinstance(self.fault, dict):
            object.__setattr__(self, "fault", Fault.from_dict(self.fault))
        checkpoints = set(_int_ids("checkpoints", self.checkpoints)) or {round(i * self.steps / 4) for i in range(5)}
        bad = sorted(s for s in checkpoints if not 0 <= s <= self.steps)
        if bad:
            raise ValueError(f"checkpoint steps {bad} lie outside 0..{self.steps}")
        object.__setattr__(self, "checkpoints", tuple(sorted(checkpoints | {self.steps})))


@dataclass(frozen=True)
class PeelConfig(_Serializable):
    """Settings of a peel (DESIGN.md §3); stored in the result's attributes.

    Parameters
    ----------
    view : {"replace", "headroom"}
        ``replace`` (default): a fresh block fitted to the layer's own output
        (``target="output"``, ``init="scratch"``). ``headroom``: the trained
        block optimized alone on the next-token loss (``target="task"``,
        ``init="trained"``).
    target, init : str or None
        Override the view's local objective (``"output"``/``"task"``) or
        initialization (``"scratch"``/``"trained"``).
    bits : tuple of float
        Bit-widths of the references.
    permutations : int or tuple of int
        Solver orderings: an int ``n`` means ``0..n-1``. 0 is the natural
        order, p >= 1 a shuffle seeded by p (and, from scratch, a seeded init).
    layers : tuple of int or None
        Layers to peel; None peels every layer.
    solver_steps : int or None
        K, the optimizer steps of each local solve (the "lightweight"
        budget); None picks the objective's default (25 for
        ``target="output"``, 50 for ``"task"``).
    lr : float or None
        Adam learning rate; None picks the view's default (3e-3 for replace;
        for headroom a third of the run's final training rate, at most 1e-4).
    batch_size : int or None
        Calibration sequences per solver step; None picks the objective's
        default (2 for ``target="output"``, 8 for the noisier ``"task"``).
    calib_tokens, eval_tokens : int
        Calibration tokens (training split) and held-out evaluation tokens.
    selection_fraction : float
        With ``init="trained"``: share of the calibration sequences held back
        to pick the best snapshot (K = 0 included).
    selection_every : int
        With ``init="trained"``: solver steps between snapshot evaluations.
    seed : int
        Seeds calibration/evaluation sampling, shuffles and scratch inits.
    """

    view: str = "replace"
    target: str | None = None
    init: str | None = None
    bits: tuple[float, ...] = (1.0, 1.58, 4.0, 32.0)
    permutations: tuple[int, ...] | int = 3
    layers: tuple[int, ...] | None = None
    solver_steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    calib_tokens: int = 32768
    eval_tokens: int = 4096
    selection_fraction: float = 0.25
    selection_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("view", self.view, VIEWS)
        target, init = VIEW_SETTINGS[self.view]
        object.__setattr__(self, "target", self.target or target)
        object.__setattr__(self, "init", self.init or init)
        _choice("target", self.target, TARGETS)
        _choice("init", self.init, INITS)
        object.__setattr__(self, "batch_size", self.batch_size or SOLVER_BATCH[self.target])
        if self.solver_steps is None:
            object.__setattr__(self, "solver_steps", SOLVER_STEPS[self.target])
        bits = tuple(sorted({check_bits(b) for b in _numbers("bits", self.bits)}))
        if not bits:
            raise ValueError("bits must name at least one bit-width")
        object.__setattr__(self, "bits", bits)
        perms = self.permutations
        if isinstance(perms, int) and not isinstance(perms, bool):
            _positive_int("permutations", perms)
            perms = tuple(range(perms))
        elif isinstance(perms, (tuple, list, set, frozenset, range)):
            perms = _int_ids("permutations", perms)
        else:
            raise ValueError(f"permutations must be a positive count or a list of integer ids, got {perms!r}")
        if not perms or perms[0] < 0:
            raise ValueError(f"permutations must be a positive count or non-negative ids, got {self.permutations!r}")
        object.__setattr__(self, "permutations", perms)
        if self.layers is not None:
            layers = _int_ids("layers", self.layers)
            if not layers or layers[0] < 0:
                raise ValueError(f"layers must be non-negative indices (or None for all), got {self.layers!r}")
            object.__setattr__(self, "layers", layers)
        for name in ("solver_steps", "batch_size", "calib_tokens", "eval_tokens", "selection_every"):
            _positive_int(name, getattr(self, name))
        if self.lr is not None:
            _positive_float("lr", self.lr)
        if not 0 < self.selection_fraction < 1:
            raise ValueError(f"selection_fraction must lie strictly between 0 and 1, got {self.selection_fraction!r}")

    @property
    def selects_snapshot(self) -> bool:
        """Whether the best snapshot (K = 0 included) is kept rather than the last."""
        return self.init == "trained"
