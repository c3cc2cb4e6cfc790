"""What peeling Hugging Face models costs, per architecture, next to peelnb's own GPT.

Prints, for GPT-2, GPT-NeoX, Llama, Qwen2 and peelnb's GPT at the same small
shape (4 layers, width 64, 4 heads, vocabulary 80, context 64, random weights):

1. the replay error: captured h_0 sent through every block (with its captured
   arguments) and the head, against the model's own logits (max abs, float32);
2. capture of the default calibration + evaluation tokens against one plain
   forward pass over the same tokens;
3. one solver step of 12 stacked references (3 permutations x 4 bit-widths):
   the generic ``torch.func.vmap`` path, a Python loop over references, and
   for peelnb's GPT its hand-written stacked block;
4. the whole default peel of one checkpoint (4 layers x 3 permutations x 4
   bit-widths, K = 50, 32,768 calibration tokens).

Usage: ``python benchmarks/hf.py [--repeats N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import transformers as tf
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import timed  # noqa: E402

import peelnb  # noqa: E402
from peelnb.adapters import Adapter, adapter_for  # noqa: E402
from peelnb.adapters.base import block_output  # noqa: E402
from peelnb.adapters.capture import capture  # noqa: E402
from peelnb.config import ModelConfig  # noqa: E402
from peelnb.data import Corpus  # noqa: E402
from peelnb.model import GPT  # noqa: E402
from peelnb.peeling import peel_windows  # noqa: E402

WIDTH, LAYERS, HEADS, VOCAB, CTX = 64, 4, 4, 80, 64


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    tf.logging.set_verbosity_error()
    common = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  max_position_embeddings=CTX, intermediate_size=4 * WIDTH)
    configs = {
        "gpt2": tf.GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS),
        "gpt_neox": tf.GPTNeoXConfig(**common),
        "llama": tf.LlamaConfig(**common, num_key_value_heads=2),
        "qwen2": tf.Qwen2Config(**common, num_key_value_heads=2),
    }
    out = {name: tf.AutoModelForCausalLM.from_config(c).eval() for name, c in configs.items()}
    out["peelnb GPT"] = GPT(ModelConfig(vocab_size=VOCAB, n_layer=LAYERS, d_model=WIDTH, n_head=HEADS, n_ctx=CTX))
    return out


def model_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids) if isinstance(model, GPT) else model(input_ids=ids, use_cache=False)
    return out if isinstance(out, torch.Tensor) else out.logits


def measure(name: str, model: torch.nn.Module, corpus: Corpus, calib: torch.Tensor, evaluation: torch.Tensor,
            repeats: int) -> str:
    """One line of figures for one model."""
    adapter = adapter_for(model)
    with torch.no_grad():
        cap = capture(adapter, model, evaluation[:64])
        h, index = cap[0], torch.arange(64)
        for i, block in enumerate(adapter.blocks(model)):
            h = adapter.call(block, h, cap.calls[i].bind(index))
        diff = (adapter.head(model, h) - model_logits(model, evaluation[:64, :-1])).abs().max().item()
    windows = torch.cat([calib, evaluation])

    def plain() -> None:
        with torch.no_grad():
            for start in range(0, windows.shape[0], 256):
                model_logits(model, windows[start : start + 256, :-1])

    def captured() -> None:
        capture(adapter, model, calib)
        capture(adapter, model, evaluation)

    t_plain, t_capture = timed(plain, captured, repeats=max(1, repeats // 2), warmup=1)
    block = copy.deepcopy(adapter.blocks(model)[1]).requires_grad_(False)
    R, B = 12, 2
    params = {n: torch.stack([p] * R).clone().requires_grad_(True) for n, p in block.named_parameters()}
    cap = capture(adapter, model, calib[:64])
    index = torch.arange(R * B).view(R, B) % 64
    x, call = cap[1][index], cap.calls[1].bind(index)

    def stacked() -> None:
        Adapter.stacked_call(adapter, block, params, x, call).pow(2).mean().backward()

    def looped() -> None:
        outs = []
        for r in range(R):
            a, k = cap.calls[1].bind(index[r]).assemble(x[r])
            outs.append(block_output(functional_call(block, {n: v[r] for n, v in params.items()}, a, k)))
        torch.stack(outs).pow(2).mean().backward()

    def own() -> None:
        adapter.stacked_call(block, params, x, call).pow(2).mean().backward()

    fns = [stacked, looped, own] if isinstance(model, GPT) else [stacked, looped]
    times = timed(*fns, repeats=repeats * 2, warmup=1)
    started = time.perf_counter()
    peelnb.peel({0: model}, corpus, n_ctx=CTX, progress=False)
    t_peel = time.perf_counter() - started
    fast = f", hand-written {times[2] * 1e3:.1f} ms" if len(times) > 2 else ""
    return (f"{name:>10}: replay max |logits diff| {diff:.1e}; capture {t_capture * 1e3:.0f} ms vs plain forward "
            f"{t_plain * 1e3:.0f} ms ({t_capture / t_plain:.2f}); solver step of {R} references: vmap "
            f"{times[0] * 1e3:.1f} ms, loop {times[1] * 1e3:.1f} ms{fast}; whole peel {t_peel:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    corpus = Corpus.from_tokens(Corpus.bundled().train, vocab_size=VOCAB, name="bundled ids")
    calib, evaluation = peel_windows(corpus, CTX, calib_tokens=32768, eval_tokens=4096, seed=0)
    print(f"peelnb {peelnb.__version__}, torch {torch.__version__}, transformers {tf.__version__}, "
          f"{args.threads} threads; {LAYERS} layers, width {WIDTH}, context {CTX}\n")
    for name, model in models().items():
        print(measure(name, model, corpus, calib, evaluation, args.repeats))

if __name__ == "__main__":
    main()
