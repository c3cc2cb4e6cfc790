"""Training loop: schedule, resume, planted faults and errors (peelnb.train)."""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable

import pytest
import torch

import peelnb.train
from peelnb.checkpoints import Run, load_checkpoint, state_hash
from peelnb.config import Fault, ModelConfig, TrainConfig
from peelnb.data import Corpus, seeded_generator
from peelnb.model import GPT, Block, init_block_
from peelnb.train import lr_at, train

STEPS = 30
RESET_STEP = round(peelnb.train.RESET_AT * STEPS)  # 24
TRAIN = dict(steps=STEPS, batch_size=4, warmup=5, checkpoints=(0, 10, 20, RESET_STEP, STEPS), eval_every=10,
             eval_tokens=128, seed=3)


def _text() -> str:
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    rng = random.Random(0)
    return " ".join(rng.choice(words) for _ in range(4000))


CORPUS = Corpus.from_text(_text(), name="tiny words")
MODEL = ModelConfig(vocab_size=CORPUS.vocab_size, n_layer=2, d_model=16, n_head=2, n_ctx=16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models train fastest on one thread, and do not fight other work for the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(folder, fault: str | None = None, **overrides) -> Run:
    config = TrainConfig(**{**TRAIN, **overrides}, fault=Fault.parse(fault) if fault else None)
    return train(folder, model=MODEL, config=config, corpus=CORPUS, progress=False)


def _states(run: Run) -> dict[int, dict[str, torch.Tensor]]:
    return {step: run.load(step).model.state_dict() for step in run.steps}


def _block(state: dict[str, torch.Tensor], layer: int, *, matrices: bool | None = None) -> dict[str, torch.Tensor]:
    """Tensors of block ``layer`` (only matrices, only vectors, or all)."""
    prefix = f"blocks.{layer}."
    return {
        k.removeprefix(prefix): v
        for k, v in state.items()
        if k.startswith(prefix) and (matrices is None or (v.dim() >= 2) == matrices)
    }


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def _outside(state: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(f"blocks.{layer}.")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Callable[[str | None], Run]:
    """``trained(fault)``: the module's run with that fault (None: clean), trained once."""
    cache: dict[str | None, Run] = {}

    def get(fault: str | None = None) -> Run:
        if fault not in cache:
            cache[fault] = _train(tmp_path_factory.mktemp((fault or "clean").replace(":", "-")), fault)
        return cache[fault]

    return get


@pytest.fixture(scope="module")
def clean(trained) -> Run:
    return trained(None)


@pytest.fixture(scope="module")
def clean_states(clean) -> dict[int, dict[str, torch.Tensor]]:
    return _states(clean)


# ---------------------------------------------------------------- schedule


def test_lr_warms_up_linearly_then_decays_by_cosine_to_lr_min():
    config = TrainConfig(steps=110, warmup=10, lr=1e-2, lr_min=1e-3)
    assert lr_at(0, config) == pytest.approx(1e-3)
    assert lr_at(4, config) == pytest.approx(5e-3)
    assert lr_at(9, config) == pytest.approx(1e-2)
    assert lr_at(10, config) == pytest.approx(1e-2)
    assert lr_at(35, config) == pytest.approx(1e-3 + 0.5 * 9e-3 * (1 + math.cos(math.pi / 4)))
    assert lr_at(60, config) == pytest.approx(5.5e-3)
    assert lr_at(110, config) == pytest.approx(1e-3)
    decay = [lr_at(s, config) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert min(lr_at(s, config) for s in range(10, 110)) > 1e-3


def test_lr_without_warmup_starts_at_the_peak():
    config = TrainConfig(steps=20, warmup=0, lr=2e-3, lr_min=2e-4)
    assert lr_at(0, config) == pytest.approx(2e-3)
    assert lr_at(10, config) == pytest.approx(1.1e-3)


def test_run_logs_the_scheduled_lr_at_checkpoints(clean):
    config = clean.train_config
    logged = {entry["step"]: entry["lr"] for entry in clean.log}
    assert sorted(logged) == [0, 10, 20, RESET_STEP, STEPS]
    assert logged[0] == 0.0
    for step in (10, 20, RESET_STEP, STEPS):
        assert logged[step] == pytest.approx(lr_at(step - 1, config))
        assert clean.load(step).lr == pytest.approx(lr_at(step - 1, config))


# ---------------------------------------------------------------- the clean run


def test_run_folder_holds_every_checkpoint_and_a_complete_log(clean, clean_states):
    assert clean.steps == [0, 10, 20, RESET_STEP, STEPS]
    assert clean.meta["complete"] is True
    assert clean.meta["corpus"] == "tiny words"
    initial = GPT(MODEL, seed=TRAIN["seed"]).state_dict()
    assert _equal(clean_states[0], initial)
    assert not _equal(clean_states[STEPS], initial)
    losses = [e["heldout_loss"] for e in clean.log]
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- resume


def _interrupt_on_call(monkeypatch, n: int) -> None:
    real = peelnb.train.save_checkpoint
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("interrupted while saving")
        return real(*args, **kwargs)

    monkeypatch.setattr(peelnb.train, "save_checkpoint", flaky)


@pytest.mark.parametrize("fault, failing_call", [(None, 3), ("frozen:1", 3), ("reset:1", 3), ("reset:1", 5)])
def test_interrupted_run_resumes_to_the_same_final_checkpoint(tmp_path, monkeypatch, trained, fault, failing_call):
    folder = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        _interrupt_on_call(patch, failing_call)  # saves of steps 0, 10, 20, 24, 30 in turn: this one fails
        with pytest.raises(RuntimeError, match="interrupted while saving"):
            _train(folder, fault)
    saved = TRAIN["checkpoints"][: failing_call - 1]
    assert Run(folder).steps == list(saved)
    assert Run(folder).meta["complete"] is False
    first = (folder / "checkpoints" / "step_0000000.safetensors").stat()

    resumed = _train(folder, fault)
    expected = trained(fault)
    assert resumed.steps == expected.steps
    final = load_checkpoint(resumed.checkpoint(STEPS))
    assert final.sha256 == load_checkpoint(expected.checkpoint(STEPS)).sha256
    for step in resumed.steps:
        assert resumed.load(step).sha256 == expected.load(step).sha256, step
    assert [e["step"] for e in resumed.log] == [0, 10, 20, RESET_STEP, STEPS]
    assert [e["heldout_loss"] for e in resumed.log] == pytest.approx([e["heldout_loss"] for e in expected.log])
    assert resumed.meta["complete"] is True
    # resumed from step 10, not retrained from scratch: the step-0 file was not rewritten
    again = (folder / "checkpoints" / "step_0000000.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)


def test_run_interrupted_while_writing_its_final_run_json_is_completed_by_the_next_call(tmp_path, monkeypatch,
                                                                                       clean):
    real = Run.write_meta

    def flaky(path, meta):
        if meta["log"][-1]["step"] == STEPS:
            raise RuntimeError("interrupted after the final checkpoint")
        real(path, meta)

    with monkeypatch.context() as patch:
        patch.setattr(Run, "write_meta", staticmethod(flaky))
        with pytest.raises(RuntimeError, match="interrupted after the final checkpoint"):
            _train(tmp_path)
    assert Run(tmp_path).steps == clean.steps  # the final checkpoint and optimizer state were written

    resumed = _train(tmp_path)
    assert resumed.load(STEPS).sha256 == clean.load(STEPS).sha256
    assert resumed.meta["complete"] is True
    assert [e["step"] for e in resumed.log] == [e["step"] for e in clean.log]


def test_run_restarted_before_its_first_checkpoint_logs_each_step_once(tmp_path, monkeypatch):
    # without a checkpoint at step 0, run.json is written (log of steps 0 and 10) before any optimizer state
    with monkeypatch.context() as patch:
        _interrupt_on_call(patch, 1)  # the first checkpoint, step 20, fails
        with pytest.raises(RuntimeError, match="interrupted while saving"):
            _train(tmp_path, checkpoints=(20, STEPS))
    assert [e["step"] for e in Run(tmp_path).log] == [0, 10]
    restarted = _train(tmp_path, checkpoints=(20, STEPS))
    assert restarted.steps == [20, STEPS]
    assert [e["step"] for e in restarted.log] == [0, 10, 20, STEPS]


def _copy(run: Run, folder) -> Run:
    shutil.copytree(run.path, folder, dirs_exist_ok=True)
    return Run(folder)


def test_completed_run_called_again_returns_without_training(tmp_path, monkeypatch, clean):
    run = _copy(clean, tmp_path)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise AssertionError("a complete run was trained again")

    monkeypatch.setattr(peelnb.train, "save_checkpoint", fail)
    monkeypatch.setattr(peelnb.train, "heldout_loss", fail)
    again = _train(tmp_path)
    assert again.steps == run.steps
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


# ---------------------------------------------------------------- faults


def test_frozen_layer_keeps_its_initialization_at_every_checkpoint(trained):
    states = _states(trained("frozen:1"))
    initial = GPT(MODEL, seed=TRAIN["seed"]).state_dict()
    for step, state in states.items():
        assert _equal(_block(state, 1), _block(initial, 1)), step
    assert not _equal(_block(states[STEPS], 0), _block(initial, 0))


def test_reset_layer_is_reinitialized_at_80_percent_of_training(trained, clean_states):
    states = _states(trained("reset:1"))
    fresh = init_block_(Block(MODEL), MODEL.n_layer, seeded_generator(TRAIN["seed"], peelnb.train._RESET_KEY, 1))
    fresh_state = fresh.state_dict()
    # before the reset the run is the clean run
    for step in (0, 10, 20):
        assert state_hash(states[step]) == state_hash(clean_states[step]), step
    # the checkpoint at the reset step holds the freshly initialized layer, and the others as trained
    assert _equal(_block(states[RESET_STEP], 1), fresh_state)
    assert not _equal(_block(states[20], 1), fresh_state)
    assert _equal(_outside(states[RESET_STEP], 1), _outside(clean_states[RESET_STEP], 1))
    # then it trains again from there
    assert not _equal(_block(states[STEPS], 1), fresh_state)
    assert not _equal(_block(states[STEPS], 1), _block(clean_states[STEPS], 1))


def test_noise_changes_only_the_faulty_layers_matrices_in_the_final_checkpoint(trained, clean_states):
    states = _states(trained("noise:0"))
    for step in (0, 10, 20, RESET_STEP):
        assert state_hash(states[step]) == state_hash(clean_states[step]), step
    final, clean_final = states[STEPS], clean_states[STEPS]
    assert _equal(_outside(final, 0), _outside(clean_final, 0))
    assert _equal(_block(final, 0, matrices=False), _block(clean_final, 0, matrices=False))
    noisy, trained = _block(final, 0, matrices=True), _block(clean_final, 0, matrices=True)
    assert len(noisy) == 4
    for name in noisy:
        added = noisy[name] - trained[name]
        assert (added != 0).all(), name
        # half each matrix's standard deviation
        assert float(added.std() / trained[name].std()) == pytest.approx(peelnb.train.NOISE_SCALE, rel=0.2), name


def test_slow_layer_moves_much_less_than_the_others(trained):
    states = _states(trained("slow:1"))

    def moved(layer: int) -> float:
        start, end = _block(states[0], layer), _block(states[STEPS], layer)
        return math.sqrt(sum(float((end[k] - start[k]).square().sum()) for k in start))

    assert moved(1) > 0
    assert moved(1) < 0.1 * moved(0)


def test_slow_layer_runs_at_a_fiftieth_of_the_learning_rate():
    gpt = GPT(MODEL, seed=0)
    config = TrainConfig(**TRAIN, fault=Fault("slow", 1))
    groups = peelnb.train._param_groups(gpt, config)
    faulty = {id(p) for p in gpt.blocks[1].parameters()}
    for group in groups:
        in_fault = {id(p) in faulty for p in group["params"]}
        assert len(in_fault) == 1
        assert group["lr_scale"] == (peelnb.train.SLOW_LR_SCALE if in_fault.pop() else 1.0)
    assert peelnb.train.SLOW_LR_SCALE == 0.02
    assert sum(len(g["params"]) for g in groups) == len(list(gpt.parameters()))


# ---------------------------------------------------------------- errors


def test_vocabulary_mismatch_names_the_corpus_size(tmp_path):
    model = ModelConfig(vocab_size=CORPUS.vocab_size + 1, n_layer=2, d_model=16, n_head=2, n_ctx=16)
    with pytest.raises(ValueError, match=rf"use ModelConfig\(vocab_size={CORPUS.vocab_size}, \.\.\.\)"):
        train(tmp_path, model=model, config=TrainConfig(**TRAIN), corpus=CORPUS, progress=False)
    assert not any(tmp_path.iterdir())


def test_fault_layer_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="fault layer 2 is out of range for a model of 2 layers"):
        _train(tmp_path, "frozen:2")
    assert not any(tmp_path.iterdir())


def test_corpus_shorter_than_a_context(tmp_path):
    corpus = Corpus.from_text(_text()[:100], name="short")
    model = ModelConfig(vocab_size=corpus.vocab_size, n_layer=2, d_model=16, n_head=2, n_ctx=16)
    with pytest.raises(ValueError, match="held-out split, fewer than one context of 16"):
        train(tmp_path, model=model, config=TrainConfig(**TRAIN), corpus=corpus, progress=False)


@pytest.mark.parametrize("change", [dict(seed=4), dict(steps=20, checkpoints=(0, 20)), dict(fault="slow:0")])
def test_folder_holding_a_different_run_is_refused_and_left_alone(tmp_path, clean, change):
    _copy(clean, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    fault = change.pop("fault", None)
    with pytest.raises(ValueError, match="already holds a different run"):
        _train(tmp_path, fault, **change)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_folder_holding_a_run_on_another_corpus_is_refused(tmp_path, clean):
    _copy(clean, tmp_path)
    other = Corpus.from_text(_text()[::-1], name="reversed words")
    with pytest.raises(ValueError, match="already holds a different run"):
        train(tmp_path, model=MODEL, config=TrainConfig(**TRAIN), corpus=other, progress=False)
