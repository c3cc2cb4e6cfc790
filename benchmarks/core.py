"""Cost of peeling the demo model, next to the cost of training it.

Prints, for the `peelnb demo` model (6 layers, d_model 64, context 64):

1. one training step;
2. capturing one checkpoint (hooked forward over calibration + evaluation
   tokens) relative to one plain forward pass over the same tokens (goal <= 1.1);
3. one replace-view solver step (all permutations x bits of a layer, batched)
   relative to one forward + backward of a single block over the same tokens
   (goal <= 1.2: the solver costs what its arithmetic costs);
4. a whole-checkpoint peel (all layers, 3 permutations, 4 bit-widths) relative
   to the training time between two demo checkpoints (goal <= 25%), and where
   its time goes.

Usage: ``python benchmarks/core.py [--repeats N]``. Weights are freshly
initialized: the cost of a peel does not depend on what the model learned.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import peelnb
import peelnb.peeling as peeling
import peelnb.solver as solver
from peelnb._optim import adam
from peelnb.adapters import GPTAdapter
from peelnb.config import ModelConfig, PeelConfig
from peelnb.data import Corpus, random_windows, seeded_generator, spread_windows
from peelnb.demo import FULL
from peelnb.model import GPT


def timed(*fns: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    """Best-of-``repeats`` wall time of each function in seconds, runs interleaved.

    Interleaving exposes every function to the same machine noise; the best
    run is the least disturbed one, as timeit reports.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            started = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    corpus = Corpus.bundled()
    config = ModelConfig(vocab_size=corpus.vocab_size, n_layer=FULL.n_layer, d_model=FULL.d_model,
                         n_head=FULL.n_head, n_ctx=FULL.n_ctx)
    model = GPT(config, seed=0)
    T = config.n_ctx
    print(f"peelnb {peelnb.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"demo model: {config.n_layer} layers, d_model {config.d_model}, context {T}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters\n")

    # 1. training step
    optimizer = adam(model.parameters(), decoupled=True, lr=1e-3)
    batch = random_windows(corpus.train, FULL.batch_size, T, seeded_generator(0))

    def train_step() -> None:
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):
        train_step()
    sustained = 30
    started = time.perf_counter()
    for _ in range(sustained):
        train_step()
    t_train = (time.perf_counter() - started) / sustained
    checkpoint_gap = FULL.steps // 4
    print(f"1. training step ({FULL.batch_size} x {T} tokens, mean of {sustained} in a row): {t_train * 1e3:.1f} ms; "
          f"{checkpoint_gap} steps between demo checkpoints: {t_train * checkpoint_gap:.1f} s")

    # 2. capture vs plain forward
    model.eval().requires_grad_(False)
    adapter = GPTAdapter()
    peel = PeelConfig(bits=FULL.bits, permutations=FULL.permutations, solver_steps=FULL.solver_steps,
                      calib_tokens=FULL.calib_tokens, eval_tokens=FULL.eval_tokens)
    calib = random_windows(corpus.train, peel.calib_tokens // T, T, seeded_generator(0, 11))
    evaluation = spread_windows(corpus.heldout, peel.eval_tokens // T, T)
    windows = torch.cat([calib, evaluation])
    step = peeling.CHUNK_TOKENS // T

    def plain() -> None:
        with torch.no_grad():
            for start in range(0, windows.shape[0], step):
                model(windows[start : start + step, :-1])

    def capture() -> None:
        peeling._capture(adapter, model, calib)
        peeling._capture(adapter, model, evaluation)

    t_plain, t_capture = timed(plain, capture, repeats=args.repeats)
    print(f"2. capture of {windows.shape[0] * T:,} tokens: {t_capture * 1e3:.0f} ms vs plain forward "
          f"{t_plain * 1e3:.0f} ms: ratio {t_capture / t_plain:.2f} (goal <= 1.1)")

    # 3. one solver step vs forward + backward of one block on the same tokens
    hidden = peeling._capture(adapter, model, calib)
    layer = config.n_layer // 2
    data = solver.LayerData(hidden[layer], hidden[layer + 1], calib[:, 1:])
    refs = solver.References(adapter, model.blocks[layer], peel, layer=layer, n_layer=config.n_layer)
    R, b = len(refs), peel.batch_size
    objective = solver._Objective("output", data, None)
    ref_optimizer = adam(refs.latent.values(), lr=3e-3)
    index = torch.arange(R * b).view(R, b)

    def solver_step() -> None:
        out = refs(refs.effective(), data.fit_in[index])
        loss = objective(out, data.fit_out[index], data.fit_tokens[index]).sum()
        ref_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ref_optimizer.step()

    block = peeling._unquantized(adapter, model.blocks[layer]).requires_grad_(True)
    x = data.fit_in[: R * b].clone().requires_grad_(True)

    def block_step() -> None:
        block.zero_grad(set_to_none=True)
        block(x).pow(2).mean().backward()

    x_one = data.fit_in[:b].clone().requires_grad_(True)

    def block_step_one() -> None:
        block.zero_grad(set_to_none=True)
        block(x_one).pow(2).mean().backward()

    t_solver, t_block, t_one = timed(solver_step, block_step, block_step_one, repeats=args.repeats * 4)
    print(f"3. solver step, {R} references x {b} sequences, batched: {t_solver * 1e3:.1f} ms, so "
          f"{t_solver / R * 1e3:.2f} ms per reference vs one block forward+backward on its {b} sequences "
          f"{t_one * 1e3:.2f} ms: ratio {t_solver / R / t_one:.2f} (goal <= 1.2)")
    print(f"   against one block forward+backward on all {R * b} sequences at once (same arithmetic, no "
          f"quantizer, no Adam) {t_block * 1e3:.1f} ms: ratio {t_solver / t_block:.2f}")

    # 4. whole-checkpoint peel vs training between checkpoints, with a breakdown
    spent: dict[str, float] = {"solve": 0.0, "verify": 0.0}
    real_solve, real_losses = solver.solve, peeling._Replay.verify

    def timed_solve(*a, **k):  # noqa: ANN002, ANN003, ANN202
        started = time.perf_counter()
        out = real_solve(*a, **k)
        spent["solve"] += time.perf_counter() - started
        return out

    def timed_losses(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        started = time.perf_counter()
        out = real_losses(self, *a, **k)
        spent["verify"] += time.perf_counter() - started
        return out

    peeling.solve, peeling._Replay.verify = timed_solve, timed_losses
    started = time.perf_counter()
    peelnb.peel({0: model}, bits=peel.bits, permutations=peel.permutations, solver_steps=peel.solver_steps,
                calib_tokens=peel.calib_tokens, eval_tokens=peel.eval_tokens, progress=False)
    t_peel = time.perf_counter() - started
    peeling.solve, peeling._Replay.verify = real_solve, real_losses
    between = t_train * checkpoint_gap
    rest = t_peel - spent["solve"] - spent["verify"]
    print(f"4. whole-checkpoint peel ({config.n_layer} layers x {len(peel.permutations)} permutations x "
          f"{len(peel.bits)} bits, K = {peel.solver_steps}): {t_peel:.1f} s = {100 * t_peel / between:.0f}% of the "
          f"{between:.1f} s of training between two demo checkpoints (goal <= 25%)")
    print(f"   local solves {spent['solve']:.1f} s, verification (held-out and calibration losses of references, "
          f"baselines) {spent['verify']:.1f} s, capture and the rest {rest:.1f} s")


if __name__ == "__main__":
    main()
