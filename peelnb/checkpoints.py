"""Self-describing checkpoint files and run folders.

A run folder holds ``run.json`` (model and training settings, vocabulary,
corpus, loss log) and ``checkpoints/step_NNNNNNN.safetensors``, each carrying
the config that built it in its metadata. Checkpoints are read without pickle:
safetensors, or ``torch.load(..., weights_only=True)`` for ``.pt`` files.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ._io import atomic_path, write_text_atomic
from .config import ModelConfig, TrainConfig
from .data import BUNDLED_NAME, CharTokenizer, Corpus, load_text
from .model import GPT

RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.pt"
FORMAT = "peelnb-gpt"
COMPILE_PREFIX = "_orig_mod."
_STEP_NAME = re.compile(r"step_(\d+)\.safetensors$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Path of the checkpoint of ``step`` inside a run folder."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}.safetensors"


def save_checkpoint(path: str | Path, model: GPT, *, step: int, lr: float | None = None) -> None:
    """Write ``model``'s weights and config to a safetensors file, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "step": str(step),
        "config": json.dumps(model.config.to_dict()),
        "lr": "" if lr is None else repr(float(lr)),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint file, read without executing code.

    Parameters
    ----------
    path : str or Path
        A ``.safetensors`` file, or a ``.pt``/``.pth``/``.bin`` file holding a
        state dict (loaded with ``weights_only=True``).

    Returns
    -------
    state : dict of str to Tensor
        The weights, with ``torch.compile``'s ``_orig_mod.`` prefixes removed.
    metadata : dict of str to str
        Metadata stored with the weights (empty for plain state dicts).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a checkpoint peelnb can read safely.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
                state = {key: fh.get_tensor(key) for key in fh.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{str(path)!r} is not a readable safetensors checkpoint ({err})") from None
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch.load raises many kinds
            raise ValueError(
                f"{str(path)!r} is not a checkpoint peelnb can read safely: torch.load(weights_only=True) "
                f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                "Save checkpoints as safetensors or as a plain state dict of tensors"
            ) from None
        if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
            loaded = loaded["model"]
        if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
            raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
        state, metadata = loaded, {}
    if not state:
        raise ValueError(f"{str(path)!r} holds no tensors: it is not a checkpoint")
    state = {k.removeprefix(COMPILE_PREFIX): v for k, v in state.items()}
    return state, metadata


def state_hash(state: dict[str, Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes (order-independent)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def model_from_state(state: dict[str, Tensor], config: ModelConfig, *, source: str = "checkpoint") -> GPT:
    """Build a `GPT` of ``config`` holding ``state``; shape mismatches are a clear error."""
    model = GPT(config, seed=None)
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(
            f"{source} does not match the model config {config}: {shown}. "
            "Load it with the config it was trained with"
        )
    model.load_state_dict(state)
    return model.eval()


@dataclass(frozen=True)
class Checkpoint:
    """One loaded checkpoint: its step, model, training rate and tensor hash."""

    step: int
    model: GPT
    lr: float | None
    sha256: str


def load_checkpoint(path: str | Path, config: ModelConfig | None = None) -> Checkpoint:
    """Load a checkpoint file into a `GPT` (config from its metadata unless given)."""
    state, metadata = read_checkpoint(path)
    if config is None:
        if "config" not in metadata:
            raise ValueError(
                f"{str(path)!r} carries no peelnb model config: pass config=ModelConfig(...) that built it"
            )
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
    model = model_from_state(state, config, source=f"checkpoint {str(path)!r}")
    step = int(metadata.get("step", -1))
    lr = float(metadata["lr"]) if metadata.get("lr") else None
    return Checkpoint(step, model, lr, state_hash(state))


class Run:
    """A training run folder: settings, vocabulary, log and checkpoints.

    Parameters
    ----------
    path : str or Path
        Folder written by `peelnb.train.train` (it holds ``run.json``).

    Raises
    ------
    FileNotFoundError
        If the folder or its ``run.json`` does not exist.
    ValueError
        If its ``run.json`` is not one peelnb wrote (not JSON, or settings missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"run folder {str(self.path)!r} does not exist")
        meta_file = self.path / RUN_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{str(self.path)!r} is not a peelnb run folder (no {RUN_FILE}); "
                "pass a folder written by `peelnb train`/`peelnb demo`, or a mapping step -> model"
            )
        try:
            self.meta: dict[str, Any] = json.loads(meta_file.read_text(encoding="utf-8"))
            self.model_config = ModelConfig.from_dict(self.meta["model"])
            self.train_config = TrainConfig.from_dict(self.meta["train"])
            self.tokenizer = CharTokenizer(self.meta["tokenizer"])
        except (ValueError, KeyError, TypeError) as err:
            problem = f"missing {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(
                f"{str(meta_file)!r} is not a peelnb run file ({problem}); it is written by `peelnb train`/`peelnb "
                "demo`: train the run again into a new folder, or peel a mapping step -> model"
            ) from None

    @staticmethod
    def write_meta(path: str | Path, meta: dict[str, Any]) -> None:
        """Write a run's ``run.json`` atomically."""
        write_text_atomic(Path(path) / RUN_FILE, json.dumps(meta, indent=1))

    @property
    def steps(self) -> list[int]:
        """Steps of the checkpoints present on disk, ascending."""
        folder = self.path / CHECKPOINT_DIR
        found = (_STEP_NAME.search(p.name) for p in folder.glob("step_*.safetensors")) if folder.is_dir() else ()
        return sorted(int(m.group(1)) for m in found if m)

    @property
    def log(self) -> list[dict[str, float]]:
        """Logged training and held-out losses, one entry per logged step."""
        return list(self.meta.get("log", []))

    @property
    def final_lr(self) -> float:
        """The learning rate of the run's last logged step (its schedule's end when nothing is logged)."""
        rates = [e["lr"] for e in self.log if e.get("lr")]
        return float(rates[-1]) if rates else float(self.train_config.lr_min)

    def checkpoint(self, step: int) -> Path:
        """Path of the checkpoint of ``step``; a clear error if it is absent."""
        path = checkpoint_path(self.path, step)
        if not path.is_file():
            raise FileNotFoundError(f"run {str(self.path)!r} has no checkpoint at step {step}; it has {self.steps}")
        return path

    def load(self, step: int) -> Checkpoint:
        """Load the checkpoint of ``step``."""
        return load_checkpoint(self.checkpoint(step), self.model_config)

    def corpus(self) -> Corpus:
        """The corpus the run was trained on, when it is the bundled one."""
        if self.meta.get("corpus") != BUNDLED_NAME:
            raise ValueError(
                f"run {str(self.path)!r} was trained on {self.meta.get('corpus')!r}, not the bundled corpus: "
                "pass its text as data=PATH (peelnb peel --data PATH)"
            )
        return Corpus.from_text(load_text(), name=BUNDLED_NAME, tokenizer=self.tokenizer)

    def __repr__(self) -> str:
        fault = self.train_config.fault
        return f"Run({str(self.path)!r}, steps={self.steps}, fault={str(fault) if fault else None})"
