"""Adapter for peelnb's own `GPT`, with a fast stacked block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import GPT, Block, init_block_
from ..quant import FULL_PRECISION, QuantLinear
from .base import Adapter, ModelDims

if TYPE_CHECKING:
    from .capture import BoundCall


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Stacked linear: x (R, N, in), weight (R, out, in), bias (R, out) -> (R, N, out)."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Stacked LayerNorm: x (R, N, C), weight and bias (R, C)."""
    return torch.addcmul(bias.unsqueeze(1), F.layer_norm(x, x.shape[-1:]), weight.unsqueeze(1))


class GPTAdapter(Adapter):
    """peelnb's `GPT`: blocks in ``model.blocks``, head ``ln_f`` + ``lm_head``."""

    name = "peelnb-gpt"

    def blocks(self, model: GPT) -> Sequence[Block]:
        return model.blocks

    def head(self, model: GPT, h: Tensor) -> Tensor:
        return model.head(h)

    def dims(self, model: GPT) -> ModelDims:
        config = model.config
        return ModelDims(config.n_ctx, config.d_model, config.vocab_size, config.n_ctx)

    def quantized_weights(self, block: Block) -> list[str]:
        return [f"{name}.weight" for name, m in block.named_modules() if isinstance(m, QuantLinear)]

    def init_block(self, block: Block, n_layer: int, generator: torch.Generator) -> None:
        init_block_(block, n_layer, generator)

    def disable_quantization(self, block: Block) -> None:
        for module in block.modules():
            if isinstance(module, QuantLinear):
                module.bits = FULL_PRECISION

    def stacked_call(self, block: Block, params: dict[str, Tensor], h: Tensor,
                     call: BoundCall | None = None) -> Tensor:
        """`Block.forward` for R stacked parameter sets at once (batched matmuls).

        A GPT block takes no other arguments.
        """
        R, B, T, C = h.shape
        n_head = block.attn.n_head
        x = h.reshape(R, B * T, C)
        a = _layer_norm(x, params["ln_1.weight"], params["ln_1.bias"])
        qkv = _linear(a, params["attn.c_attn.weight"], params["attn.c_attn.bias"])
        q, k, v = qkv.view(R * B, T, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4)  # 3 x (R*B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(R, B * T, C)
        x = x + _linear(y, params["attn.c_proj.weight"], params["attn.c_proj.bias"])
        m = _layer_norm(x, params["ln_2.weight"], params["ln_2.bias"])
        m = F.gelu(_linear(m, params["mlp.c_fc.weight"], params["mlp.c_fc.bias"]))
        x = x + _linear(m, params["mlp.c_proj.weight"], params["mlp.c_proj.bias"])
        return x.view(R, B, T, C)
