"""Capture of every block's full call, GPTQ "catcher" style, and its replay.

One hooked forward pass per chunk of sequences keeps, for every block, its
hidden-state input h_l (in a chosen storage dtype) and every other argument it
was called with: positional and keyword arguments (attention masks, position
ids, rotary ``position_embeddings``, cache flags). The last block's hook stops
the forward pass once h_L is kept: the head is never computed.

Arguments are flattened into leaves and each leaf is classified once, by a
probe that runs the model on one and on two sequences:

- *shared*: does not depend on the batch (position ids, rotary tables, flags);
  kept once and passed as is;
- *uniform*: has one row per sequence, all rows equal (a causal mask expanded
  to the batch); kept as one row and expanded to any batch;
- *sequence*: has one row per sequence and the rows differ (a padding mask);
  kept for every captured sequence and indexed like the hidden states.

`BlockCall.bind` turns the captured call into the arguments of a batch of
sequences given by their indices, so any chunking or sampling of sequences
replays consistently. Hooks are removed on leaving, even after an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .base import Adapter, block_output

CHUNK_TOKENS = 16384
"""Tokens per hooked forward pass of the capture."""
SHARED, UNIFORM, SEQUENCE = "shared", "uniform", "sequence"
HIDDEN_KWARG = "hidden_states"


class _StopForward(Exception):
    """Raised by the last block's hook: everything needed is kept, the head is not."""


def _split_hidden(args: tuple, kwargs: dict) -> tuple[Tensor, int | str, tuple, dict]:
    """The hidden-state argument of a block call, where it was, and the other arguments."""
    if args:
        return args[0], 0, tuple(args[1:]), dict(kwargs)
    if HIDDEN_KWARG in kwargs:
        rest = {k: v for k, v in kwargs.items() if k != HIDDEN_KWARG}
        return kwargs[HIDDEN_KWARG], HIDDEN_KWARG, (), rest
    raise TypeError(
        "a block was called without positional arguments or a `hidden_states` keyword: peelnb cannot tell which "
        "argument is the hidden state; describe the model with a peelnb.adapters.Adapter"
    )


@dataclass
class _Leaf:
    """One captured argument leaf: how it depends on the batch and what is stored."""

    kind: str
    value: Any


@dataclass
class BoundCall:
    """A block's arguments for one batch of sequences, hidden state left out.

    ``values`` are the flattened leaves; those at ``mapped_at`` differ per
    stacked copy (R, B, ...) and are passed to `assemble` by ``vmap``.
    """

    spec: pytree.TreeSpec
    values: list[Any]
    hidden_at: int | str
    mapped_at: list[int] = field(default_factory=list)
    mapped: list[Tensor] = field(default_factory=list)

    def assemble(self, h: Tensor, mapped: Sequence[Tensor] | None = None) -> tuple[tuple, dict]:
        """Positional and keyword arguments of the block call with hidden states ``h``."""
        values = list(self.values)
        for i, value in zip(self.mapped_at, self.mapped if mapped is None else mapped):
            values[i] = value
        args, kwargs = pytree.tree_unflatten(values, self.spec)
        if self.hidden_at == HIDDEN_KWARG:
            return tuple(args), {**kwargs, HIDDEN_KWARG: h}
        return (h, *args), kwargs


class BlockCall:
    """How the model called one block for N captured sequences (hidden state left out).

    Parameters
    ----------
    spec : TreeSpec
        Structure of ``(args, kwargs)`` without the hidden state.
    leaves : list of _Leaf
        Flattened arguments, each shared, uniform or per sequence.
    hidden_at : int or str
        Where the hidden state goes: position 0, or the ``hidden_states`` keyword.
    """

    def __init__(self, spec: pytree.TreeSpec, leaves: list[_Leaf], hidden_at: int | str) -> None:
        self.spec = spec
        self.leaves = leaves
        self.hidden_at = hidden_at

    @classmethod
    def plain(cls) -> BlockCall:
        """The call of a block that takes only its hidden states."""
        return cls(pytree.tree_flatten(((), {}))[1], [], 0)

    @property
    def per_sequence(self) -> bool:
        """Whether some argument differs between sequences."""
        return any(leaf.kind == SEQUENCE for leaf in self.leaves)

    @property
    def nbytes(self) -> int:
        """Bytes held by the captured tensors."""
        return sum(leaf.value.nbytes for leaf in self.leaves if isinstance(leaf.value, Tensor))

    def bind(self, index: Tensor | slice) -> BoundCall:
        """Arguments for the sequences ``index`` (B,) or, stacked, (R, B).

        With a 2-D index, per-sequence leaves differ per copy and are mapped
        along R; uniform ones are expanded to B and shared.
        """
        if isinstance(index, slice):
            index = torch.arange(index.start or 0, index.stop)
        batch = index.shape[-1]
        values, mapped_at, mapped = [], [], []
        for i, leaf in enumerate(self.leaves):
            if leaf.kind == SHARED:
                values.append(leaf.value)
            elif leaf.kind == UNIFORM:
                values.append(leaf.value.expand(batch, *leaf.value.shape[1:]))
            else:
                rows = leaf.value[index.to(leaf.value.device)]
                values.append(None if index.dim() == 2 else rows)
                if index.dim() == 2:
                    mapped_at.append(i)
                    mapped.append(rows)
        return BoundCall(self.spec, values, self.hidden_at, mapped_at, mapped)


class _CallRecorder:
    """Builds the `BlockCall` of one block from the calls of successive chunks."""

    def __init__(self, layer: int, n: int, batched: set[int]) -> None:
        self.layer, self.n, self.batched = layer, n, batched
        self.spec: pytree.TreeSpec | None = None
        self.leaves: list[_Leaf] = []
        self.hidden_at: int | str = 0

    def _error(self, what: str) -> ValueError:
        return ValueError(
            f"block {self.layer} is called with arguments that {what}: peelnb cannot replay it from one capture; "
            "describe the model with a peelnb.adapters.Adapter whose blocks take replayable arguments"
        )

    def record(self, args: tuple, kwargs: dict, start: int, batch: int) -> None:
        _, self.hidden_at, rest, other = _split_hidden(args, kwargs)
        flat, spec = pytree.tree_flatten((rest, other))
        if self.spec is None:
            self.spec = spec
            self.leaves = [self._first(i, x, batch) for i, x in enumerate(flat)]
            return
        if spec != self.spec:
            raise self._error("change structure between chunks of sequences")
        for i, (leaf, x) in enumerate(zip(self.leaves, flat)):
            self._update(i, leaf, x, start, batch)

    def _first(self, i: int, x: Any, batch: int) -> _Leaf:
        if not isinstance(x, Tensor):
            return _Leaf(SHARED, x)
        if i not in self.batched:
            return _Leaf(SHARED, x.detach().clone())
        if x.shape[0] != batch:
            raise self._error(f"do not follow the batch (argument {i} has {x.shape[0]} rows for {batch} sequences)")
        x = x.detach()
        if bool((x == x[:1]).all()):
            return _Leaf(UNIFORM, x[:1].clone())
        return self._per_sequence(x, 0, batch)

    def _per_sequence(self, x: Tensor, start: int, batch: int, first_rows: Tensor | None = None) -> _Leaf:
        storage = torch.empty((self.n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        if first_rows is not None:
            storage[:start] = first_rows
        storage[start : start + batch] = x
        return _Leaf(SEQUENCE, storage)

    def _update(self, i: int, leaf: _Leaf, x: Any, start: int, batch: int) -> None:
        if leaf.kind == SHARED:
            same = torch.equal(leaf.value, x) if isinstance(x, Tensor) and isinstance(leaf.value, Tensor) else True
            if not same:
                raise self._error(f"change between chunks of sequences (argument {i})")
            return
        x = x.detach()
        if x.shape[0] != batch:
            raise self._error(f"do not follow the batch (argument {i} has {x.shape[0]} rows for {batch} sequences)")
        if leaf.kind == UNIFORM:
            if bool((x == leaf.value).all()):
                return
            self.leaves[i] = self._per_sequence(x, start, batch, first_rows=leaf.value)
            return
        leaf.value[start : start + batch] = x

    def result(self) -> BlockCall:
        if self.spec is None:
            raise RuntimeError(f"block {self.layer} was never called")
        return BlockCall(self.spec, self.leaves, self.hidden_at)


@dataclass
class Captured:
    """Hidden states and block calls of one set of sequences.

    Attributes
    ----------
    hidden : list of Tensor or None
        h_0 .. h_L, each (N, T, C) in the storage dtype; None where not kept.
    calls : list of BlockCall
        How each block was called.
    """

    hidden: list[Tensor | None]
    calls: list[BlockCall]

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, index: int) -> Tensor | None:
        return self.hidden[index]

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept hidden states and the captured arguments."""
        hidden = sum(h.nbytes for h in self.hidden if h is not None)
        return hidden + sum(c.nbytes for c in self.calls)


@contextlib.contextmanager
def hooked(blocks: Sequence[nn.Module], before: Callable[[int, tuple, dict], None],
           after: Callable[[Tensor], None]) -> Iterator[None]:
    """Hook every block: ``before(i, args, kwargs)`` ahead of block i, ``after(h_L)`` behind the last one.

    ``after`` stops the forward pass (the head is not needed). The hooks are
    removed on leaving the context, even after an error.
    """

    def pre(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            before(index, args, kwargs)

        return hook

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        after(block_output(output))
        raise _StopForward

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run(adapter: Adapter, model: nn.Module, ids: Tensor) -> None:
    """Run the hooked model on ``ids`` until the last block's hook stops it."""
    try:
        adapter.forward(model, ids)
    except _StopForward:
        return
    raise RuntimeError(
        f"the forward pass of {type(model).__name__} never called its last block "
        f"({len(adapter.blocks(model))} blocks found): the adapter's blocks are not the ones the model runs"
    )


def _flat_shapes(args: tuple, kwargs: dict) -> tuple[pytree.TreeSpec, list[tuple[int, ...] | None]]:
    _, _, rest, other = _split_hidden(args, kwargs)
    flat, spec = pytree.tree_flatten((rest, other))
    return spec, [tuple(x.shape) if isinstance(x, Tensor) else None for x in flat]


def _batched_leaves(adapter: Adapter, model: nn.Module, windows: Tensor) -> list[set[int]]:
    """Per block, the argument leaves that follow the batch: probed on one and on two sequences."""
    blocks = list(adapter.blocks(model))
    probes: list[list] = [[None] * len(blocks), [None] * len(blocks)]
    two = windows[:2] if windows.shape[0] >= 2 else windows[[0, 0]]
    for probe, ids in zip(probes, (windows[:1], two)):

        def before(i: int, args: tuple, kwargs: dict, probe: list = probe) -> None:
            probe[i] = _flat_shapes(args, kwargs)

        with torch.no_grad(), hooked(blocks, before, lambda h: None):
            _run(adapter, model, ids[:, :-1])
    batched = []
    for i, (one, pair) in enumerate(zip(*probes)):
        if one is None or pair is None or one[0] != pair[0]:
            raise ValueError(
                f"block {i} is called with differently structured arguments for one and for two sequences: "
                "peelnb cannot replay it; describe the model with a peelnb.adapters.Adapter"
            )
        leaves = set()
        for j, (a, b) in enumerate(zip(one[1], pair[1])):
            if a is not None and a != b:
                if not (a[0] == 1 and b[0] == 2 and a[1:] == b[1:]):
                    raise ValueError(
                        f"argument {j} of block {i} has shape {a} for one sequence and {b} for two: peelnb "
                        "cannot replay it; describe the model with a peelnb.adapters.Adapter"
                    )
                leaves.add(j)
        batched.append(leaves)
    return batched


def capture(adapter: Adapter, model: nn.Module, windows: Tensor, *, keep: Sequence[int] | None = None,
            dtype: torch.dtype | None = None, chunk_tokens: int = CHUNK_TOKENS) -> Captured:
    """Hidden states and block calls of ``windows`` (N, T + 1), from hooked forward passes.

    Parameters
    ----------
    adapter : Adapter
        The model family.
    model : nn.Module
        The model, in eval mode.
    windows : Tensor
        Token windows; the model reads ``windows[:, :-1]``.
    keep : sequence of int, optional
        Which hidden states h_i (0..L) to keep (default all).
    dtype : torch.dtype, optional
        Storage dtype of the hidden states (default the model's).
    chunk_tokens : int
        Tokens per forward pass.

    Returns
    -------
    Captured
        The kept hidden states (N, T, C) and every block's call.
    """
    blocks = list(adapter.blocks(model))
    L, N, T = len(blocks), windows.shape[0], windows.shape[1] - 1
    keep = set(range(L + 1) if keep is None else keep)
    batched = _batched_leaves(adapter, model, windows)
    recorders = [_CallRecorder(i, N, batched[i]) for i in range(L)]
    hidden: list[Tensor | None] = [None] * (L + 1)
    start, batch = 0, 0

    def store(i: int, h: Tensor) -> None:
        if i not in keep:
            return
        if hidden[i] is None:
            hidden[i] = torch.empty((N, *h.shape[1:]), dtype=dtype or h.dtype, device=h.device)
        hidden[i][start : start + batch].copy_(h)

    def before(i: int, args: tuple, kwargs: dict) -> None:
        recorders[i].record(args, kwargs, start, batch)
        store(i, _split_hidden(args, kwargs)[0])

    step = max(1, chunk_tokens // T)
    with torch.no_grad(), hooked(blocks, before, lambda h: store(L, h)):
        for start in range(0, N, step):
            ids = windows[start : start + step, :-1]
            batch = ids.shape[0]
            _run(adapter, model, ids)
    return Captured(hidden, [r.result() for r in recorders])
