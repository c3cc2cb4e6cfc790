"""A small GPT: decoder-only, pre-norm, learned positions, quantizable blocks.

Read bottom-up: attention, MLP, block, model. Every linear layer inside a block
is a `QuantLinear`, so the same model trains in full precision
(``bits=32``) or quantization-aware at 1, 1.58, 2, 3, 4 or 8 bits; embeddings,
norms and the head stay in full precision. Shapes: B batch, T time, C
``d_model``, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .quant import QuantLinear

INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = QuantLinear(config.d_model, 3 * config.d_model, bits=config.bits)
        self.c_proj = QuantLinear(config.d_model, config.d_model, bits=config.bits)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """Position-wise feed-forward network, 4x wide, GELU."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = QuantLinear(config.d_model, 4 * config.d_model, bits=config.bits)
        self.c_proj = QuantLinear(4 * config.d_model, config.d_model, bits=config.bits)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


def init_block_(block: Block, n_layer: int, generator: torch.Generator | None = None) -> Block:
    """Initialize a block in place as GPT-2 does; returns it.

    Linear weights are N(0, 0.02); the residual projections are scaled by
    ``1 / sqrt(2 * n_layer)``; biases are zero and norms are identity.
    """
    with torch.no_grad():
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                std = INIT_STD / math.sqrt(2 * n_layer) if name.endswith("c_proj") else INIT_STD
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
    return block


class GPT(nn.Module):
    """Decoder-only transformer: embeddings, ``n_layer`` blocks, final norm, head.

    Parameters
    ----------
    config : ModelConfig
        Model shape and block bit-width.
    seed : int or None
        Seeds the initialization (None draws from torch's global generator).
    """

    def __init__(self, config: ModelConfig, seed: int | None = 0) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.n_ctx, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for weight in (self.wte.weight, self.wpe.weight, self.lm_head.weight):
                nn.init.normal_(weight, 0.0, INIT_STD, generator=generator)
        for block in self.blocks:
            init_block_(block, config.n_layer, generator)

    def embed(self, idx: Tensor) -> Tensor:
        """Token plus position embeddings: the input h_0 of the first block, (B, T, C)."""
        T = idx.shape[1]
        if T > self.config.n_ctx:
            raise ValueError(f"sequence length {T} exceeds the model's context n_ctx={self.config.n_ctx}")
        return self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))

    def head(self, h: Tensor) -> Tensor:
        """Final norm and unembedding of the last block's output: logits (B, T, V)."""
        return self.lm_head(self.ln_f(h))

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, T, V) of token ids (B, T)."""
        h = self.embed(idx)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy in nats per token."""
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
