"""PeelMonitor inside a real training loop of a tiny peelnb GPT (peelnb.monitor)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
import xarray as xr

import peelnb
from peelnb import monitor as monitor_module
from peelnb.config import ModelConfig
from peelnb.model import GPT

from .conftest import TINY_MODEL

SETTINGS = dict(bits=(1.58, 32), permutations=2, solver_steps=5, calib_tokens=1024, eval_tokens=256)
STEPS = 12
EVERY = 5


def make_model(corpus) -> GPT:
    model = GPT(ModelConfig(vocab_size=corpus.vocab_size, **TINY_MODEL), seed=0)
    model.train()
    model.blocks[1].ln_1.eval()  # a submodule in another mode than its parent must stay so
    model.wpe.requires_grad_(False)  # a frozen parameter must stay frozen
    return model


def train(model: GPT, corpus, steps: int, on_step=None) -> None:
    """A plain training loop; batches come from torch's global generator, so any draw from it shows."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    n_ctx = model.config.n_ctx
    for step in range(steps):
        starts = torch.randint(0, corpus.train.numel() - n_ctx - 1, (8,))
        batch = corpus.train[starts[:, None] + torch.arange(n_ctx + 1)]
        optimizer.zero_grad()
        model.loss(batch[:, :-1], batch[:, 1:]).backward()
        optimizer.step()
        if on_step is not None:
            on_step(model, step)


def training_state(model: GPT) -> dict:
    return {
        "modes": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "weights": {name: t.clone() for name, t in model.state_dict().items()},
        "grads": {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
        "rng": torch.get_rng_state(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_same_state(after: dict, before: dict) -> None:
    assert after["modes"] == before["modes"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["grad_enabled"] == before["grad_enabled"]
    assert torch.equal(after["rng"], before["rng"])
    for name, weight in before["weights"].items():
        assert torch.equal(after["weights"][name], weight), name
    for name, grad in before["grads"].items():
        assert (grad is None) == (after["grads"][name] is None), name
        assert grad is None or torch.equal(after["grads"][name], grad), name


def test_monitor_peels_every_n_steps_without_touching_the_training_run(tmp_path, corpus, monkeypatch, caplog):
    reference = make_model(corpus)
    train(reference, corpus, STEPS)  # the run without a monitor

    store = tmp_path / "run.zarr"
    monitor = peelnb.PeelMonitor(store, corpus, every=EVERY, **SETTINGS)
    peeled = []
    real_peel = monitor_module.peel

    def counting_peel(checkpoints, *args, **kwargs):
        peeled.append(list(checkpoints))
        return real_peel(checkpoints, *args, **kwargs)

    monkeypatch.setattr(monitor_module, "peel", counting_peel)
    returned = {}

    def watch(model, step):
        before = training_state(model)
        returned[step] = monitor(model, step)
        assert_same_state(training_state(model), before)

    model = make_model(corpus)
    with caplog.at_level(logging.INFO, logger="peelnb.monitor"):
        train(model, corpus, STEPS, on_step=watch)

    assert peeled == [[0], [5], [10]]  # only every EVERY steps
    assert {s for s, ds in returned.items() if ds is not None} == {0, 5, 10}
    for name, weight in reference.state_dict().items():  # the same run, bit for bit, as without the monitor
        assert torch.equal(model.state_dict()[name], weight), name

    ds = peelnb.open(store)
    assert ds["step"].values.tolist() == [0, 5, 10] == monitor.steps
    xr.testing.assert_identical(ds.sel(step=[10]), returned[10].assign_attrs(created=ds.attrs["created"]))
    loss = ds["loss_model"].values
    assert loss[0] > loss[1] > loss[2]  # it peeled the weights as they trained, not a stale copy
    assert ds["loss_ref"].notnull().all()

    assert 0 < monitor.peel_seconds <= monitor.wall_seconds
    assert 0 < monitor.overhead <= 1
    lines = [r.getMessage() for r in caplog.records if r.name == "peelnb.monitor"]
    assert len(lines) == 3 and all("since the first call spent peeling" in line for line in lines)
    assert lines[-1].startswith("PeelMonitor: step 10 peeled in ")
    assert "overhead=" in repr(monitor)


def test_monitor_peels_the_same_sample_at_every_step(tmp_path, corpus):
    model = make_model(corpus)
    monitor = peelnb.PeelMonitor(tmp_path / "run.zarr", corpus, every=1, **SETTINGS)
    monitor(model, 0)
    monitor(model, 1)  # the same weights: the same calibration and evaluation tokens give the same numbers
    ds = peelnb.open(tmp_path / "run.zarr").drop_vars(["solve_seconds", "checkpoint_sha256"])
    xr.testing.assert_identical(ds.sel(step=0, drop=True), ds.sel(step=1, drop=True))


def test_a_new_monitor_on_an_existing_store_resumes_and_skips_present_steps(tmp_path, corpus, monkeypatch):
    model = make_model(corpus)
    store = tmp_path / "run.zarr"
    first = peelnb.PeelMonitor(store, corpus, every=5, **SETTINGS)
    first(model, 0)
    first(model, 5)
    before = peelnb.open(store)

    again = peelnb.PeelMonitor(store, corpus, every=5, **SETTINGS)
    assert again.steps == [0, 5]
    peeled = []
    real_peel = monitor_module.peel
    monkeypatch.setattr(monitor_module, "peel", lambda c, *a, **k: peeled.append(list(c)) or real_peel(c, *a, **k))
    assert again(model, 0) is None and again(model, 5) is None  # present: skipped, not peeled
    assert again(model, 7) is None  # not due
    assert again(model, 7, force=True) is not None  # e.g. the last step of a run
    again(model, 10)
    assert peeled == [[7], [10]]
    after = peelnb.open(store)
    assert after["step"].values.tolist() == [0, 5, 7, 10]
    xr.testing.assert_identical(after.sel(step=[0, 5]), before)


def test_monitor_refuses_a_store_peeled_with_other_settings_before_peeling(tmp_path, corpus):
    store = tmp_path / "run.zarr"
    peelnb.PeelMonitor(store, corpus, every=5, **SETTINGS)(make_model(corpus), 0)
    other = dict(SETTINGS, permutations=3)
    with pytest.raises(ValueError, match=r"holds a peel with other settings \(permutations: store \[0, 1\], "
                                         r"monitor \[0, 1, 2\]\): monitor with the store's settings"):
        peelnb.PeelMonitor(store, corpus, every=5, **other)


def test_monitor_bad_input_gets_clear_errors(tmp_path, corpus):
    with pytest.raises(ValueError, match="is not a Zarr store: PeelMonitor appends to a path ending in .zarr"):
        peelnb.PeelMonitor(tmp_path / "run.nc", corpus)
    with pytest.raises(ValueError, match="every must be a positive number of steps, got 0"):
        peelnb.PeelMonitor(tmp_path / "run.zarr", corpus, every=0)
    with pytest.raises(TypeError, match="does not take out="):
        peelnb.PeelMonitor(tmp_path / "run.zarr", corpus, out=tmp_path / "x.nc")
    with pytest.raises(ValueError, match="bits"):
        peelnb.PeelMonitor(tmp_path / "run.zarr", corpus, bits=(5,))
    monitor = peelnb.PeelMonitor(tmp_path / "run.zarr", corpus)
    with pytest.raises(ValueError, match="step must be a non-negative integer, got -1"):
        monitor(make_model(corpus), -1)
    assert not (tmp_path / "run.zarr").exists()


def test_monitor_without_zarr_names_the_extra(tmp_path, corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(ImportError, match=r'pip install "peelnb\[zarr\]"'):
        peelnb.PeelMonitor(tmp_path / "run.zarr", corpus)


def test_monitor_without_data_refuses_a_model_the_bundled_characters_do_not_fit(tmp_path, corpus):
    monitor = peelnb.PeelMonitor(tmp_path / "run.zarr", **SETTINGS)
    wider = GPT(ModelConfig(vocab_size=corpus.vocab_size + 7, **TINY_MODEL), seed=0)
    with pytest.raises(ValueError, match=f"the model has {corpus.vocab_size + 7} token ids, the bundled corpus "
                                         f"{corpus.vocab_size}: pass data="):
        monitor(wider, 0)
    assert not (tmp_path / "run.zarr").exists()


def test_monitor_without_data_peels_the_bundled_corpus_as_peel_does(tmp_path, corpus):
    model = make_model(corpus).eval()
    ds = peelnb.PeelMonitor(tmp_path / "run.zarr", **SETTINGS)(model, 0)
    expected = peelnb.peel({0: model}, progress=False, **SETTINGS, view="replace", seed=0)
    xr.testing.assert_allclose(ds["loss_model"], expected["loss_model"])
    assert peelnb.open(tmp_path / "run.zarr").sizes["step"] == 1
