"""What a peel costs, next to what training costs, on the demo model and on one 4x wider and 2x deeper.

For each model, in one process (timings; weights freshly initialized: the
cost of a peel does not depend on what the model learned):

1. one training step (AdamW, the demo's 64 x 64-token batch);
2. capture of one checkpoint (hooked forward over the peel's calibration and
   evaluation tokens) against one plain forward over the same tokens (goal <= 1.2);
3. one peel cell (layer, permutation, bits) against one training step: the
   per-reference share of peeling one layer (3 permutations x 4 bit-widths
   solved together, then verified), and one cell peeled alone; and one
   solver step of those references batched, per reference, against one
   forward+backward of the block on one reference's batch (goal <= 1.2);
4. a whole-checkpoint peel (all layers, 3 permutations, 4 bit-widths, the default K = 25),
   without and with ``baselines=True``, against the training time between two
   demo checkpoints (250 steps);
5. WeightWatcher's ``analyze()`` of the same checkpoint, and peelnb's own alpha;
6. the peak memory each of these adds, each in a fresh subprocess
   (``ru_maxrss``; see ``benchmarks/timing.py``).

Then, on the demo model: how a whole-checkpoint peel grows with layers,
width, calibration tokens and K (table + log-log figure), and a profile of
peeling one layer (where the time goes). The load average is printed next to
every figure: timings on a busy machine measure the queue.

Usage::

    python benchmarks/cost.py --quick     # demo model only, fewer points: about 2 minutes on 2 idle cores
    python benchmarks/cost.py             # both models, full scaling: about 11 minutes

The full run writes ``docs/cost/cost.csv``, ``docs/cost/scaling.csv`` and
``docs/img/cost_scaling.png``; ``--quick`` writes the same files under
``$PEELNB_BENCH_CACHE/cost-quick`` (default ``/tmp/peelnb-bench``), so it never
replaces the committed full results (``--out`` changes the folder,
``--no-save`` writes nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detection import weightwatcher_alpha  # noqa: E402
from timing import load, machine, mib, once, peak_memory, timed  # noqa: E402

import peelnb  # noqa: E402
from peelnb import peeling, solver  # noqa: E402
from peelnb._optim import adam  # noqa: E402
from peelnb.adapters import GPTAdapter  # noqa: E402
from peelnb.config import ModelConfig, PeelConfig  # noqa: E402
from peelnb.data import Corpus, random_windows, seeded_generator  # noqa: E402
from peelnb.model import GPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK_OUT = Path(os.environ.get("PEELNB_BENCH_CACHE", "/tmp/peelnb-bench")) / "cost-quick"
BATCH, CTX, CHECKPOINT_EVERY = 64, 64, 250
PEEL = dict(bits=(1.0, 1.58, 4.0, 32.0), permutations=3, calib_tokens=32768, eval_tokens=4096)
"""The peel's defaults, spelled out (K is the replace view's default, 25)."""


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    d_model: int
    n_head: int = 4

    def config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, n_layer=self.n_layer, d_model=self.d_model, n_head=self.n_head,
                           n_ctx=CTX)


DEMO = Shape("demo (6 x 64)", 6, 64)
BIG = Shape("4x wider, 2x deeper (12 x 256)", 12, 256, 8)


# --- what each measurement runs (module level: the memory subprocesses import them) -------------------------------

def setup(shape: Shape, peel: dict | None = None) -> dict[str, Any]:
    corpus = Corpus.bundled()
    model = GPT(shape.config(corpus.vocab_size), seed=0)
    peel = {**PEEL, **(peel or {})}
    config = PeelConfig(**peel)
    calib, evaluation = peeling.peel_windows(corpus, CTX, calib_tokens=config.calib_tokens,
                                             eval_tokens=config.eval_tokens, seed=0)
    return dict(shape=shape, corpus=corpus, model=model, peel=peel, config=config, calib=calib,
                evaluation=evaluation, batch=random_windows(corpus.train, BATCH, CTX, seeded_generator(0)))


def train_step_fn(state: dict[str, Any]):  # noqa: ANN201
    model, batch = state["model"], state["batch"]
    model.train().requires_grad_(True)
    optimizer = adam(model.parameters(), decoupled=True, lr=1e-4)

    def step() -> None:
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run_train_step(state: dict[str, Any]) -> None:
    train_step_fn(state)()


def _windows(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"fit": state["calib"], "select": state["calib"][:0], "eval": state["evaluation"]}


def run_capture(state: dict[str, Any]) -> None:
    model = state["model"].eval().requires_grad_(False)
    peeling.capture_checkpoint(GPTAdapter(), model, 0, _windows(state), vocab_size=state["corpus"].vocab_size)


def run_plain(state: dict[str, Any]) -> None:
    model = state["model"].eval()
    tokens = torch.cat([state["calib"], state["evaluation"]])
    step = max(1, peeling.CHUNK_TOKENS // CTX)
    with torch.no_grad():
        for start in range(0, tokens.shape[0], step):
            model(tokens[start : start + step, :-1])


def run_layer(state: dict[str, Any], config: PeelConfig | None = None) -> None:
    model = state["model"].eval().requires_grad_(False)
    captured = state.get("captured") or peeling.capture_checkpoint(GPTAdapter(), model, 0, _windows(state),
                                                                     vocab_size=state["corpus"].vocab_size)
    state["captured"] = captured
    peeling.peel_layer(captured, state["shape"].n_layer // 2, config or state["config"], lr=peeling.REPLACE_LR)


def solver_step_times(state: dict[str, Any], repeats: int) -> tuple[float, float, int, int]:
    """One batched solver step of the middle layer, and one block forward+backward on one reference's batch.

    The step is measured through `peelnb.solver.solve` itself: a K-step solve minus a 1-step solve, over
    K - 1, so setup and snapshotting cancel out. Returns (step seconds, block seconds, references, batch).
    """
    captured, config = state["captured"], state["config"]
    layer, fit = state["shape"].n_layer // 2, captured.splits["fit"]
    block = captured.replay.blocks[layer]
    data = solver.LayerData(fit[layer], fit[layer + 1], captured.tokens["fit"], fit_call=fit.calls[layer])

    def solve(k: int) -> None:
        solver.solve(GPTAdapter(), block, data, PeelConfig(**{**state["peel"], "solver_steps": k}), layer=layer,
                     n_layer=captured.n_layer, lr=peeling.REPLACE_LR)

    K, b = config.solver_steps, config.batch_size
    plain = peeling._unquantized(GPTAdapter(), block).requires_grad_(True)
    x = fit[layer][:b].float().clone().requires_grad_(True)

    def block_step() -> None:
        plain.zero_grad(set_to_none=True)
        plain(x).pow(2).mean().backward()

    t_long, t_short, t_block = timed(lambda: solve(K), lambda: solve(1), block_step, repeats=repeats, warmup=1)
    return (t_long - t_short) / (K - 1), t_block, len(config.bits) * len(config.permutations), b


def run_peel(state: dict[str, Any], baselines: bool = False) -> None:
    extra = {"baselines": True} if baselines else {}
    peelnb.peel({0: state["model"]}, progress=False, **state["peel"], **extra)


def run_peel_baselines(state: dict[str, Any]) -> None:
    run_peel(state, baselines=True)


def run_weightwatcher(state: dict[str, Any]) -> None:
    weightwatcher_alpha(state["model"], state["shape"].n_layer)


def run_alpha(state: dict[str, Any]) -> None:
    from peelnb.baselines import alpha

    alpha(GPTAdapter(), state["model"], range(state["shape"].n_layer))


# --- the report ----------------------------------------------------------------------------------------------------

def measure_model(shape: Shape, *, repeats: int, memory: bool, rows: list[dict]) -> None:
    state = setup(shape)
    model, config = state["model"], state["config"]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n== {shape.name}: {shape.n_layer} layers, d_model {shape.d_model}, context {CTX}, "
          f"{n_params:,} parameters ({load()})", flush=True)

    def record(item: str, seconds: float, note: str = "") -> None:
        rows.append(dict(model=shape.name, item=item, seconds=seconds, note=note, load=load()))

    step = train_step_fn(state)
    for _ in range(3):
        step()
    sustained = 10 if shape is BIG else 30
    t_train = once(lambda: [step() for _ in range(sustained)]) / sustained
    between = t_train * CHECKPOINT_EVERY
    record("training step", t_train, f"{BATCH} x {CTX} tokens")
    print(f"1. training step ({BATCH} x {CTX} tokens, mean of {sustained} in a row): {t_train * 1e3:.1f} ms; "
          f"{CHECKPOINT_EVERY} steps between demo checkpoints: {between:.1f} s  [{load()}]", flush=True)

    n_tokens = (state["calib"].shape[0] + state["evaluation"].shape[0]) * CTX
    t_plain, t_capture = timed(lambda: run_plain(state), lambda: run_capture(state),
                               repeats=max(2, repeats // (3 if shape is BIG else 1)))
    record("plain forward", t_plain, f"{n_tokens} tokens")
    record("capture", t_capture, f"{n_tokens} tokens")
    print(f"2. capture of {n_tokens:,} tokens: {t_capture * 1e3:.0f} ms vs plain forward {t_plain * 1e3:.0f} ms: "
          f"ratio {t_capture / t_plain:.2f} (goal <= 1.2)  [{load()}]", flush=True)

    run_layer(state)  # capture once, warm up
    R = len(config.bits) * len(config.permutations)
    single = PeelConfig(**{**state["peel"], "bits": (32.0,), "permutations": 1})
    t_layer, t_single = timed(lambda: run_layer(state), lambda: run_layer(state, single),
                              repeats=max(1, repeats // (4 if shape is BIG else 2)), warmup=0)
    record("peel one layer (12 cells)", t_layer)
    record("peel one cell alone", t_single)
    print(f"3. one layer's {R} cells ({len(config.permutations)} permutations x {len(config.bits)} bits, K = "
          f"{config.solver_steps}): {t_layer:.2f} s, so {t_layer / R * 1e3:.0f} ms per cell = "
          f"{t_layer / R / t_train:.1f} training steps; one cell peeled alone {t_single * 1e3:.0f} ms = "
          f"{t_single / t_train:.1f} training steps  [{load()}]", flush=True)
    t_step, t_block, refs, b = solver_step_times(state, repeats=max(2, repeats // (3 if shape is BIG else 1)))
    record("solver step (all references of a layer)", t_step, f"{refs} references x {b} sequences")
    record("block forward+backward", t_block, f"{b} sequences")
    print(f"   one solver step, {refs} references x {b} sequences batched: {t_step * 1e3:.1f} ms = "
          f"{t_step / refs * 1e3:.2f} ms per reference vs one block forward+backward on its {b} sequences "
          f"{t_block * 1e3:.2f} ms: ratio {t_step / refs / t_block:.2f} (goal <= 1.2)  [{load()}]", flush=True)
    state.pop("captured")

    t_peel, t_base = timed(lambda: run_peel(state), lambda: run_peel_baselines(state),
                           repeats=1 if shape is BIG else 2, warmup=0)
    record("whole-checkpoint peel", t_peel)
    record("whole-checkpoint peel, baselines=True", t_base)
    print(f"4. whole-checkpoint peel ({shape.n_layer} layers x {len(config.permutations)} permutations x "
          f"{len(config.bits)} bits): {t_peel:.1f} s = {100 * t_peel / between:.0f}% of the {between:.1f} s of "
          f"training between two demo checkpoints; with baselines=True {t_base:.1f} s "
          f"(+{t_base - t_peel:.1f} s)  [{load()}]", flush=True)

    t_ww, t_alpha = timed(lambda: run_weightwatcher(state), lambda: run_alpha(state), repeats=2, warmup=1)
    record("WeightWatcher analyze()", t_ww)
    record("peelnb alpha", t_alpha)
    print(f"5. WeightWatcher analyze() of the checkpoint: {t_ww:.2f} s ({100 * t_ww / t_peel:.0f}% of the peel); "
          f"peelnb's own alpha of every block: {t_alpha:.2f} s  [{load()}]", flush=True)

    if memory:
        parts = [("training step", run_train_step), ("plain forward", run_plain), ("capture", run_capture),
                 ("peel one layer (12 cells)", run_layer), ("whole-checkpoint peel", run_peel),
                 ("whole-checkpoint peel, baselines=True", run_peel_baselines),
                 ("WeightWatcher analyze()", run_weightwatcher)]
        print("6. peak memory added (fresh subprocess each: resident-set peak during the step minus resident "
              "after setup):", flush=True)
        for item, fn in parts:
            base, added = peak_memory(setup, fn, shape, threads=torch.get_num_threads())
            for row in rows:
                if row["model"] == shape.name and row["item"] == item:
                    row["peak_added_bytes"], row["setup_bytes"] = added, base
            print(f"   {item:40s} {mib(added):>10} (process after setup: {mib(base)})", flush=True)


def scaling(*, quick: bool) -> pd.DataFrame:
    """Whole-checkpoint peel time of the demo family, one factor at a time."""
    base = dict(n_layer=4, d_model=64, calib_tokens=32768, solver_steps=25)
    grid = {
        "n_layer": [2, 4, 8] if not quick else [2, 4],
        "d_model": [32, 64, 128] if not quick else [32, 64],
        "calib_tokens": [8192, 16384, 32768, 65536] if not quick else [8192, 16384],
        "solver_steps": [10, 25, 50, 100, 200] if not quick else [10, 25],
    }
    rows = []
    print(f"\n== scaling: whole-checkpoint peel (3 permutations x 4 bits), one factor at a time around {base}",
          flush=True)
    for factor, values in grid.items():
        for value in values:
            settings = {**base, factor: value}
            shape = Shape("scaling", settings["n_layer"], settings["d_model"])
            state = setup(shape, dict(calib_tokens=settings["calib_tokens"], solver_steps=settings["solver_steps"]))
            seconds = once(lambda state=state: run_peel(state))
            rows.append(dict(factor=factor, value=value, seconds=seconds, load=load(), **settings))
            print(f"   {factor:12s} = {value:6d}: {seconds:6.1f} s  [{load()}]", flush=True)
    frame = pd.DataFrame(rows)
    for factor, group in frame.groupby("factor", sort=False):
        slope = np.polyfit(np.log(group["value"]), np.log(group["seconds"]), 1)[0]
        print(f"   log-log slope in {factor}: {slope:.2f}", flush=True)
    return frame


def plot_scaling(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = list(dict.fromkeys(frame["factor"]))
    fig, axes = plt.subplots(1, len(factors), figsize=(3.2 * len(factors), 3.0), layout="constrained", sharey=True)
    for ax, factor in zip(np.atleast_1d(axes), factors):
        group = frame[frame["factor"] == factor]
        slope = np.polyfit(np.log(group["value"]), np.log(group["seconds"]), 1)[0]
        ax.loglog(group["value"], group["seconds"], "o-")
        ax.set_xlabel(factor)
        ax.set_title(f"slope {slope:.2f}", fontsize="medium")
        ax.set_xticks(group["value"], [f"{v:g}" for v in group["value"]])
        ax.set_yticks([1, 2, 5, 10, 20], ["1", "2", "5", "10", "20"])
        ax.minorticks_off()
    np.atleast_1d(axes)[0].set_ylabel("whole-checkpoint peel (s)")
    fig.suptitle("peel time against model and solver size (one factor at a time, log-log)", fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def profile_layer() -> None:
    """Where the time of peeling one layer goes (torch profiler, CPU, operators by self time)."""
    from torch.profiler import ProfilerActivity, profile

    state = setup(DEMO)
    run_layer(state)  # capture, warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_layer(state)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul_ops = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm",
                  "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
    matmul = sum(e.self_cpu_time_total for e in events if e.key in matmul_ops)
    print(f"\n== profile of peeling one layer of the demo model (12 cells, K = {state['config'].solver_steps}; "
          f"{load()})", flush=True)
    print(f"   matmuls and attention kernels: {100 * matmul / total:.0f}% of operator self time", flush=True)
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"   {e.key:60s} {100 * e.self_cpu_time_total / total:5.1f}%  ({e.count} calls)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo model only, fewer scaling points")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default docs/, or "
                        "$PEELNB_BENCH_CACHE/cost-quick with --quick)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    out = args.out or (QUICK_OUT if args.quick else ROOT / "docs")
    torch.manual_seed(0)
    started = time.perf_counter()
    print(f"peelnb {peelnb.__version__}; {machine()}; {load()}", flush=True)
    rows: list[dict] = []
    for shape in (DEMO,) if args.quick else (DEMO, BIG):
        measure_model(shape, repeats=args.repeats, memory=not args.no_memory, rows=rows)
    frame = scaling(quick=args.quick)
    profile_layer()
    if not args.no_save:
        folder = out / "cost"
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(folder / "cost.csv", index=False)
        frame.to_csv(folder / "scaling.csv", index=False)
        plot_scaling(frame, out / "img" / "cost_scaling.png")
        print(f"\nwrote {folder / 'cost.csv'}, {folder / 'scaling.csv'}, {out / 'img' / 'cost_scaling.png'}")
    print(f"done in {time.perf_counter() - started:.0f} s; {load()}")


if __name__ == "__main__":
    main()
