"""The public adapter interface: what peelnb needs to know about a model family.

An adapter tells the engine where the decoder blocks are, how the final norm
and head turn the last hidden state into logits, and which block parameters
are linear weights to quantize. Everything else has a generic default: the
engine captures each block's full call (positional and keyword arguments) with
hooks (`peelnb.adapters.capture`), replays blocks with those arguments, and
runs many parameter sets of one block at once with ``torch.func.vmap``.

A family may replace the generic parts with faster code (peelnb's own GPT has
a hand-written stacked block). See ``docs/adapters.md`` for a worked example.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

if TYPE_CHECKING:
    from .capture import BoundCall

INIT_STD = 0.02
"""Standard deviation of linear weights in the generic scratch init (GPT-2's)."""
_CONFIG_CTX = ("n_ctx", "n_positions", "max_position_embeddings")
_CONFIG_WIDTH = ("d_model", "hidden_size", "n_embd")


@dataclass(frozen=True)
class ModelDims:
    """Sizes of a model the peel needs.

    Attributes
    ----------
    n_ctx : int or None
        Longest context the model accepts (None: unbounded).
    d_model : int
        Width of the hidden states between blocks.
    vocab_size : int
        Rows of the input embedding: token ids must lie below it.
    default_ctx : int
        Context window a peel uses unless told otherwise.
    """

    n_ctx: int | None
    d_model: int
    vocab_size: int
    default_ctx: int


def block_output(out: Tensor | tuple | list) -> Tensor:
    """The hidden states a block returns (the first element when it returns a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class Adapter(abc.ABC):
    """Describes one model family to the peeling engine.

    Subclasses implement `blocks`, `head` and `quantized_weights`. The other
    methods have generic defaults: `dims` reads common config names,
    `init_block` draws a GPT-2-style scratch init, `call` and `stacked_call`
    run blocks with the arguments captured from the model's own forward pass.

    Pass an instance to ``peelnb.peel(..., adapter=MyAdapter())`` for a model
    peelnb does not recognize.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> class Toy(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb = nn.Embedding(10, 8)
    ...         self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
    ...         self.out = nn.Linear(8, 10)
    ...     def forward(self, idx):
    ...         h = self.emb(idx)
    ...         for layer in self.layers:
    ...             h = h + layer(h)
    ...         return self.out(h)
    >>> class ToyAdapter(Adapter):
    ...     def blocks(self, model):
    ...         return model.layers
    ...     def head(self, model, h):
    ...         return model.out(h)
    ...     def quantized_weights(self, block):
    ...         return ["0.weight"]
    ...     def dims(self, model):
    ...         return ModelDims(n_ctx=None, d_model=8, vocab_size=10, default_ctx=16)
    >>> [type(b).__name__ for b in ToyAdapter().blocks(Toy())]
    ['Sequential', 'Sequential']
    """

    name = "custom"

    @abc.abstractmethod
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The decoder blocks, in the order the forward pass calls them.

        Block ``l`` maps the hidden states h_l (B, T, C), its first argument,
        to h_{l+1} (B, T, C) (or a tuple whose first element is h_{l+1}).
        """

    @abc.abstractmethod
    def head(self, model: nn.Module, h: Tensor) -> Tensor:
        """Logits (B, T, V) from the last block's output (final norm, then unembedding)."""

    @abc.abstractmethod
    def quantized_weights(self, block: nn.Module) -> list[str]:
        """Names (as in ``block.named_parameters()``) of the block's linear weights to quantize."""

    def transposed_weights(self, block: nn.Module) -> list[str]:
        """Those of `quantized_weights` stored ``(in, out)`` rather than ``(out, in)``.

        Quantizer scales are per output row; a weight stored transposed (GPT-2's
        ``Conv1D``) is quantized along its columns. Default: none.
        """
        return []

    def dims(self, model: nn.Module) -> ModelDims:
        """Context length, width and vocabulary of ``model``.

        The default reads ``model.config`` (``n_ctx``/``n_positions``/
        ``max_position_embeddings``, ``d_model``/``hidden_size``/``n_embd``) and
        the input embedding's rows (``model.get_input_embeddings()`` or
        ``config.vocab_size``); a context window of at most 128 tokens.

        Raises
        ------
        TypeError
            When the model does not say; override `dims` in the adapter.
        """
        config = getattr(model, "config", None)
        n_ctx = next((getattr(config, k) for k in _CONFIG_CTX if isinstance(getattr(config, k, None), int)), None)
        width = next((getattr(config, k) for k in _CONFIG_WIDTH if isinstance(getattr(config, k, None), int)), None)
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = embedding.num_embeddings if isinstance(embedding, nn.Embedding) else getattr(config, "vocab_size", None)
        if width is None or vocab is None:
            raise TypeError(
                f"{type(self).__name__} cannot tell the width and vocabulary of {type(model).__name__}: "
                "override Adapter.dims(model) to return ModelDims(n_ctx=..., d_model=..., vocab_size=..., "
                "default_ctx=...)"
            )
        return ModelDims(n_ctx, width, vocab, min(n_ctx or 128, 128))

    def init_block(self, block: nn.Module, n_layer: int, generator: torch.Generator) -> None:
        """Re-initialize ``block`` in place as a fresh model would be (the replace view's scratch init).

        The default: every quantized (linear) weight N(0, 0.02), biases
        zero, norm weights one and norm biases zero; other parameters are
        left as they are. Draws only from ``generator``.
        """
        init_block_normal(block, self.quantized_weights(block), generator, std=INIT_STD)

    def disable_quantization(self, block: nn.Module) -> None:
        """Make ``block`` use its weights as stored (for spliced, already quantized weights).

        Only blocks that quantize their own weights in the forward pass (as
        peelnb's quantization-aware GPT does) need to do anything.
        """

    def forward(self, model: nn.Module, ids: Tensor) -> object:
        """Run ``model`` on token ids (B, T) without caches; the engine only needs it to call every block."""
        return model(ids)

    def call(self, block: nn.Module, h: Tensor, call: BoundCall | None = None) -> Tensor:
        """Run one block on hidden states ``h`` (B, T, C) with its captured arguments."""
        if call is None:
            return block_output(block(h))
        args, kwargs = call.assemble(h)
        return block_output(block(*args, **kwargs))

    def stacked_call(self, block: nn.Module, params: dict[str, Tensor], h: Tensor,
                     call: BoundCall | None = None) -> Tensor:
        """Run R copies of ``block`` with stacked ``params`` (R, ...) on ``h`` (R, B, T, C).

        The template block's own quantization must be off: ``params`` hold the
        weights to use. ``call`` holds the block's other arguments; those
        that differ per copy are mapped along R.
        """
        mapped = call.mapped if call is not None else []

        def one(p: dict[str, Tensor], x: Tensor, m: list[Tensor]) -> Tensor:
            if call is None:
                return block_output(functional_call(block, p, (x,)))
            args, kwargs = call.assemble(x, m)
            return block_output(functional_call(block, p, args, kwargs))

        with warnings.catch_warnings():
            # CPU flash attention has no vmap batching rule; torch falls back to a loop and says so.
            warnings.filterwarnings("ignore", message=".*performance drop because we have not yet implemented")
            return vmap(one)(params, h, mapped)


_NORM_NAMES = ("LayerNorm", "RMSNorm", "GroupNorm")


def init_block_normal(block: nn.Module, weights: list[str], generator: torch.Generator, *, std: float,
                      scaled: dict[str, float] | None = None) -> None:
    """Initialize a block in place: N(0, std) weights, zero biases, unit norms.

    Parameters
    ----------
    block : nn.Module
        The block, changed in place.
    weights : list of str
        Parameter names of the weights to draw (in ``named_parameters`` order).
    generator : torch.Generator
        The only source of randomness.
    std : float
        Standard deviation of the weights.
    scaled : dict of str to float, optional
        Weights whose standard deviation is multiplied by a factor (GPT-2's
        residual projections: ``1 / sqrt(2 * n_layer)``).
    """
    scaled = scaled or {}
    drawn = set(weights)
    with torch.no_grad():
        for name, p in block.named_parameters():
            owner = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            is_norm = isinstance(owner, nn.LayerNorm) or any(n in type(owner).__name__ for n in _NORM_NAMES)
            if name in drawn:
                p.normal_(0.0, std * scaled.get(name, 1.0), generator=generator)
            elif is_norm:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
