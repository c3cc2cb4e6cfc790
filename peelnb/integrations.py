"""Training-framework integrations: `PeelCallback` peels a Hugging Face ``Trainer``'s model while it trains.

The callback is a thin `transformers.TrainerCallback` around `peelnb.PeelMonitor`:
every ``every`` optimizer steps (``state.global_step``) the monitor peels the
model on the same calibration and evaluation tokens and appends the step to a
Zarr store, leaving the model's weights, train/eval modes, ``requires_grad``
flags and torch's random generators exactly as they were. Only the main
process (``state.is_world_process_zero``) peels. Importing this module needs
``transformers`` (``pip install "peelnb[hf]"``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from . import _optional
from .adapters import adapter_for
from .data import Corpus, load_text
from .monitor import PeelMonitor

_tf = _optional.require("transformers", "hf", "peelnb.integrations (the Trainer callback)")

log = logging.getLogger(__name__)


def _tokens(data: Tensor | Corpus | str | Path | None, tokenizer: Any) -> Tensor | Corpus:
    """The monitor's tokens: ids or a Corpus as given; text (a file, or the bundled text) encoded with ``tokenizer``."""
    if isinstance(data, (Tensor, Corpus)):
        return data
    if data is not None and not isinstance(data, (str, Path)):
        raise TypeError(f"data must be token ids, a Corpus, a text file or None, got {type(data).__name__}")
    if tokenizer is None:
        if data is None:
            return Corpus.bundled()
        raise ValueError(f"the text file {str(data)!r} needs the model's tokenizer: pass tokenizer= (a Hugging Face "
                         "tokenizer or its folder), or pass token ids")
    from .suites import encode, load_tokenizer

    return encode(load_tokenizer(tokenizer), load_text(data))


class PeelCallback(_tf.TrainerCallback):
    """Peel a ``transformers.Trainer``'s model every ``every`` steps and append each step to a Zarr store.

    Pass it to the Trainer (``Trainer(..., callbacks=[PeelCallback(...)])``).
    It peels at the start of training (step 0, or the step a resumed run
    starts from), after every optimizer step that is a multiple of
    ``every``, and at the last step (``final``). Steps the store already
    holds are skipped, so a run resumed from a checkpoint continues the same
    store without duplicates. Training is unaffected: the losses are the
    ones of a run without the callback. Under data parallelism the main
    process peels its replica while the others wait for it at the next
    synchronization; with sharded parameters (FSDP, DeepSpeed ZeRO-3) no
    process holds the whole model: peel the saved checkpoints instead.

    Parameters
    ----------
    store : str or Path
        A ``.zarr`` store (``pip install "peelnb[zarr]"``), created at the first peel.
    data : Tensor, Corpus, str, Path or None
        The fixed sample the model is peeled on: token ids (1-D, split into
        calibration and held-out parts), a `peelnb.data.Corpus`, or a text file
        encoded with ``tokenizer``. None: the bundled text, encoded with
        ``tokenizer`` if given (else the bundled character corpus, for models
        with its 73-token vocabulary).
    tokenizer : tokenizer or str or Path, optional
        The model's Hugging Face tokenizer (or its folder), to encode text.
    every : int
        Peel every ``every`` optimizer steps.
    final : bool
        Also peel the last step of training when it is not a multiple of ``every``.
    **options
        Settings of `peelnb.PeelMonitor` and `peelnb.peel` that set the cost of each peel:
        ``layers``, ``bits``, ``permutations``, ``solver_steps`` (K),
        ``calib_tokens``, ``eval_tokens``, ``view``, ``seed``, ...

    Raises
    ------
    ImportError
        On import, without ``transformers`` (``pip install "peelnb[hf]"``); without zarr.
    ValueError
        Bad settings; a store peeled with other settings; text without a tokenizer.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments
    >>> from peelnb.integrations import PeelCallback
    >>> config = GPT2Config(vocab_size=73, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
    ...                     eos_token_id=0)
    >>> tokens = torch.arange(4000) % 73
    >>> train = [{"input_ids": tokens[i : i + 16], "labels": tokens[i : i + 16]} for i in range(0, 256, 16)]
    >>> folder = tempfile.mkdtemp()
    >>> callback = PeelCallback(os.path.join(folder, "peel.zarr"), tokens, every=2, bits=(32,), permutations=1,
    ...                         solver_steps=5, calib_tokens=512, eval_tokens=128)
    >>> args = TrainingArguments(folder, max_steps=3, per_device_train_batch_size=4, report_to=[], use_cpu=True,
    ...                          save_strategy="no", disable_tqdm=True)
    >>> trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=train, callbacks=[callback])
    >>> trainer.remove_callback(PrinterCallback)  # the Trainer's own printing of its logs
    >>> _ = trainer.train()
    >>> callback.steps  # at the start, every 2 steps, and the last step
    [0, 2, 3]
    """

    def __init__(self, store: str | Path, data: Tensor | Corpus | str | Path | None = None, *,
                 tokenizer: Any = None, every: int = 100, final: bool = True, **options: Any) -> None:
        self.final = bool(final)
        self._check_vocab = data is None and tokenizer is None
        self.monitor = PeelMonitor(store, _tokens(data, tokenizer), every=every, **options)

    @property
    def steps(self) -> list[int]:
        """Steps the store holds, sorted (those of earlier runs included)."""
        return self.monitor.steps

    @property
    def peel_seconds(self) -> float:
        """Seconds spent peeling and writing, in total."""
        return self.monitor.peel_seconds

    @property
    def overhead(self) -> float:
        """Share of the wall time since training began spent peeling (0 to 1)."""
        return self.monitor.overhead

    def _peel(self, state: Any, model: nn.Module | None, *, force: bool = False) -> None:
        if not state.is_world_process_zero:
            return
        if model is None:
            raise ValueError("PeelCallback needs the model: the Trainer passes it to its callbacks as model=")
        self.monitor(model, state.global_step, force=force)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        """Peel the model training starts from (if due and not in the store)."""
        if self._check_vocab and model is not None and state.is_world_process_zero:
            vocab, bundled = adapter_for(model).dims(model).vocab_size, Corpus.bundled().vocab_size
            if vocab != bundled:
                raise ValueError(
                    f"the model has {vocab} token ids, the bundled character corpus {bundled}: pass "
                    "PeelCallback(..., data=token_ids) or tokenizer= (the model's tokenizer encodes the bundled text)"
                )
        self._peel(state, model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                    **kwargs: Any) -> None:
        """Peel after the optimizer steps that are multiples of ``every``."""
        self._peel(state, model)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                     **kwargs: Any) -> None:
        """Peel the last step (``final``) and log what peeling cost."""
        if self.final:
            self._peel(state, model, force=True)
        if state.is_world_process_zero:
            log.info("PeelCallback: %.1f s spent peeling, %.1f%% of the %.1f s since training began; store %s "
                     "holds steps %s", self.monitor.peel_seconds, 100 * self.monitor.overhead,
                     self.monitor.wall_seconds, self.monitor.store, self.monitor.steps)

    def __repr__(self) -> str:
        return f"PeelCallback({self.monitor!r}, final={self.final})"
