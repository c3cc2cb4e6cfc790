"""The main job: train a clean and a faulty model on the bundled corpus, peel both, report.

Run from the command line as ``peelnb demo``; every stage resumes from what an
interrupted earlier run left in the output folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import xarray as xr

from . import results
from .config import Fault, ModelConfig, TrainConfig
from .data import Corpus


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo: the model, its training, and the peel."""

    n_layer: int
    d_model: int
    n_head: int
    n_ctx: int
    steps: int
    batch_size: int
    fault: Fault
    bits: tuple[float, ...]
    permutations: int
    solver_steps: int
    calib_tokens: int
    eval_tokens: int
    seed: int = 0


FULL = DemoSettings(
    n_layer=6, d_model=64, n_head=4, n_ctx=64, steps=1000, batch_size=64, fault=Fault("frozen", 3),
    bits=(1.0, 1.58, 4.0, 32.0), permutations=3, solver_steps=50, calib_tokens=32768, eval_tokens=4096,
)
"""About 8 minutes on 2 CPU cores."""

QUICK = DemoSettings(
    n_layer=3, d_model=32, n_head=4, n_ctx=32, steps=300, batch_size=32, fault=Fault("frozen", 1),
    bits=(1.0, 1.58, 4.0, 32.0), permutations=3, solver_steps=25, calib_tokens=4096, eval_tokens=2048,
)
"""Under a minute on 2 CPU cores: for CI and a first try."""


def settings(*, quick: bool = False, fault: Fault | None = None, bits: tuple[float, ...] | None = None,
             permutations: int | None = None, steps: int | None = None, seed: int | None = None) -> DemoSettings:
    """Demo settings: `FULL` or `QUICK`, with any given option replacing its default."""
    chosen = QUICK if quick else FULL
    changes = {k: v for k, v in dict(fault=fault, bits=bits, permutations=permutations, steps=steps,
                                     seed=seed).items() if v is not None}
    chosen = replace(chosen, **changes)
    if chosen.fault.layer >= chosen.n_layer:
        raise ValueError(f"fault layer {chosen.fault.layer} is out of range: the demo model has "
                         f"{chosen.n_layer} layers (0..{chosen.n_layer - 1})")
    return chosen


def run_demo(out: str | Path, demo: DemoSettings, *, say: Callable[[str], None] = lambda _: None,
             progress: bool = True) -> dict[str, xr.Dataset]:
    """Train, peel and report; return the results keyed by run label.

    Writes ``out/clean/`` and ``out/<fault>/`` (run folders, each with its
    ``peel.nc``) and ``out/report.png``.
    """
    from .peeling import peel
    from .plot import overview
    from .train import train

    out = Path(out)
    corpus = Corpus.bundled()
    model = ModelConfig(vocab_size=corpus.vocab_size, n_layer=demo.n_layer, d_model=demo.d_model,
                        n_head=demo.n_head, n_ctx=demo.n_ctx)
    checkpoints = tuple(round(i * demo.steps / 4) for i in range(5))
    labels = {"clean": None, f"{demo.fault.kind}-{demo.fault.layer}": demo.fault}
    say(f"peelnb demo: {demo.n_layer}-layer GPT (d_model {demo.d_model}, context {demo.n_ctx}) on "
        f"{corpus.name}, {corpus.train.numel():,} training characters")
    peeled: dict[str, xr.Dataset] = {}
    for label, fault in labels.items():
        folder = out / label
        config = TrainConfig(steps=demo.steps, batch_size=demo.batch_size, checkpoints=checkpoints,
                             seed=demo.seed, fault=fault)
        what = f"run with a planted fault ({fault.kind} layer {fault.layer})" if fault else "clean run"
        say(f"- training the {what} for {demo.steps} steps -> {folder}")
        started = time.perf_counter()
        run = train(folder, model=model, config=config, corpus=corpus, progress=progress)
        say(f"  done in {time.perf_counter() - started:.0f} s; held-out loss {run.log[-1]['heldout_loss']:.3f} "
            f"at step {demo.steps}; checkpoints at steps {run.steps}")
        say(f"- peeling {len(run.steps)} checkpoints x {demo.n_layer} layers x {demo.permutations} permutations x "
            f"bits {', '.join(f'{b:g}' for b in demo.bits)} (replace view, K = {demo.solver_steps})")
        started = time.perf_counter()
        peeled[label] = peel(
            run, bits=demo.bits, permutations=demo.permutations, solver_steps=demo.solver_steps,
            calib_tokens=demo.calib_tokens, eval_tokens=demo.eval_tokens, seed=demo.seed,
            out=folder / "peel.nc", progress=progress,
        )
        say(f"  done in {time.perf_counter() - started:.0f} s -> {folder / 'peel.nc'}")
    figure = overview(peeled)
    report = out / "report.png"
    figure.savefig(report, dpi=110)
    say(f"- report figure -> {report}")
    return peeled


def verdict(ds: xr.Dataset, fault: Fault, bits: float) -> str:
    """One line on where the planted layer ranks at the last step."""
    table = ds.peel.summary(bits=bits)
    row = table[table["layer"] == fault.layer].iloc[0]
    flagged = "flagged under-optimized" if row["flagged"] else "not flagged"
    return (f"planted {fault.kind} layer {fault.layer} at {results.bits_phrase(bits)}: rank {row['rank']} of "
            f"{len(table)}, gap {row['gap']:+.4f} nats/token, {flagged}")

