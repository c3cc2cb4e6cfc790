"""What `peelnb.peel` reads: checkpoints (the ``step`` axis) and data (the tokens).

Checkpoints come from a peelnb run folder, a mapping ``{step: model or
path}``, a Hugging Face model object, a Hugging Face model folder, a folder of
checkpoint folders (``checkpoint-500/``, ``step1000/``), or a model id or
folder plus ``revisions=[...]``. Data is token ids, a `Corpus`, or a text file
encoded with the run's or the model's tokenizer.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from .adapters import is_hf_model, unwrap
from .checkpoints import RUN_FILE, Checkpoint, Run, load_checkpoint, state_hash
from .data import BUNDLED_NAME, Corpus, load_text


@dataclass(frozen=True)
class Source:
    """Where checkpoints come from: their steps, a loader, and what is known about the run.

    Attributes
    ----------
    steps : list of int
        Training steps, ascending.
    load : callable
        ``load(step)`` gives the `Checkpoint` of a step.
    run : Run or None
        The peelnb run folder, if the checkpoints come from one.
    description : str
        Recorded in the result's ``source`` attribute.
    final_lr : float or None
        The run's last training learning rate, when known.
    tokenizer : Path or None
        A folder holding the model's saved tokenizer, when one was found.
    portable : callable or None
        ``portable(step)`` gives a picklable loader of the step's checkpoint,
        to load it in another process (``peel(..., client=...)``): a function
        and the step's path, or the model object itself.
    """

    steps: list[int]
    load: Callable[[int], Checkpoint]
    run: Run | None
    description: str
    final_lr: float | None = None
    tokenizer: Path | None = None
    portable: Callable[[int], Callable[[], Checkpoint]] | None = None


def _model_checkpoint(step: int, model: nn.Module) -> Checkpoint:
    """A checkpoint of a model object, used as given (peel restores its mode and flags afterwards)."""
    model = unwrap(model)
    return Checkpoint(step, model, None, state_hash(model.state_dict()))


def _folder_checkpoint(step: int, folder: Path) -> Checkpoint:
    from .suites import load_folder

    return _model_checkpoint(step, load_folder(folder))


def _file_checkpoint(step: int, path: str | Path) -> Checkpoint:
    loaded = load_checkpoint(path)
    return Checkpoint(step, loaded.model, loaded.lr, loaded.sha256)


def _run_checkpoint(path: Path, step: int) -> Checkpoint:
    return Run(path).load(step)


def _folders_source(folders: dict[int, Path], description: str) -> Source:
    from .suites import check_one_architecture, final_lr, find_tokenizer

    check_one_architecture(folders)
    last = folders[max(folders)]
    return Source(sorted(folders), lambda step: _folder_checkpoint(step, folders[step]), None, description,
                  final_lr(last), find_tokenizer(last),
                  portable=lambda step: functools.partial(_folder_checkpoint, step, folders[step]))


def _revision_steps(names: Sequence[str], where: str) -> list[int]:
    from .suites import step_from_name

    steps = []
    for name in names:
        step = step_from_name(name)
        if step is None:
            raise ValueError(
                f"cannot tell the training step of revision {name!r} of {where}: name revisions like "
                "'step1000' or 'checkpoint-1000', or pass a mapping {step: folder}"
            )
        steps.append(step)
    if len(set(steps)) != len(steps):
        raise ValueError(f"revisions {list(names)} name the same step twice; give each step once")
    return steps


def _revisions_source(checkpoints: str | Path, revisions: Sequence[str]) -> Source:
    from .suites import is_model_folder, looks_like_hub_id, resolve_revisions

    if isinstance(revisions, str) or not revisions:
        raise TypeError(f"revisions must be a non-empty list of revision names, got {revisions!r}")
    names = [str(r) for r in revisions]
    path = Path(checkpoints)
    steps = _revision_steps(names, repr(str(checkpoints)))
    if path.is_dir():
        folders = [path / name for name in names]
        missing = [f.name for f in folders if not is_model_folder(f)]
        if missing:
            present = sorted(p.name for p in path.iterdir() if is_model_folder(p))
            raise FileNotFoundError(
                f"{str(path)!r} has no model folder for revision{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(repr, missing))}; it has {present}"
            )
        return _folders_source(dict(zip(steps, folders)), f"folder {path} at revisions {', '.join(names)}")
    if isinstance(checkpoints, Path) or not looks_like_hub_id(str(checkpoints)):
        raise FileNotFoundError(f"{str(checkpoints)!r} does not exist")
    folders = resolve_revisions(str(checkpoints), names)
    return _folders_source(dict(zip(steps, folders)), f"{checkpoints} at revisions {', '.join(names)}")


def _path_source(checkpoints: str | Path) -> Source:
    from .suites import is_model_folder, step_from_name, suite_folders

    path = Path(checkpoints)
    if path.is_dir():
        if (path / RUN_FILE).is_file():
            return _run_source(Run(path))
        if is_model_folder(path):
            return _folders_source({step_from_name(path.name) or 0: path}, f"model folder {path}")
        folders = suite_folders(path)
        if folders:
            return _folders_source(folders, f"checkpoint folders of {path}")
        raise FileNotFoundError(
            f"{str(path)!r} is not a peelnb run folder (no {RUN_FILE}), a Hugging Face model folder (no config.json) "
            "or a folder of checkpoint folders (checkpoint-500/, step1000/ holding config.json); "
            "pass a folder written by `peelnb train`/`peelnb demo`, a model folder, or a mapping step -> model"
        )
    if path.is_file():
        raise ValueError(
            f"{str(path)!r} is a file: pass checkpoint files as a mapping {{step: file}}, "
            f"e.g. peel({{1000: {str(path)!r}}})"
        )
    if isinstance(checkpoints, str) and not path.exists():
        from .suites import hub_cache, looks_like_hub_id, resolve_revisions

        if looks_like_hub_id(checkpoints) and importlib.util.find_spec("transformers") is not None:
            try:
                folder = resolve_revisions(checkpoints, [None])[0]
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"run folder {checkpoints!r} does not exist, nor is {checkpoints!r} a model in the local Hugging "
                    f"Face cache ({hub_cache()}); peelnb works offline: fetch a hub model first while online "
                    f"(hf download {checkpoints})"
                ) from None
            return _folders_source({0: folder}, f"{checkpoints} (local Hugging Face cache)")
    raise FileNotFoundError(f"run folder {str(path)!r} does not exist")


def _run_source(run: Run) -> Source:
    if not run.steps:
        raise ValueError(f"run folder {str(run.path)!r} holds no checkpoints yet")
    return Source(run.steps, run.load, run, f"run {run.path}", run.final_lr,
                  portable=lambda step: functools.partial(_run_checkpoint, run.path, step))


def _mapping_source(checkpoints: Mapping) -> Source:
    if not checkpoints:
        raise ValueError("the mapping of checkpoints is empty: give at least one step -> model")
    items: dict[int, Any] = {}
    for step, item in checkpoints.items():
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"checkpoint keys must be integer steps, got {step!r}")
        items[int(step)] = item
    folders = {s: Path(i) for s, i in items.items() if isinstance(i, (str, Path)) and Path(i).is_dir()}
    if folders:
        from .suites import check_one_architecture, find_tokenizer, is_model_folder

        not_models = [str(f) for f in folders.values() if not is_model_folder(f)]
        if not_models:
            raise FileNotFoundError(
                f"{not_models[0]!r} is a folder without config.json: give a Hugging Face model folder or a "
                "checkpoint file"
            )
        check_one_architecture(folders)

    def loader(step: int) -> Callable[[], Checkpoint]:
        item = items[step]
        if step in folders:
            return functools.partial(_folder_checkpoint, step, folders[step])
        if isinstance(item, (str, Path)):
            return functools.partial(_file_checkpoint, step, item)
        if not isinstance(item, nn.Module):
            raise TypeError(f"checkpoint {step} is a {type(item).__name__}; give a model or a checkpoint path")
        return functools.partial(_model_checkpoint, step, unwrap(item))

    tokenizer = find_tokenizer(folders[max(folders)]) if folders else None
    return Source(sorted(items), lambda step: loader(step)(), None, "models", None, tokenizer, portable=loader)


def checkpoint_source(checkpoints: Any, *, revisions: Sequence[str] | None = None) -> Source:
    """Normalize whatever `peelnb.peel` was given as checkpoints into a `Source`.

    Raises
    ------
    TypeError
        For something that is not a source of checkpoints.
    FileNotFoundError
        For a path (or revision) that does not exist locally.
    ValueError
        For a folder mixing architectures, or names without a step.
    """
    if revisions is not None:
        if not isinstance(checkpoints, (str, Path)):
            raise TypeError("revisions= goes with a model folder or a hub model id, e.g. "
                            "peel('EleutherAI/pythia-70m', revisions=['step1000', 'step2000'])")
        return _revisions_source(checkpoints, revisions)
    if isinstance(checkpoints, Run):
        return _run_source(checkpoints)
    if isinstance(checkpoints, (str, Path)):
        return _path_source(checkpoints)
    if isinstance(checkpoints, Mapping):
        return _mapping_source(checkpoints)
    if isinstance(checkpoints, nn.Module) and is_hf_model(unwrap(checkpoints)):
        from .suites import step_from_name

        name = str(getattr(unwrap(checkpoints).config, "_name_or_path", "") or "")
        step = step_from_name(name) if name else None
        model = checkpoints
        return Source([step or 0], lambda s: _model_checkpoint(s, model), None, f"model {name or type(model).__name__}",
                      portable=lambda s: functools.partial(_model_checkpoint, s, unwrap(model)))
    if isinstance(checkpoints, nn.Module):
        raise TypeError("pass checkpoints as a mapping {step: model}, e.g. peel({1000: model})")
    raise TypeError(f"checkpoints must be a run folder or a mapping step -> model, got {type(checkpoints).__name__}")


def _tokenizer(tokenizer: Any, source: Source, vocab_size: int) -> Any:
    """The tokenizer to encode text with (given, or saved with the model), checked against the model's vocabulary."""
    if tokenizer is None and source.tokenizer is None:
        return None
    from .suites import load_tokenizer

    loaded = load_tokenizer(tokenizer if tokenizer is not None else source.tokenizer)
    if len(loaded) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(loaded)} tokens but the model's embedding has {vocab_size} rows: it is not "
            "the model's tokenizer; pass the tokenizer the model was trained with"
        )
    return loaded


def corpus_for(data: Any, source: Source, vocab_size: int, *, tokenizer: Any = None) -> Corpus:
    """Turn ``data`` (None, a text path, token ids or a Corpus) into a Corpus the model can read.

    Raises
    ------
    ValueError
        For tokens outside the model's vocabulary, a tokenizer larger than
        the model's embedding, or text without a tokenizer.
    """
    run = source.run
    hf_tokenizer = None if run is not None else _tokenizer(tokenizer, source, vocab_size)
    if isinstance(data, Corpus):
        corpus = data
    elif isinstance(data, Tensor):
        corpus = Corpus.from_tokens(data, vocab_size=vocab_size)
    elif isinstance(data, (str, Path)):
        if run is not None:
            corpus = Corpus.from_text(load_text(data), name=str(data), tokenizer=run.tokenizer)
        elif hf_tokenizer is not None:
            from .suites import encode

            corpus = Corpus.from_tokens(encode(hf_tokenizer, load_text(data)), vocab_size=vocab_size, name=str(data))
        else:
            raise ValueError(
                "a text file needs the model's tokenizer: pass tokenizer= (a Hugging Face tokenizer or its folder), "
                "peel a run folder, or pass token ids (a tensor) or a Corpus"
            )
    elif data is None:
        if run is not None:
            corpus = run.corpus()
        elif hf_tokenizer is not None:
            from .suites import encode

            corpus = Corpus.from_tokens(encode(hf_tokenizer, load_text()), vocab_size=vocab_size,
                                        name=f"{BUNDLED_NAME}, {type(hf_tokenizer).__name__} tokens")
        else:
            corpus = Corpus.bundled()
            if corpus.vocab_size != vocab_size:
                raise ValueError(
                    f"the model has {vocab_size} token ids, the bundled corpus {corpus.vocab_size}: pass data= "
                    "(token ids, or a text file with tokenizer=)"
                )
    else:
        raise TypeError(f"data must be None, a text file, a tensor of token ids or a Corpus, got {type(data).__name__}")
    if corpus.vocab_size > vocab_size:
        raise ValueError(
            f"the data uses {corpus.vocab_size} token ids but the model knows {vocab_size}: "
            "encode the data with the model's own tokenizer"
        )
    return corpus
