"""Adapters for Hugging Face ``transformers`` causal LMs: GPT-2, GPT-NeoX (Pythia), Llama-style.

Each adapter finds the decoder blocks, the final norm and the head (the
model's output embedding, tied or not) from the model's own modules. Blocks
are replayed with the arguments captured from the model's forward pass
(attention masks, rotary ``position_embeddings``, ...), so nothing about
attention or positions is re-implemented here.

This module does not import ``transformers``: it only reads modules a loaded
model already has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Adapter, ModelDims, init_block_normal

DEFAULT_CTX = 128
"""Context window of a peel of a Hugging Face model unless ``n_ctx=`` says otherwise."""
INIT_RANGE = 0.02


def _linear_weights(block: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the block's linear weights: all of them, and those stored (in, out) (GPT-2's ``Conv1D``)."""
    names, transposed = [], []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            names.append(f"{name}.weight")
        elif type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
            names.append(f"{name}.weight")
            transposed.append(f"{name}.weight")
    return names, transposed


class HFAdapter(Adapter):
    """Base of the Hugging Face adapters: paths of blocks and final norm under the model's base model.

    Parameters
    ----------
    initializer_range : float
        Standard deviation of the scratch init (``config.initializer_range``;
        filled in from the model by ``adapter_for``).
    """

    name = "hf"
    blocks_attr = "layers"
    norm_attr = "norm"

    def __init__(self, initializer_range: float = INIT_RANGE) -> None:
        self.initializer_range = float(initializer_range)

    @classmethod
    def for_model(cls, model: nn.Module) -> HFAdapter:
        """An adapter with the scratch-init scale of ``model``'s config."""
        return cls(getattr(model.config, "initializer_range", None) or INIT_RANGE)

    def _base(self, model: nn.Module) -> nn.Module:
        base = getattr(model, "base_model", model)
        if not isinstance(getattr(base, self.blocks_attr, None), nn.ModuleList):
            raise TypeError(
                f"{type(self).__name__} found no decoder blocks at `{self.blocks_attr}` in {type(model).__name__}: "
                "pass the adapter of the model's family, or subclass peelnb.adapters.Adapter (see docs/adapters.md)"
            )
        return base

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return getattr(self._base(model), self.blocks_attr)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm between the last block and the head."""
        return getattr(self._base(model), self.norm_attr)

    def head(self, model: nn.Module, h: Tensor) -> Tensor:
        return model.get_output_embeddings()(self.final_norm(model)(h))

    def quantized_weights(self, block: nn.Module) -> list[str]:
        return _linear_weights(block)[0]

    def transposed_weights(self, block: nn.Module) -> list[str]:
        return _linear_weights(block)[1]

    def dims(self, model: nn.Module) -> ModelDims:
        config = model.config
        n_ctx = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        vocab = model.get_input_embeddings().num_embeddings
        return ModelDims(n_ctx, config.hidden_size, vocab, min(n_ctx or DEFAULT_CTX, DEFAULT_CTX))

    def forward(self, model: nn.Module, ids: Tensor) -> object:
        return model(input_ids=ids, use_cache=False)

    def init_block(self, block: nn.Module, n_layer: int, generator: torch.Generator) -> None:
        """``transformers``' own init (``PreTrainedModel._init_weights``), drawn from ``generator``.

        Linear weights N(0, ``initializer_range``), biases zero, norm weights
        one and biases zero.
        """
        init_block_normal(block, self.quantized_weights(block), generator, std=self.initializer_range)


class GPT2Adapter(HFAdapter):
    """``GPT2LMHeadModel``: blocks ``transformer.h``, norm ``transformer.ln_f``, head ``lm_head`` (tied).

    GPT-2's linear layers are ``Conv1D`` modules whose weights are stored
    (in, out); they are quantized per output unit all the same.
    """

    name = "hf-gpt2"
    blocks_attr = "h"
    norm_attr = "ln_f"

    def init_block(self, block: nn.Module, n_layer: int, generator: torch.Generator) -> None:
        """``GPT2PreTrainedModel._init_weights``, drawn from ``generator``.

        As `HFAdapter.init_block`, with the residual projections
        (``attn.c_proj``, ``mlp.c_proj``) scaled by ``1 / sqrt(2 * n_layer)``.
        """
        weights = self.quantized_weights(block)
        scale = 1 / math.sqrt(2 * n_layer)
        scaled = {name: scale for name in weights if name.endswith("c_proj.weight")}
        init_block_normal(block, weights, generator, std=self.initializer_range, scaled=scaled)


class GPTNeoXAdapter(HFAdapter):
    """``GPTNeoXForCausalLM`` (Pythia): blocks ``gpt_neox.layers``, norm ``final_layer_norm``, head ``embed_out``.

    Blocks with a parallel attention + MLP residual replay as they are.
    """

    name = "hf-gpt-neox"
    norm_attr = "final_layer_norm"


class LlamaAdapter(HFAdapter):
    """Llama-style decoders (``LlamaForCausalLM``, ``Qwen2ForCausalLM``): ``model.layers``, ``model.norm``, ``lm_head``.

    RMSNorm, rotary position embeddings and grouped-query attention are the
    blocks' own business: the captured rotary tables and masks are replayed.
    Pass ``adapter=LlamaAdapter()`` to peel another decoder laid out the same
    way (blocks ``model.layers`` called with the hidden states first).
    """

    name = "hf-llama"


ADAPTERS: dict[str, type[HFAdapter]] = {
    "gpt2": GPT2Adapter,
    "gpt_neox": GPTNeoXAdapter,
    "llama": LlamaAdapter,
    "qwen2": LlamaAdapter,
}
"""Hugging Face ``config.model_type`` -> adapter; each is tested with a tiny model."""


def hf_adapter_for(model: nn.Module) -> HFAdapter:
    """The adapter of a Hugging Face model, by its ``config.model_type``.

    Raises
    ------
    TypeError
        For a model type peelnb has no adapter for; the message says how to describe it.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise TypeError(
            f"peelnb does not know how to find the decoder blocks of {type(model).__name__} "
            f"(Hugging Face model_type {model_type!r}); it knows {', '.join(sorted(ADAPTERS))}. "
            "For a Llama-style decoder pass peel(..., adapter=peelnb.adapters.LlamaAdapter()); otherwise "
            "subclass peelnb.adapters.Adapter (blocks, head, quantized_weights; see docs/adapters.md) and pass "
            "peel(..., adapter=YourAdapter())"
        )
    return ADAPTERS[model_type].for_model(model)
