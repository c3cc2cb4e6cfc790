"""What `PeelMonitor` costs a training run of the demo model.

Prints, for the `peelnb demo` model (6 layers, d_model 64, context 64, batch
64 x 64 tokens, AdamW):

1. one training step;
2. one monitored step (peel + append to the Zarr store) for the monitor's
   defaults and for lighter settings (fewer layers, permutations, bit-widths,
   solver steps K, calibration tokens), and the overhead each would add when
   peeling every 250 training steps (the demo's checkpoint interval);
3. the overhead `PeelMonitor.overhead` reports in a real loop.

Usage: ``python benchmarks/monitor.py [--steps N] [--every N]``. On a busy
machine wall times include waiting for a core; CPU times do not. Weights are
freshly initialized and trained for a few steps only: the cost of a peel
does not depend on what the model learned.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from peelnb import PeelMonitor
from peelnb.config import ModelConfig
from peelnb.data import Corpus
from peelnb.demo import FULL
from peelnb.model import GPT

SETTINGS = {
    "defaults (all layers, bits 1.58 + 32, 2 permutations, K = 25, 32k calibration tokens)": {},
    "layers 0 and 3 only": {"layers": (0, 3)},
    "1 permutation, bits 32 only": {"permutations": 1, "bits": (32,)},
    "K = 10, 8k calibration tokens": {"solver_steps": 10, "calib_tokens": 8192},
}
INTERVAL = 250


def training_step(model: GPT, optimizer: torch.optim.Optimizer, corpus: Corpus) -> None:
    starts = torch.randint(0, corpus.train.numel() - FULL.n_ctx - 1, (FULL.batch_size,))
    batch = corpus.train[starts[:, None] + torch.arange(FULL.n_ctx + 1)]
    optimizer.zero_grad()
    model.loss(batch[:, :-1], batch[:, 1:]).backward()
    optimizer.step()


def clocked(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn()``; on a busy machine CPU time is what the work itself costs."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps of the real loop (3)")
    parser.add_argument("--every", type=int, default=20, help="the real loop peels every N steps (3)")
    args = parser.parse_args()
    torch.manual_seed(0)
    corpus = Corpus.bundled()
    model = GPT(ModelConfig(vocab_size=corpus.vocab_size, n_layer=FULL.n_layer, d_model=FULL.d_model,
                            n_head=FULL.n_head, n_ctx=FULL.n_ctx))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        training_step(model, optimizer, corpus)
    wall, cpu = clocked(lambda: [training_step(model, optimizer, corpus) for _ in range(10)])
    step_wall, step_cpu = wall / 10, cpu / 10
    print(f"1. training step ({FULL.batch_size} x {FULL.n_ctx} tokens, mean of 10): {1000 * step_wall:.0f} ms "
          f"(CPU {1000 * step_cpu:.0f} ms); {INTERVAL} steps: {INTERVAL * step_wall:.1f} s "
          f"(CPU {INTERVAL * step_cpu:.1f} s)")

    print(f"2. one monitored step (peel + append), and its share of the CPU time when peeling every {INTERVAL} steps:")
    with tempfile.TemporaryDirectory() as folder:
        PeelMonitor(Path(folder) / "warmup.zarr", corpus, every=1, solver_steps=2)(model, 0)
        for i, (name, options) in enumerate(SETTINGS.items()):
            monitor = PeelMonitor(Path(folder) / f"{i}.zarr", corpus, every=1, **options)
            wall, cpu = clocked(lambda monitor=monitor: monitor(model, 0))
            share = cpu / (cpu + INTERVAL * step_cpu)
            print(f"   {name}: {wall:.2f} s (CPU {cpu:.2f} s), {100 * share:.1f}%")

        monitor = PeelMonitor(Path(folder) / "loop.zarr", corpus, every=args.every)
        for step in range(args.steps + 1):
            training_step(model, optimizer, corpus)
            monitor(model, step)
    print(f"3. real loop, {args.steps} steps peeled every {args.every} with the defaults: "
          f"{monitor.peel_seconds:.1f} s of {monitor.wall_seconds:.1f} s spent peeling ({len(monitor.steps)} peels), "
          f"PeelMonitor.overhead = {100 * monitor.overhead:.1f}%")


if __name__ == "__main__":
    main()
