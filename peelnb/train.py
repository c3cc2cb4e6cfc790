"""Training loop: AdamW, warm-up + cosine schedule, checkpoints, planted faults.

Every random choice is drawn from a generator seeded by ``(seed, step)`` or
``(seed, purpose, layer)``, so an interrupted run resumed from its last
checkpoint ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from ._optim import adam
from .checkpoints import OPTIMIZER_FILE, Run, checkpoint_path, save_checkpoint
from .config import ModelConfig, TrainConfig
from .data import Corpus, random_windows, seeded_generator, spread_windows
from .model import GPT, init_block_

log = logging.getLogger(__name__)

SLOW_LR_SCALE = 0.02
RESET_AT = 0.8
NOISE_SCALE = 0.5
_RESET_KEY, _NOISE_KEY = 1, 2


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to ``lr_min``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(config.steps - config.warmup, 1)
    progress = min((step - config.warmup) / span, 1.0)
    return config.lr_min + 0.5 * (config.lr - config.lr_min) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def heldout_loss(model: GPT, windows: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token loss (nats/token) of ``model`` on ``(n, n_ctx + 1)`` windows."""
    model.eval()
    total = 0.0
    for chunk in windows.split(batch_size):
        total += model.loss(chunk[:, :-1], chunk[:, 1:]).item() * chunk.shape[0]
    return total / windows.shape[0]


def _param_groups(model: GPT, config: TrainConfig) -> list[dict]:
    """AdamW groups: decay on matrices only; the planted layer apart for ``slow``/``frozen``."""
    fault = config.fault
    faulty = {id(p) for p in model.blocks[fault.layer].parameters()} if fault else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        in_fault = id(param) in faulty
        if in_fault and fault.kind == "frozen":
            param.requires_grad_(False)
            continue
        groups.setdefault((param.dim() >= 2, in_fault and fault.kind == "slow"), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": config.weight_decay if decay else 0.0,
            "lr_scale": SLOW_LR_SCALE if slow else 1.0,
        }
        for (decay, slow), params in sorted(groups.items())
    ]


def _plant_noise(model: GPT, config: TrainConfig) -> None:
    """Add Gaussian noise of ``NOISE_SCALE`` times each weight matrix's std to the faulty layer."""
    generator = seeded_generator(config.seed, _NOISE_KEY, config.fault.layer)
    with torch.no_grad():
        for param in model.blocks[config.fault.layer].parameters():
            if param.dim() >= 2:
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.add_(noise * NOISE_SCALE * param.std())


def _resume_point(out: Path) -> int:
    """Step to resume from in an existing run folder (0 when starting over)."""
    optimizer_file = out / OPTIMIZER_FILE
    if not optimizer_file.is_file():
        return 0
    step = int(torch.load(optimizer_file, map_location="cpu", weights_only=True)["step"])
    return step if checkpoint_path(out, step).is_file() else 0


def train(
    out: str | Path,
    *,
    model: ModelConfig,
    config: TrainConfig | None = None,
    corpus: Corpus | None = None,
    progress: bool = True,
) -> Run:
    """Train a `GPT` on a corpus, saving checkpoints into a run folder.

    Parameters
    ----------
    out : str or Path
        Run folder. If it already holds this same run, training resumes from
        its last checkpoint (or returns at once when the run is complete).
    model : ModelConfig
        Model shape; ``vocab_size`` must match the corpus.
    config : TrainConfig, optional
        Training settings (default ``TrainConfig()``).
    corpus : Corpus, optional
        Training data; default the bundled Shakespeare tragedies.
    progress : bool
        Show a progress bar.

    Returns
    -------
    Run
        The run folder, with checkpoints at ``config.checkpoints``.

    Raises
    ------
    ValueError
        If the settings do not fit together (vocabulary, fault layer, context)
        or ``out`` holds a different run.
    """
    config = config or TrainConfig()
    corpus = corpus or Corpus.bundled()
    out = Path(out)
    if corpus.vocab_size != model.vocab_size:
        raise ValueError(
            f"model vocab_size={model.vocab_size} but the corpus has {corpus.vocab_size} token ids: "
            f"use ModelConfig(vocab_size={corpus.vocab_size}, ...)"
        )
    if config.fault and config.fault.layer >= model.n_layer:
        raise ValueError(f"fault layer {config.fault.layer} is out of range for a model of {model.n_layer} layers")
    corpus.check_context(model.n_ctx)
    checkpoints = set(config.checkpoints)
    meta: dict = {
        "peelnb_version": __version__,
        "model": model.to_dict(),
        "train": config.to_dict(),
        "corpus": corpus.name,
        "tokenizer": corpus.tokenizer.chars if corpus.tokenizer else None,
        "log": [],
        "complete": False,
    }
    meta = json.loads(json.dumps(meta))  # compare in the form run.json stores
    start = 0
    if (out / "run.json").is_file():
        existing = Run(out).meta
        if any(existing.get(k) != meta[k] for k in ("model", "train", "corpus", "tokenizer")):
            raise ValueError(
                f"{str(out)!r} already holds a different run (other settings or corpus): "
                "choose another output folder or delete it"
            )
        if existing.get("complete"):
            return Run(out)
        start = _resume_point(out)
        meta["log"] = [e for e in existing["log"] if e["step"] <= start] if start else []

    gpt = GPT(model, seed=config.seed)
    optimizer = adam(_param_groups(gpt, config), decoupled=True, lr=config.lr, betas=(0.9, 0.95))
    if start:
        gpt.load_state_dict(Run(out).load(start).model.state_dict())
        optimizer.load_state_dict(torch.load(out / OPTIMIZER_FILE, map_location="cpu", weights_only=True)["state"])
        log.info("resuming %s from step %d", out, start)
    eval_windows = spread_windows(corpus.heldout, max(1, config.eval_tokens // model.n_ctx), model.n_ctx)
    reset_step = round(RESET_AT * config.steps) if config.fault and config.fault.kind == "reset" else None

    def save(step: int, lr: float, train_loss: float) -> None:
        loss = heldout_loss(gpt, eval_windows)
        meta["log"].append({"step": step, "train_loss": train_loss, "heldout_loss": loss, "lr": lr})
        if step in checkpoints:
            save_checkpoint(checkpoint_path(out, step), gpt, step=step, lr=lr)
            torch.save({"step": step, "state": optimizer.state_dict()}, out / OPTIMIZER_FILE)
        meta["complete"] = step == config.steps
        Run.write_meta(out, meta)
        gpt.train()

    if start == 0:
        save(0, 0.0, math.nan)
    bar = tqdm(total=config.steps, initial=start, desc=f"train {out.name}", disable=not progress, leave=False)
    losses: list[float] = []
    started = time.perf_counter()
    gpt.train()
    for step in range(start, config.steps):
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        batch = random_windows(corpus.train, config.batch_size, model.n_ctx, seeded_generator(config.seed, step))
        loss = gpt.loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(gpt.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        done = step + 1
        if done == reset_step:
            block = gpt.blocks[config.fault.layer]
            init_block_(block, model.n_layer, seeded_generator(config.seed, _RESET_KEY, config.fault.layer))
            for param in block.parameters():
                optimizer.state.pop(param, None)
        if done == config.steps and config.fault and config.fault.kind == "noise":
            _plant_noise(gpt, config)
        if done in checkpoints or done % config.eval_every == 0:
            save(done, lr, sum(losses) / len(losses))
            losses.clear()
            bar.set_postfix(heldout=f"{meta['log'][-1]['heldout_loss']:.3f}")
        bar.update(1)
    bar.close()
    if not meta["complete"]:  # interrupted after the final checkpoint, before run.json said so
        save(config.steps, lr_at(config.steps - 1, config), math.nan)
    log.info("trained %s: %d steps in %.1f s", out, config.steps - start, time.perf_counter() - started)
    return Run(out)
