"""Memory a peel will use, and the capture passes that keep it under a budget.

A peel caches, for every layer it peels, the block's input and output on all
calibration and evaluation sequences. Under a ``memory_budget`` the layers are
grouped into passes: each pass re-runs the checkpoint's forward pass and keeps
only the hidden states its layers need. Every pass captures with the same
chunking as one pass would, so the results are identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

CAPTURE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")
ADAM_COPIES = 5
"""Tensors per reference weight while solving: latent, gradient, two Adam moments, effective (quantized)."""
LOGIT_COPIES = 3
"""Logit-sized tensors alive while a chunk is verified (logits, log-softmax, gathered losses)."""


def parse_bytes(value: float | str) -> int:
    """A memory size in bytes from an int or a string such as ``"2GB"``, ``"512 MiB"``.

    Examples
    --------
    >>> parse_bytes("2GB"), parse_bytes("1.5 KiB"), parse_bytes(1000)
    (2000000000, 1536, 1000)
    """
    if isinstance(value, bool):
        raise TypeError("memory_budget must be a number of bytes or a size such as '2GB'")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(str(value).lower())
        if not match or match.group(2) not in _UNITS:
            raise ValueError(f"memory_budget {value!r} is not a size: give bytes or e.g. '512MB', '2GB', '1.5GiB'")
        number, unit = float(match.group(1)), match.group(2)
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory_budget must be positive, got {value!r}")
    return size


def capture_dtype(value: str | torch.dtype) -> torch.dtype:
    """The storage dtype of captured hidden states, from its name.

    Examples
    --------
    >>> capture_dtype("bfloat16")
    torch.bfloat16
    """
    if isinstance(value, torch.dtype) and value in CAPTURE_DTYPES.values():
        return value
    if isinstance(value, str) and value in CAPTURE_DTYPES:
        return CAPTURE_DTYPES[value]
    raise ValueError(f"capture_dtype must be one of {', '.join(CAPTURE_DTYPES)}, got {value!r}")


def format_bytes(n: float) -> str:
    """Bytes in human units.

    Examples
    --------
    >>> format_bytes(1536), format_bytes(3.2e9)
    ('1.5 KiB', '3.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class MemoryPlan:
    """Capture passes of a peel and the memory they need.

    Attributes
    ----------
    passes : list of list of int
        Layers peeled from each capture pass (one pass unless a budget splits them).
    cache_bytes : int
        Cached hidden states of the largest pass.
    model_bytes : int
        Parameters and buffers of one checkpoint.
    solver_bytes : int
        References of one layer while they are solved.
    verify_bytes : int
        Logits of one verification chunk.
    """

    passes: list[list[int]]
    cache_bytes: int
    model_bytes: int
    solver_bytes: int
    verify_bytes: int

    @property
    def total_bytes(self) -> int:
        """Estimated peak memory of the peel."""
        return self.cache_bytes + self.model_bytes + self.solver_bytes + self.verify_bytes

    def describe(self) -> str:
        """One line saying what the peel will use."""
        layers = max(len(p) for p in self.passes)
        passes = f"{len(self.passes)} capture passes of up to {layers} layers" if len(self.passes) > 1 else \
            "one capture pass"
        return (f"peel will use about {format_bytes(self.total_bytes)}: cached activations "
                f"{format_bytes(self.cache_bytes)} ({passes}), model {format_bytes(self.model_bytes)}, references "
                f"{format_bytes(self.solver_bytes)}, verification {format_bytes(self.verify_bytes)}")


def kept_hidden(layers: list[int]) -> set[int]:
    """Hidden states h_l, h_{l+1} the given layers need."""
    return {i for layer in layers for i in (layer, layer + 1)}


def plan(layers: list[int], n_layer: int, *, hidden_bytes: int, eval_hidden_bytes: int, model_bytes: int,
         solver_bytes: int, verify_bytes: int, budget: int | None) -> MemoryPlan:
    """Group ``layers`` into capture passes whose cached hidden states fit ``budget``.

    Parameters
    ----------
    layers : list of int
        Layers to peel.
    n_layer : int
        Depth of the model (the evaluation split also keeps h_L, for the model's own loss).
    hidden_bytes : int
        Bytes of one hidden state h_i over all calibration and evaluation sequences.
    eval_hidden_bytes : int
        Bytes of one hidden state over the evaluation sequences.
    model_bytes, solver_bytes, verify_bytes : int
        The rest of the estimate (see `MemoryPlan`).
    budget : int, optional
        Bytes the cached hidden states may take; None: one pass.

    Returns
    -------
    MemoryPlan

    Raises
    ------
    ValueError
        If even one layer's hidden states exceed the budget; the message says what would fit.
    """

    def cost(group: list[int]) -> int:
        kept = kept_hidden(group)
        return len(kept) * hidden_bytes + (0 if n_layer in kept else eval_hidden_bytes)

    passes: list[list[int]] = []
    if budget is None or cost(layers) <= budget:
        passes = [list(layers)]
    else:
        for layer in layers:
            if passes and cost([*passes[-1], layer]) <= budget:
                passes[-1].append(layer)
                continue
            if cost([layer]) > budget:
                raise ValueError(
                    f"memory_budget={format_bytes(budget)} is below what one layer's cached activations take "
                    f"({format_bytes(cost([layer]))}): raise memory_budget, lower calib_tokens/eval_tokens, or "
                    "capture in bfloat16 (capture_dtype='bfloat16')"
                )
            passes.append([layer])
    cache = max(cost(group) for group in passes)
    return MemoryPlan(passes, cache, model_bytes, solver_bytes, verify_bytes)
