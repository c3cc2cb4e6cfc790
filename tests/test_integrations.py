"""PeelCallback inside real Hugging Face ``Trainer.train()`` runs of a tiny GPT-2 (peelnb.integrations)."""

from __future__ import annotations

import importlib
import logging
import sys

import pytest
import torch
import transformers as tf
import xarray as xr

import peelnb
from peelnb import monitor as monitor_module
from peelnb.integrations import PeelCallback

from .hf_tiny import tiny_model
from .test_monitor import assert_same_state, training_state

SETTINGS = dict(bits=(1.58, 32), permutations=2, solver_steps=5, calib_tokens=1024, eval_tokens=256)
CTX = 32
EVERY = 10
STEPS = 30
CRASH_AT = 25
"""The interrupted run dies after this step; its last saved Trainer checkpoint is at step 20."""


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model() -> torch.nn.Module:
    """A 2-layer GPT-2 of width 32 with dropout on, so that any draw from torch's generator would show."""
    model = tiny_model("gpt2", layers=2, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model.transformer.wpe.requires_grad_(False)  # a frozen parameter must stay frozen
    return model


def train_set(corpus) -> list[dict[str, torch.Tensor]]:
    windows = corpus.train[: 48 * CTX].view(48, CTX)
    return [{"input_ids": w, "labels": w} for w in windows]


def trainer(folder, corpus, callbacks=(), steps: int = STEPS) -> tf.Trainer:
    args = tf.TrainingArguments(
        str(folder), max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=20, report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = tf.Trainer(model=make_model(), args=args, train_dataset=train_set(corpus), callbacks=list(callbacks))
    trainer.remove_callback(tf.PrinterCallback)
    return trainer


def losses(trainer: tf.Trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


class Watched(PeelCallback):
    """The callback, checking around each of its calls that the training state is left as it was."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        before = training_state(model)
        super().on_step_end(args, state, control, model=model, **kwargs)
        assert_same_state(training_state(model), before)


class Crash(tf.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == CRASH_AT:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_callback_peels_every_n_steps_leaves_training_unchanged_and_resumes(tmp_path, corpus, monkeypatch, caplog):
    plain = trainer(tmp_path / "plain", corpus)
    plain.train()
    expected = losses(plain)
    assert sorted(expected) == list(range(1, STEPS + 1))

    peeled = []
    real_peel = monitor_module.peel
    monkeypatch.setattr(monitor_module, "peel", lambda c, *a, **k: peeled.append(list(c)) or real_peel(c, *a, **k))
    store = tmp_path / "peel.zarr"
    interrupted = trainer(tmp_path / "run", corpus, [Watched(store, corpus, every=EVERY, **SETTINGS), Crash()])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert peeled == [[0], [10], [20]]
    # the same run, bit for bit (step 25 crashed before the Trainer logged its loss)
    assert losses(interrupted) == {s: expected[s] for s in range(1, CRASH_AT)}
    before = peelnb.open(store)
    assert before["step"].values.tolist() == [0, 10, 20]

    peeled.clear()
    callback = PeelCallback(store, corpus, every=EVERY, **SETTINGS)
    assert callback.steps == [0, 10, 20]
    resumed = trainer(tmp_path / "run", corpus, [callback])
    with caplog.at_level(logging.INFO, logger="peelnb.integrations"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-20"))
    assert peeled == [[30]]  # steps 0, 10 and 20 are in the store: not peeled again
    assert losses(resumed) == expected  # steps 1-20 from the checkpoint's log, 21-30 trained again: unchanged

    ds = peelnb.open(store)
    assert ds["step"].values.tolist() == [0, 10, 20, 30] == callback.steps  # no duplicates
    xr.testing.assert_identical(ds.sel(step=[0, 10, 20]), before)
    assert ds["loss_ref"].notnull().all()
    loss = ds["loss_model"].values
    assert loss[0] > loss[1] > loss[3]  # the weights as they trained, not a stale copy
    assert 0 < callback.peel_seconds and 0 < callback.overhead < 1
    line = next(r.getMessage() for r in caplog.records if r.name == "peelnb.integrations")
    assert "spent peeling" in line and "[0, 10, 20, 30]" in line
    print(f"PeelCallback: {callback.peel_seconds:.2f} s peeling, {callback.overhead:.0%} of the resumed run")


def test_callback_peels_only_on_the_main_process(tmp_path, corpus):
    callback = PeelCallback(tmp_path / "peel.zarr", corpus, every=1, **SETTINGS)
    state = tf.TrainerState(global_step=10, is_world_process_zero=False)
    model = make_model()
    callback.on_train_begin(None, state, None, model=model)
    callback.on_step_end(None, state, None, model=model)
    callback.on_train_end(None, state, None, model=model)
    assert not (tmp_path / "peel.zarr").exists() and callback.steps == []
    callback.on_step_end(None, tf.TrainerState(global_step=10), None, model=model)
    assert callback.steps == [10]


def test_callback_bad_input_gets_clear_errors(tmp_path, corpus):
    text = tmp_path / "val.txt"
    text.write_text("to be or not to be")
    with pytest.raises(ValueError, match="needs the model's tokenizer: pass tokenizer="):
        PeelCallback(tmp_path / "peel.zarr", text)
    with pytest.raises(TypeError, match="data must be token ids, a Corpus, a text file or None"):
        PeelCallback(tmp_path / "peel.zarr", [1, 2, 3])
    with pytest.raises(ValueError, match="is not a Zarr store"):
        PeelCallback(tmp_path / "peel.nc", corpus)
    callback = PeelCallback(tmp_path / "peel.zarr", every=5, **SETTINGS)  # the bundled characters: 73 ids
    with pytest.raises(ValueError, match="the model has 80 token ids, the bundled character corpus 73: pass"):
        callback.on_train_begin(None, tf.TrainerState(), None, model=make_model())
    assert not (tmp_path / "peel.zarr").exists()


def test_without_transformers_the_callback_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    monkeypatch.delitem(sys.modules, "peelnb.integrations")
    with pytest.raises(ImportError, match=r'pip install "peelnb\[hf\]"'):
        importlib.import_module("peelnb.integrations")
