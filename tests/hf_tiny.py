"""Tiny Hugging Face causal LMs built locally from configs (random weights, no hub), and a character tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf
from torch import nn

from peelnb.adapters import is_hf_model
from peelnb.config import ModelConfig
from peelnb.data import load_text
from peelnb.model import GPT

tf.logging.set_verbosity_error()

VOCAB = 80
"""Covers the bundled corpus's 73 characters."""
WIDTH, LAYERS, HEADS, CTX = 32, 3, 4, 32
ARCHS = ("gpt2", "gpt_neox", "llama", "qwen2", "peelnb")


def hf_config(arch: str, *, vocab: int = VOCAB, width: int = WIDTH, layers: int = LAYERS, ctx: int = CTX,
              **extra: object) -> tf.PretrainedConfig:
    """A tiny config of ``arch`` (no dropout unless ``extra`` asks for it)."""
    if arch == "gpt2":
        dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        return tf.GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=width, n_layer=layers, n_head=HEADS,
                             **{**dropout, **extra})
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=ctx, hidden_size=width,
                                num_hidden_layers=layers, num_attention_heads=HEADS, intermediate_size=4 * width,
                                **extra)
    common = dict(vocab_size=vocab, max_position_embeddings=ctx, hidden_size=width, num_hidden_layers=layers,
                  num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=4 * width)
    if arch == "llama":
        return tf.LlamaConfig(**common, **extra)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, **extra)
    raise ValueError(arch)


def tiny_model(arch: str, *, seed: int = 0, **config: object) -> nn.Module:
    """A tiny model of ``arch`` with seeded random weights, in eval mode (``"peelnb"``: peelnb's own GPT)."""
    if arch == "peelnb":
        return GPT(ModelConfig(vocab_size=VOCAB, n_layer=LAYERS, d_model=WIDTH, n_head=HEADS, n_ctx=CTX),
                   seed=seed).eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return tf.AutoModelForCausalLM.from_config(hf_config(arch, **config)).eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's own logits of token ids (B, T)."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False) if is_hf_model(model) else model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def char_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A character tokenizer of the bundled corpus (73 characters and ``<unk>``), built locally."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set(load_text()))
    vocab = {c: i for i, c in enumerate(chars)} | {"<unk>": len(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def save_suite(folder: Path, models: dict[str, nn.Module],
               save: Callable[[nn.Module, Path], None] | None = None) -> Path:
    """Save models as subfolders ``name/`` of ``folder`` (``save_pretrained`` unless ``save`` is given)."""
    for name, model in models.items():
        (save or (lambda m, p: m.save_pretrained(p)))(model, folder / name)
    return folder
