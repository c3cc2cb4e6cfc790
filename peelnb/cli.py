"""The ``peelnb`` command: demo, train, peel, summary."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import __version__
from .results import RANKINGS

SUMMARY_COLUMNS = ["rank", "layer", "bits", "gap", "noise", "tolerance", "flagged", "loss_ref", "loss_model_q",
                   "local_err"]


def _bits(text: str) -> tuple[float, ...]:
    from .config import check_bits

    try:
        return tuple(check_bits(b) for b in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(i) for i in text.split(",") if i.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _fault(text: str):  # noqa: ANN202 - Fault, imported lazily
    from .config import Fault

    try:
        return Fault.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _table(frame) -> str:  # noqa: ANN001 - pandas DataFrame
    shown = frame[[c for c in [*SUMMARY_COLUMNS, *(c for c in RANKINGS if c not in SUMMARY_COLUMNS)] if c in frame]]
    return shown.to_string(index=False, float_format=lambda x: f"{x:.4f}", formatters={"bits": "{:g}".format})


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo, settings, verdict

    demo = settings(quick=args.quick, fault=args.fault, bits=args.bits, permutations=args.permutations,
                    steps=args.steps, seed=args.seed)
    peeled = run_demo(args.out, demo, say=print, progress=not args.no_progress)
    for label, ds in peeled.items():
        step = int(ds["step"][-1])
        print(f"\n{label}: layers ranked most under-optimized first, step {step}, bits 32 and 1.58")
        frame = ds.peel.summary()
        print(_table(frame[frame["bits"].isin([32.0, 1.58])]))
    faulty = peeled[f"{demo.fault.kind}-{demo.fault.layer}"]
    print()
    for bits in (32.0, 1.58):
        if bits in demo.bits:
            print(verdict(faulty, demo.fault, bits))
    clean = peeled["clean"].peel.flagged().isel(step=-1)
    flagged = int(clean.any("bits").sum())
    print(f"clean run: {flagged} of {clean.sizes['layer']} layers flagged at the last step")
    if args.quick and flagged:
        print("  (--quick trains too briefly for every healthy layer to pull clear of its cheap references; "
              "run without --quick for a model trained long enough to tell them apart)")
    print(f"\nfigure: {Path(args.out) / 'report.png'}")


def _train(args: argparse.Namespace) -> None:
    from .config import ModelConfig, TrainConfig
    from .data import Corpus, load_text
    from .train import train

    corpus = Corpus.bundled() if args.text is None else Corpus.from_text(load_text(args.text), name=args.text)
    model = ModelConfig(vocab_size=corpus.vocab_size, n_layer=args.layers, d_model=args.d_model,
                        n_head=args.heads, n_ctx=args.ctx, bits=args.model_bits)
    config = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, lr_min=args.lr / 10,
                         seed=args.seed, fault=args.fault)
    run = train(args.out, model=model, config=config, corpus=corpus, progress=not args.no_progress)
    print(f"{run}: held-out loss {run.log[-1]['heldout_loss']:.4f} at step {run.log[-1]['step']}")


@contextlib.contextmanager
def _memory_said() -> Iterator[None]:
    """Print the memory a peel will use (the ``peelnb.memory`` log) to stderr before it starts."""
    logger = logging.getLogger("peelnb.memory")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("peelnb: %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _peel(args: argparse.Namespace) -> None:
    from .peeling import peel

    with _memory_said():
        ds = peel(args.run, args.data, view=args.view, bits=args.bits, permutations=args.permutations,
                  layers=args.layers, solver_steps=args.solver_steps, lr=args.lr, batch_size=args.batch,
                  calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens, seed=args.seed, out=args.out,
                  references=args.references, progress=not args.no_progress, revisions=args.revisions,
                  tokenizer=args.tokenizer, n_ctx=args.ctx, capture_dtype=args.capture_dtype,
                  memory_budget=args.memory_budget, baselines=args.baselines)
    print(_table(ds.peel.summary(n=args.top)))
    print(f"\nresult: {args.out}")


def _summary(args: argparse.Namespace) -> None:
    from .results import open as open_result

    ds = open_result(args.file)
    table = ds.peel.summary(step=args.step, bits=args.bits_one, n=args.top, by=args.by)
    print(f"{args.file}: {ds.attrs.get('view')} view, source {ds.attrs.get('source')}, fault {ds.attrs.get('fault')}")
    print(f"layers ranked by {args.by} at step {int(table['step'].iloc[0])}, most under-optimized first")
    print(_table(table))


def parser() -> argparse.ArgumentParser:
    """The argument parser of the ``peelnb`` command."""
    main = argparse.ArgumentParser(prog="peelnb", description="Find the layers of a transformer that are not "
                                   "actually optimized, at every stage of training.")
    main.add_argument("--version", action="version", version=f"peelnb {__version__}")
    main.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = main.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a clean and a faulty model on the bundled corpus, peel both, report")
    demo.add_argument("--out", default="peelnb-demo", help="output folder (default ./peelnb-demo)")
    demo.add_argument("--quick", action="store_true", help="tiny configuration, under a minute")
    demo.add_argument("--fault", type=_fault, help="planted fault KIND:LAYER (frozen, slow, reset, noise)")
    demo.add_argument("--bits", type=_bits, help="reference bit-widths, e.g. 1,1.58,4,32")
    demo.add_argument("--permutations", type=_positive, help="solver orderings (default 3)")
    demo.add_argument("--steps", type=_positive, help="training steps")
    demo.add_argument("--seed", type=int, help="random seed (default 0)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="train a GPT on the bundled corpus (or --text) with checkpoints")
    train.add_argument("out", help="run folder")
    train.add_argument("--text", help="train on this UTF-8 text file instead of the bundled corpus")
    train.add_argument("--layers", type=_positive, default=6)
    train.add_argument("--d-model", type=_positive, default=64)
    train.add_argument("--heads", type=_positive, default=4)
    train.add_argument("--ctx", type=_positive, default=64)
    train.add_argument("--model-bits", type=float, default=32.0, help="quantization-aware training bit-width")
    train.add_argument("--steps", type=_positive, default=1000)
    train.add_argument("--batch", type=_positive, default=32)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--fault", type=_fault, help="planted fault KIND:LAYER")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_train)

    peel = sub.add_parser("peel", help="peel the checkpoints of a run folder")
    peel.add_argument("run", help="run folder (written by peelnb train / demo), Hugging Face model folder, folder of "
                      "checkpoint-N/ or stepN/ folders, or hub model id (with --revisions)")
    peel.add_argument("--out", required=True, help="result netCDF file (resumed if it exists)")
    peel.add_argument("--data", help="text file to peel on (default the run's corpus)")
    peel.add_argument("--view", choices=["replace", "headroom"], default="replace",
                      help="replace: lightweight references from scratch (default); headroom: repair the trained "
                      "layer")
    peel.add_argument("--bits", type=_bits, default=(1.0, 1.58, 4.0, 32.0), help="reference bit-widths (default "
                      "1,1.58,4,32)")
    peel.add_argument("--permutations", type=_positive, default=3, help="solver orderings (default %(default)s)")
    peel.add_argument("--layers", type=_layers, help="comma-separated layers (default all)")
    peel.add_argument("--solver-steps", "-K", type=_positive, help="solver steps (default by view: 25 replace, "
                      "50 headroom)")
    peel.add_argument("--lr", type=float, help="solver learning rate (default by view)")
    peel.add_argument("--batch", type=_positive, help="solver batch in sequences (default by view)")
    peel.add_argument("--calib-tokens", type=_positive, default=32768, help="tokens the references are fitted "
                      "on (default %(default)s)")
    peel.add_argument("--eval-tokens", type=_positive, default=4096, help="held-out tokens the losses are "
                      "measured on (default %(default)s)")
    peel.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    peel.add_argument("--references", help="folder to export every reference's weights to")
    peel.add_argument("--revisions", type=_names, help="comma-separated revisions (e.g. step1000,step2000), read "
                      "from the local Hugging Face cache")
    peel.add_argument("--tokenizer", help="Hugging Face tokenizer folder to encode --data with")
    peel.add_argument("--ctx", type=_positive, help="context window (default the model's, at most 128 for "
                      "Hugging Face models)")
    peel.add_argument("--capture-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                      help="storage dtype of cached activations")
    peel.add_argument("--memory-budget", help="memory the cached activations may take, e.g. 2GB: beyond it "
                      "layers are peeled in passes (same results)")
    peel.add_argument("--top", type=_positive, help="rows per bit-width in the printed summary")
    peel.add_argument("--baselines", action="store_true", help="also record grad_norm, weight_change and alpha")
    peel.add_argument("--no-progress", action="store_true")
    peel.set_defaults(func=_peel)

    summary = sub.add_parser("summary", help="print the ranked summary of a result file")
    summary.add_argument("file", help="result netCDF file")
    summary.add_argument("--step", type=int, help="step (default the last)")
    summary.add_argument("--bits", dest="bits_one", type=float, help="only this bit-width")
    summary.add_argument("--top", type=_positive, help="rows per bit-width")
    summary.add_argument("--by", choices=list(RANKINGS), default="gap", help="rank by the gap (default), "
                         "ablation, or a baseline of a peel with --baselines")
    summary.set_defaults(func=_summary)
    return main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peelnb`` command; returns the exit status."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    warnings.simplefilter("default")
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError) as err:
        if args.verbose:
            raise
        print(f"peelnb: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peelnb: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
