"""Hugging Face checkpoint suites: model folders, Trainer checkpoint folders, hub revisions, tokenizers.

A suite is a set of checkpoints of one training run, each becoming a ``step``
of the peel:

- a folder of checkpoint folders, as the Trainer writes them
  (``checkpoint-500/``, ``checkpoint-1000/``) or as suites publish them
  (``step1000/``): the step is read from each name;
- a hub-style model id with ``revisions=["step1000", ...]`` (Pythia's
  checkpoints): each revision is read from the local Hugging Face cache,
  never downloaded.

Everything here needs ``transformers`` (the ``[hf]`` extra), imported on use.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import _optional
from .checkpoints import read_checkpoint

CONFIG_FILE = "config.json"
TRAINER_STATE = "trainer_state.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_STEP = re.compile(r"^(?:checkpoint|global_step|step|iter)[-_]?(\d+)$")
_HUB_ID = re.compile(r"^[\w.-]+(?:/[\w.-]+)?$")


def step_from_name(name: str) -> int | None:
    """The training step a checkpoint folder or revision name gives, if any.

    Examples
    --------
    >>> step_from_name("checkpoint-500"), step_from_name("step1000"), step_from_name("main")
    (500, 1000, None)
    """
    match = _STEP.match(Path(str(name)).name)
    return int(match.group(1)) if match else None


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model folder (it holds ``config.json``)."""
    return (Path(path) / CONFIG_FILE).is_file()


def suite_folders(folder: str | Path) -> dict[int, Path]:
    """The checkpoint folders of a suite, by step (empty if there are none).

    Raises
    ------
    ValueError
        If two folders name the same step.
    """
    found: dict[int, Path] = {}
    for child in sorted(Path(folder).iterdir()):
        step = step_from_name(child.name)
        if step is None or not is_model_folder(child):
            continue
        if step in found:
            raise ValueError(
                f"{str(folder)!r} holds two checkpoints of step {step}: {found[step].name} and {child.name}; "
                "keep one, or pass a mapping {step: folder}"
            )
        found[step] = child
    return dict(sorted(found.items()))


def architecture(folder: str | Path) -> str:
    """The architecture a model folder's ``config.json`` names (its model class, else its model type)."""
    config = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
    names = config.get("architectures") or [config.get("model_type", "unknown")]
    return str(names[0])


def check_one_architecture(folders: dict[int, Path]) -> None:
    """Raise a clear error if the folders of a suite hold different architectures."""
    seen: dict[str, Path] = {}
    for folder in folders.values():
        seen.setdefault(architecture(folder), folder)
    if len(seen) > 1:
        (a, fa), (b, fb) = list(seen.items())[:2]
        raise ValueError(
            f"the checkpoints mix architectures: {a} ({fa}) and {b} ({fb}); a peel follows one model through "
            "training: peel each architecture's checkpoints separately"
        )


def final_lr(folder: str | Path) -> float | None:
    """The last learning rate a Trainer logged in ``trainer_state.json`` of a checkpoint folder, if any."""
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        return None
    history = json.loads(path.read_text(encoding="utf-8")).get("log_history", [])
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    return float(rates[-1]) if rates else None


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    tf = _optional.transformers()
    major, minor = (int(x) for x in tf.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{str(folder)!r} holds no weights (*.safetensors or pytorch_model*.bin)")
    return files


def _tied(model: nn.Module, key: str) -> bool:
    """Whether parameter ``key`` is the input embedding itself (a tied head)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return key in params and params[key] is model.get_input_embeddings().weight


def load_folder(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a Hugging Face causal LM from a local folder, in eval mode.

    Weights saved from a ``torch.compile``-d model (``_orig_mod.`` prefixes)
    load too; a weight the folder lacks (other than a tied head) is an error,
    never a random init.

    Parameters
    ----------
    folder : str or Path
        A folder with ``config.json`` and weights (safetensors or ``.bin``).
    dtype : torch.dtype
        Dtype to compute in (default float32, whatever the folder stores).

    Returns
    -------
    nn.Module
        The model.

    Raises
    ------
    ImportError
        Without ``transformers`` (``pip install "peelnb[hf]"``).
    ValueError
        If the folder does not hold the weights of the model its config describes.
    """
    tf = _optional.transformers()
    folder = Path(folder)
    bars = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()  # library code stays quiet; peel has its own progress bar
    try:
        model, info = tf.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, output_loading_info=True, **_dtype_kwarg(dtype)
        )
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{str(folder)!r} could not be loaded as a Hugging Face causal LM: {err}") from None
    finally:
        if bars:
            tf.utils.logging.enable_progress_bar()
    if info.get("missing_keys"):
        state: dict[str, Tensor] = {}
        for file in _weight_files(folder):
            state.update(read_checkpoint(file)[0])  # strips torch.compile's "_orig_mod." prefixes
        result = model.load_state_dict(state, strict=False)
        model.tie_weights()
        missing = [k for k in result.missing_keys if not _tied(model, k)]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ValueError(
                f"{str(folder)!r} lacks weights of its model ({shown}): it was not saved from this architecture; "
                "save it with model.save_pretrained(folder)"
            )
    return model.eval()


def hub_cache() -> Path:
    """The local Hugging Face cache, as the environment names it now (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub model id (``name`` or ``org/name``)."""
    return bool(_HUB_ID.match(name))


def resolve_revisions(model_id: str, revisions: Sequence[str | None]) -> list[Path]:
    """Local snapshot folders of ``model_id`` at each revision, from the Hugging Face cache, offline.

    Raises
    ------
    FileNotFoundError
        Naming every revision not in the cache and how to fetch it.
    """
    _optional.transformers()
    from huggingface_hub import snapshot_download

    cache = hub_cache()
    folders, missing = [], []
    for revision in revisions:
        try:
            folders.append(Path(snapshot_download(model_id, revision=revision, cache_dir=cache,
                                                  local_files_only=True)))
        except Exception:  # noqa: BLE001 - huggingface_hub raises several kinds for "not cached"
            missing.append(revision or "main")
    if missing:
        fetch = "; ".join(f"hf download {model_id} --revision {r}" for r in missing[:3])
        raise FileNotFoundError(
            f"revision{'s' if len(missing) > 1 else ''} {', '.join(repr(r) for r in missing)} of {model_id!r} "
            f"{'are' if len(missing) > 1 else 'is'} not in the local Hugging Face cache ({cache}) and peelnb "
            f"works offline: fetch {'them' if len(missing) > 1 else 'it'} first while online ({fetch}), "
            f"or point HF_HUB_CACHE at the cache that holds {'them' if len(missing) > 1 else 'it'}"
        )
    return folders


def load_tokenizer(tokenizer: Any) -> Any:
    """A Hugging Face tokenizer: ``tokenizer`` itself, or the one saved in a folder."""
    if isinstance(tokenizer, (str, Path)):
        tf = _optional.transformers()
        try:
            return tf.AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"no tokenizer could be loaded from {str(tokenizer)!r}: {err}") from None
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer or its folder, got {type(tokenizer).__name__}")
    return tokenizer


def find_tokenizer(folder: str | Path | None) -> Path | None:
    """The folder holding a saved tokenizer: ``folder`` or its parent (a suite's root), if either has one."""
    if folder is None:
        return None
    for candidate in (Path(folder), Path(folder).parent):
        if any((candidate / name).is_file() for name in TOKENIZER_FILES):
            return candidate
    return None


def encode(tokenizer: Any, text: str) -> Tensor:
    """Token ids (1-D int64) of ``text``, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)
