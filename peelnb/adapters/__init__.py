"""Model-family adapters: where the blocks, norm and head are; capture and replay."""

from __future__ import annotations

from torch import nn

from ..model import GPT
from .base import Adapter
from .gpt import GPTAdapter

__all__ = ["Adapter", "GPTAdapter", "adapter_for"]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter that knows ``model``'s family.

    Raises
    ------
    TypeError
        If no adapter knows the model; the message says how to describe it.
    """
    if isinstance(model, GPT):
        return GPTAdapter()
    raise TypeError(
        f"peelnb does not know how to find the decoder blocks of {type(model).__name__}: "
        "peel a peelnb GPT, or subclass peelnb.adapters.Adapter (blocks, head, quantized_weights, "
        "init_block, disable_quantization) for your model family"
    )
