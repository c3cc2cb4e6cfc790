"""Model-family adapters: where the blocks, norm and head are; capture and replay of block calls.

`Adapter` is the public interface for describing a model family peelnb does not
know (see ``docs/adapters.md``); `adapter_for` picks the adapter of a known
one: peelnb's own `GPT`, and Hugging Face GPT-2, GPT-NeoX (Pythia), Llama and
Qwen2 causal LMs. Importing this package does not import ``transformers``.
"""

from __future__ import annotations

from torch import nn

from ..model import GPT
from .base import Adapter, ModelDims
from .gpt import GPTAdapter
from .hf import GPT2Adapter, GPTNeoXAdapter, HFAdapter, LlamaAdapter

__all__ = ["Adapter", "GPT2Adapter", "GPTAdapter", "GPTNeoXAdapter", "HFAdapter", "LlamaAdapter", "ModelDims",
           "adapter_for", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``-d model wraps (``_orig_mod``), else ``model`` itself."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``transformers`` model (checked without importing it)."""
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter that knows ``model``'s family.

    Parameters
    ----------
    model : nn.Module
        A peelnb `GPT` or a Hugging Face causal LM (GPT-2, GPT-NeoX, Llama, Qwen2).

    Returns
    -------
    Adapter
        The family's adapter.

    Raises
    ------
    TypeError
        If no adapter knows the model; the message says how to describe it.

    Examples
    --------
    >>> from peelnb.config import ModelConfig
    >>> adapter_for(GPT(ModelConfig(vocab_size=11, n_layer=1, d_model=8, n_head=2, n_ctx=4))).name
    'peelnb-gpt'
    """
    model = unwrap(model)
    if isinstance(model, GPT):
        return GPTAdapter()
    if is_hf_model(model):
        from .hf import hf_adapter_for

        return hf_adapter_for(model)
    raise TypeError(
        f"peelnb does not know how to find the decoder blocks of {type(model).__name__}: "
        "peel a peelnb GPT or a Hugging Face GPT-2, GPT-NeoX, Llama or Qwen2 model, or subclass "
        "peelnb.adapters.Adapter (blocks, head, quantized_weights; see docs/adapters.md) for your model family "
        "and pass peel(..., adapter=YourAdapter())"
    )
