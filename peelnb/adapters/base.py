"""What peelnb needs to know about a model family, and the capture of block inputs.

An adapter tells the engine where the decoder blocks are, how to run one block
on a hidden state, how the final norm and head turn the last hidden state into
logits, and which block parameters are linear weights to quantize. Capture
runs the model once with hooks on every block that hand over each block's
input (h_0 .. h_{L-1}) and the last block's output (h_L); the hooks are
removed even if the forward pass fails.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap


class Adapter(abc.ABC):
    """Describes one model family to the peeling engine.

    Subclasses implement `blocks`, `head`, `quantized_weights`, `init_block`
    and `disable_quantization`; `call` and `stacked_call` have generic
    defaults that a family may replace by faster code.
    """

    name = "generic"

    @abc.abstractmethod
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The decoder blocks, in order."""

    @abc.abstractmethod
    def head(self, model: nn.Module, h: Tensor) -> Tensor:
        """Logits from the last block's output (final norm, then unembedding)."""

    @abc.abstractmethod
    def quantized_weights(self, block: nn.Module) -> list[str]:
        """Names of the block's linear weights, laid out ``(out, in)``."""

    @abc.abstractmethod
    def init_block(self, block: nn.Module, n_layer: int, generator: torch.Generator) -> None:
        """Re-initialize ``block`` in place as the family initializes a fresh model."""

    @abc.abstractmethod
    def disable_quantization(self, block: nn.Module) -> None:
        """Make ``block`` use its weights as stored (for spliced, already quantized weights)."""

    def call(self, block: nn.Module, h: Tensor) -> Tensor:
        """Run one block on hidden states ``h`` (B, T, C)."""
        out = block(h)
        return out[0] if isinstance(out, tuple) else out

    def stacked_call(self, block: nn.Module, params: dict[str, Tensor], h: Tensor) -> Tensor:
        """Run R copies of ``block`` with stacked ``params`` (R, ...) on ``h`` (R, B, T, C).

        The template block's own quantization must be off: ``params`` hold the
        weights to use.
        """

        def one(p: dict[str, Tensor], x: Tensor) -> Tensor:
            out = functional_call(block, p, (x,))
            return out[0] if isinstance(out, tuple) else out

        return vmap(one)(params, h)

    @contextlib.contextmanager
    def capturing(self, model: nn.Module, keep: Callable[[int, Tensor], None]) -> Iterator[None]:
        """Hook every block so each forward pass of ``model`` hands its hidden states to ``keep``.

        ``keep(i, h)`` receives the input h_i of block i (i = 0..L-1) and the
        last block's output h_L (i = L), in order, during the forward pass.
        The hooks are removed on leaving the context, even after an error.
        """
        blocks = list(self.blocks(model))

        def keep_input(index: int) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                keep(index, args[0] if args else next(iter(kwargs.values())))

            return hook

        def keep_output(module: nn.Module, args: tuple, kwargs: dict, output: Tensor | tuple) -> None:
            keep(len(blocks), output[0] if isinstance(output, tuple) else output)

        handles = [b.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, b in enumerate(blocks)]
        handles.append(blocks[-1].register_forward_hook(keep_output, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
