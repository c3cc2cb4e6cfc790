"""Planted-fault suite: does peeling find under-optimized layers better than the usual signals?

Trains small character models on the bundled corpus, in full precision and
ternary (1.58-bit quantization-aware), each clean or with one fault planted in
one layer (``frozen``, ``slow``, ``reset``, ``noise``; the layer rotates with
the seed), and lets every method rank the layers of the same final checkpoint:

- ``peel replace``: ``peelnb.peel`` with its defaults (the replace view), ranked by ``ds.peel.summary``;
- ``peel headroom``: the same with ``view="headroom"``;
- ``WeightWatcher alpha``: the ``weightwatcher`` package's per-matrix alpha, averaged per block (larger = worse);
- ``grad norm``: relative norm of the training-loss gradient of the block's parameters (``baselines=True``);
- ``ablation``: loss increase when the block is replaced by the identity (smaller = worse);
- ``weight change``: relative change of the block since the previous checkpoint (``baselines=True``).

For every case it records the planted layer's rank under each method (top-1
rate, mean rank) and, on clean controls, how many layers each method with a
flag rule flags. Noise cases are also repaired (``peelnb.repair``) with their
headroom references. Results go to ``docs/detection/`` (netCDF + CSV +
figure); trained runs and per-run measurements are cached under ``--cache``
(outside git) and reused by later invocations.

Usage::

    nice -n 10 python benchmarks/detection.py --quick     # a few minutes
    nice -n 10 python benchmarks/detection.py             # the full suite, under an hour on 2 cores

Each worker process uses one torch thread (``--workers`` processes at once):
on a small model one thread per process is faster than two threads sharing a
busy machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
DEFAULT_CACHE = Path(os.environ.get("PEELNB_BENCH_CACHE", "/tmp/peelnb-bench"))


@dataclass(frozen=True)
class Suite:
    """Sizes of one version of the suite."""

    name: str
    n_layer: int
    d_model: int
    n_head: int
    n_ctx: int
    steps: int
    batch_size: int
    seeds: tuple[int, ...]
    kinds: tuple[str, ...] = ("frozen", "slow", "reset", "noise")
    precisions: tuple[float, ...] = (32.0, 1.58)
    history: int = 3
    """How many of the last checkpoints the headroom view peels (the last one is ranked; earlier ones give
    its history); the replace view and the baselines peel the last two."""
    peel: dict = field(default_factory=dict)
    """Settings passed to every ``peelnb.peel`` call beyond the defaults."""

    def key(self) -> str:
        """Short hash of the settings that shape every trained run (the cache folder; runs are named by case)."""
        shape = {k: v for k, v in asdict(self).items()
                 if k in ("n_layer", "d_model", "n_head", "n_ctx", "steps", "batch_size")}
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]


FULL = Suite("full", n_layer=4, d_model=64, n_head=4, n_ctx=32, steps=1000, batch_size=32, seeds=(0, 1, 2))
LONG = Suite("long", n_layer=4, d_model=64, n_head=4, n_ctx=32, steps=3000, batch_size=32, seeds=(0, 1, 2),
             kinds=("noise",), precisions=(32.0,))
"""The hard case on models trained three times longer (``--long``): noise added after training."""
QUICK = Suite("quick", n_layer=3, d_model=32, n_head=4, n_ctx=32, steps=400, batch_size=32, seeds=(0,),
              peel=dict(calib_tokens=8192, eval_tokens=2048, solver_steps=25))


@dataclass(frozen=True)
class Case:
    """One trained run of the suite."""

    bits: float
    seed: int
    kind: str | None = None
    layer: int | None = None

    @property
    def name(self) -> str:
        fault = f"{self.kind}{self.layer}" if self.kind else "clean"
        return f"b{self.bits:g}-{fault}-s{self.seed}"

    @property
    def fault(self) -> str | None:
        return f"{self.kind}:{self.layer}" if self.kind else None


def cases(suite: Suite) -> list[Case]:
    """Clean controls and faulty runs; the planted layer rotates over 1..L-1 with seed and kind."""
    out = []
    for bits in suite.precisions:
        for seed in suite.seeds:
            out.append(Case(bits, seed))
            for i, kind in enumerate(suite.kinds):
                out.append(Case(bits, seed, kind, 1 + (seed + i) % (suite.n_layer - 1)))
    return out


def _worker_init() -> None:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("peelnb").setLevel(logging.WARNING)


def train_case(suite: Suite, case: Case, folder: Path) -> tuple[str, float]:
    """Train (or find complete) the run of one case; returns its name and the seconds spent."""
    from peelnb.config import Fault, ModelConfig, TrainConfig
    from peelnb.data import Corpus
    from peelnb.train import train

    started = time.perf_counter()
    corpus = Corpus.bundled()
    train(
        folder,
        model=ModelConfig(vocab_size=corpus.vocab_size, n_layer=suite.n_layer, d_model=suite.d_model,
                          n_head=suite.n_head, n_ctx=suite.n_ctx, bits=case.bits),
        config=TrainConfig(steps=suite.steps, batch_size=suite.batch_size, seed=case.seed,
                           fault=Fault.parse(case.fault) if case.fault else None),
        corpus=corpus,
        progress=False,
    )
    return case.name, time.perf_counter() - started


def weightwatcher_alpha(model: object, n_layer: int) -> list[float]:
    """The ``weightwatcher`` package's alpha of each block: its per-matrix alphas averaged per block."""
    import contextlib
    import io
    import logging
    import warnings

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import weightwatcher

        frame = weightwatcher.WeightWatcher(model=model).analyze()
    return [float(frame[frame["longname"].str.startswith(f"blocks.{layer}.")]["alpha"].mean())
            for layer in range(n_layer)]


def measure_case(suite: Suite, case: Case, folder: Path) -> tuple[str, float]:
    """Every method on one trained run; results cached in the run folder (re-runs skip what exists)."""
    import peelnb
    from peelnb._io import write_text_atomic
    from peelnb.adapters import GPTAdapter
    from peelnb.checkpoints import Run
    from peelnb.peeling import peel_windows
    from peelnb.repairing import heldout_loss

    started = time.perf_counter()
    run = Run(folder)
    steps = run.steps[-suite.history :]
    final = steps[-1]
    mapping = {step: run.checkpoint(step) for step in steps}
    settings = dict(bits=(case.bits,), progress=False, **suite.peel)
    # the replace view and the baselines need only the checkpoint before the last (weight change)
    peelnb.peel({step: mapping[step] for step in steps[-2:]}, baselines=True, out=folder / "replace.nc", **settings)
    refs = folder / "references"
    headroom = peelnb.peel(mapping, view="headroom", out=folder / "headroom.nc",
                           references=refs if case.kind == "noise" else None, **settings)
    ww_file = folder / "weightwatcher.json"
    if not ww_file.exists():
        alphas = weightwatcher_alpha(run.load(final).model, suite.n_layer)
        write_text_atomic(ww_file, json.dumps({"step": final, "alpha": alphas}))
    repair_file = folder / "repair.json"
    if case.kind == "noise" and not repair_file.exists():
        model = run.load(final).model
        loss_model = float(headroom["loss_model"].sel(step=final))
        _, planted = peelnb.repair(model, headroom, references=refs, layers=[case.layer], bits=case.bits)
        flagged = headroom.peel.flagged().sel(step=final, bits=case.bits)
        chosen = [int(layer) for layer in flagged["layer"].values[flagged.values]]
        _, default = peelnb.repair(model, headroom, references=refs, bits=case.bits)
        everything = list(range(suite.n_layer))
        _, every = peelnb.repair(model, headroom, references=refs, layers=everything, bits=case.bits)
        # the clean run of the same seed trains identically: its final checkpoint is this one before the noise
        clean = Run(folder.parent / Case(case.bits, case.seed).name)
        _, evaluation = peel_windows(run.corpus(), suite.n_ctx, calib_tokens=headroom.attrs["calib_tokens"],
                                     eval_tokens=headroom.attrs["eval_tokens"], seed=headroom.attrs["seed"])
        loss_clean = heldout_loss(GPTAdapter(), clean.load(final).model.eval(), evaluation)
        # a longer solve (K = 200) of the planted layer's headroom references, for a repair
        longer_refs = folder / "references-k200"
        longer = peelnb.peel({final: mapping[final]}, view="headroom", references=longer_refs,
                             **{**settings, "solver_steps": 200})
        _, planted_k200 = peelnb.repair(model, longer, references=longer_refs, layers=[case.layer], bits=case.bits)
        write_text_atomic(repair_file, json.dumps({
            "loss_model": loss_model, "loss_clean_twin": loss_clean, "repaired_planted": planted,
            "flagged": chosen, "repaired_flagged": default, "repaired_all": every,
            "repaired_planted_k200": planted_k200}))
    return case.name, time.perf_counter() - started


SWEEP: dict[str, list[dict]] = {
    "replace": [{}] + [dict(solver_steps=k) for k in (10, 50, 100)]
    + [dict(lr=lr) for lr in (1e-3, 1e-2)] + [dict(calib_tokens=8192)],
    "headroom": [{}] + [dict(solver_steps=k) for k in (25, 200)] + [dict(lr=3e-4), dict(calib_tokens=65536)],
}
SWEEP_SEEDS = (0, 1)
"""Settings tried one at a time around the defaults (``--sweep``), on the final checkpoint of the runs of
`SWEEP_SEEDS` (about 40 minutes on 2 cores for the full suite)."""


def sweep_name(view: str, change: dict) -> str:
    return f"{view} " + (", ".join(f"{k}={v:g}" for k, v in change.items()) or "defaults")


def sweep_case(suite: Suite, case: Case, folder: Path) -> tuple[str, float]:
    """Peel the final checkpoint of one run with every `SWEEP` setting; cached under ``sweep/``."""
    import peelnb
    from peelnb.checkpoints import Run

    started = time.perf_counter()
    run = Run(folder)
    final = run.steps[-1]
    (folder / "sweep").mkdir(exist_ok=True)
    for view, changes in SWEEP.items():
        for change in changes:
            path = folder / "sweep" / (sweep_name(view, change).replace(" ", "_").replace(",", "") + ".nc")
            if path.exists():
                continue
            began = time.perf_counter()
            ds = peelnb.peel({final: run.checkpoint(final)}, view=view, bits=(case.bits,), progress=False,
                             **{**suite.peel, **change})
            ds.attrs["wall_seconds"] = time.perf_counter() - began
            peelnb.save(ds, path)
    return case.name, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small version that finishes in a few minutes")
    parser.add_argument("--long", action="store_true", help="the noise case on models trained 3x longer")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="scratch folder for trained runs")
    parser.add_argument("--workers", type=int, default=2, help="processes at once, one torch thread each")
    parser.add_argument("--train-only", action="store_true", help="only train (or find) the runs")
    parser.add_argument("--sweep", action="store_true", help="also peel every run's final checkpoint with the "
                        "settings of SWEEP (choosing the defaults); adds about as much time again")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default docs/detection, "
                        "docs/detection-long with --long, the cache's report/ with --quick)")
    args = parser.parse_args(argv)
    suite = QUICK if args.quick else LONG if args.long else FULL
    folder = args.cache / f"detection-{suite.name}-{suite.key()}"
    todo = cases(suite)
    started = time.perf_counter()
    print(f"{len(todo)} runs under {folder}; load average {os.getloadavg()[0]:.1f}", flush=True)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        trained = [pool.submit(train_case, suite, case, folder / case.name) for case in todo]
        for future in trained:
            name, seconds = future.result()
            print(f"  trained {name} in {seconds:.0f} s", flush=True)
        print(f"training done after {time.perf_counter() - started:.0f} s", flush=True)
        if args.train_only:
            return
        measured = [pool.submit(measure_case, suite, case, folder / case.name) for case in todo]
        for future in measured:
            name, seconds = future.result()
            print(f"  measured {name} in {seconds:.0f} s", flush=True)
        if args.sweep:
            swept = [pool.submit(sweep_case, suite, case, folder / case.name) for case in todo
                     if case.seed in SWEEP_SEEDS]
            for future in swept:
                name, seconds = future.result()
                print(f"  swept {name} in {seconds:.0f} s", flush=True)
    print(f"measuring done after {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    from detection_report import report

    out = args.out or (folder / "report" if args.quick else ROOT / "docs" / {"long": "detection-long"}.get(
        suite.name, "detection"))
    report(suite, todo, folder, out, command=" ".join(["python benchmarks/detection.py", *(argv or sys.argv[1:])]),
           sweep_names=[sweep_name(view, change) for view, changes in SWEEP.items() for change in changes])
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
