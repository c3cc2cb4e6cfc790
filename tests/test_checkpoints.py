"""Checkpoint files, hashes and run folders (peelnb.checkpoints)."""

from __future__ import annotations

import pathlib
import pickle

import pytest
import torch

from peelnb.checkpoints import (
    Run,
    checkpoint_path,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    state_hash,
)
from peelnb.config import ModelConfig, TrainConfig
from peelnb.model import GPT

CONFIG = ModelConfig(vocab_size=11, n_layer=2, d_model=16, n_head=2, n_ctx=16)


@pytest.fixture(scope="module")
def model() -> GPT:
    gpt = GPT(CONFIG, seed=3)
    with torch.no_grad():  # non-trivial biases and norms, so every tensor carries information
        for param in gpt.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    return gpt


def _assert_same_weights(actual: GPT, expected: GPT) -> None:
    left, right = actual.state_dict(), expected.state_dict()
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


class _TouchOnLoad:
    """Unpickling this object creates a file: proof that loading ran code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


# ---------------------------------------------------------------- save / load


def test_save_and_load_round_trip(tmp_path, model):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model, step=120, lr=2.5e-4)
    ck = load_checkpoint(path)
    assert ck.step == 120
    assert ck.lr == 2.5e-4
    assert ck.model.config == CONFIG
    _assert_same_weights(ck.model, model)
    assert ck.sha256 == state_hash(model.state_dict())
    assert not ck.model.training
    x = torch.randint(0, 11, (2, 16))
    model.eval()
    assert torch.equal(ck.model(x), model(x))


def test_save_without_lr_loads_lr_none_and_leaves_no_temporary_files(tmp_path, model):
    path = tmp_path / "sub" / "ck.safetensors"
    save_checkpoint(path, model, step=0)
    assert load_checkpoint(path).lr is None
    assert [p.name for p in path.parent.iterdir()] == ["ck.safetensors"]


def test_checkpoint_path_names_steps_with_seven_digits(tmp_path):
    assert checkpoint_path(tmp_path, 42) == tmp_path / "checkpoints" / "step_0000042.safetensors"


# ---------------------------------------------------------------- hashes


def test_state_hash_is_stable_and_order_independent(model):
    state = model.state_dict()
    copied = {k: v.clone() for k, v in reversed(list(state.items()))}
    assert state_hash(state) == state_hash(state) == state_hash(copied)
    assert len(state_hash(state)) == 64


def test_state_hash_changes_with_one_element(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = state_hash(state)
    weight = state["blocks.1.mlp.c_fc.weight"]
    weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(float("inf")))
    assert state_hash(state) != before


def test_state_hash_changes_with_names_dtypes_and_shapes():
    base = {"w": torch.zeros(2, 3)}
    hashes = {
        state_hash(base),
        state_hash({"v": torch.zeros(2, 3)}),
        state_hash({"w": torch.zeros(2, 3, dtype=torch.float64)}),
        state_hash({"w": torch.zeros(3, 2)}),
        state_hash({"w": torch.zeros(6)}),
    }
    assert len(hashes) == 5


def test_state_hash_covers_zero_dimensional_tensors():
    # 0-d buffers are common in state dicts (BatchNorm's num_batches_tracked, scalar scales of other models)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert state["1.num_batches_tracked"].dim() == 0
    before = state_hash(state)
    assert before == state_hash(state) and len(before) == 64
    state["1.num_batches_tracked"] += 1
    assert state_hash(state) != before
    assert state_hash({"s": torch.tensor(1.0)}) != state_hash({"s": torch.tensor(2.0)})


def test_state_hash_of_a_loaded_checkpoint_matches_the_saved_model(tmp_path, model):
    save_checkpoint(tmp_path / "a.safetensors", model, step=1)
    save_checkpoint(tmp_path / "b.safetensors", model, step=2, lr=1.0)
    # same tensors, different metadata: byte-identical weights hash the same
    assert load_checkpoint(tmp_path / "a.safetensors").sha256 == load_checkpoint(tmp_path / "b.safetensors").sha256


# ---------------------------------------------------------------- plain state dicts


def test_pt_state_dict_with_compile_prefixes_loads(tmp_path, model):
    path = tmp_path / "compiled.pt"
    torch.save({f"_orig_mod.{k}": v.clone() for k, v in model.state_dict().items()}, path)
    state, metadata = read_checkpoint(path)
    assert metadata == {}
    assert set(state) == set(model.state_dict())
    ck = load_checkpoint(path, CONFIG)
    _assert_same_weights(ck.model, model)
    assert ck.step == -1 and ck.lr is None
    assert ck.sha256 == state_hash(model.state_dict())


def test_pt_file_wrapping_the_state_under_model_loads(tmp_path, model):
    path = tmp_path / "wrapped.pth"
    torch.save({"model": dict(model.state_dict()), "iter_num": 5}, path)
    _assert_same_weights(load_checkpoint(path, CONFIG).model, model)


def test_pt_state_dict_without_config_asks_for_one(tmp_path, model):
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match=r"carries no peelnb model config: pass config=ModelConfig\(\.\.\.\)"):
        load_checkpoint(path)


def test_pickle_with_a_python_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _TouchOnLoad(marker)}, path)
    with pytest.raises(ValueError, match=r"not a checkpoint peelnb can read safely: torch\.load\(weights_only=True\)"):
        read_checkpoint(path)
    assert not marker.exists()
    plain = tmp_path / "evil.bin"
    plain.write_bytes(pickle.dumps(_TouchOnLoad(marker), protocol=2))
    with pytest.raises(ValueError, match="can read safely"):
        load_checkpoint(plain, CONFIG)
    assert not marker.exists()


def test_pt_file_holding_strings_beside_tensors_is_not_a_state_dict(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"weight": torch.zeros(2), "note": "hello"}, path)
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        read_checkpoint(path)


def test_empty_state_dict_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({}, path)
    with pytest.raises(ValueError, match="holds no tensors"):
        read_checkpoint(path)


def test_text_file_named_safetensors_is_refused(tmp_path):
    path = tmp_path / "fake.safetensors"
    path.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(ValueError, match="is not a readable safetensors checkpoint"):
        load_checkpoint(path)


def test_truncated_safetensors_file_is_refused(tmp_path, model):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model, step=1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="is not a readable safetensors checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path)


# ---------------------------------------------------------------- shape mismatch


def test_checkpoint_of_another_width_lists_the_mismatched_tensors(tmp_path, model):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model, step=1)
    wider = ModelConfig(vocab_size=11, n_layer=2, d_model=32, n_head=2, n_ctx=16)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, wider)
    message = str(info.value)
    assert "does not match the model config" in message
    assert "wte.weight: checkpoint (11, 16) vs model (11, 32)" in message
    assert "and " in message and "more" in message  # many tensors differ: the list is shortened
    assert "Load it with the config it was trained with" in message


def test_checkpoint_with_fewer_layers_names_the_missing_tensors(tmp_path, model):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model, step=1)
    deeper = ModelConfig(vocab_size=11, n_layer=3, d_model=16, n_head=2, n_ctx=16)
    with pytest.raises(ValueError, match=r"missing blocks\.2\.ln_1\.weight"):
        load_checkpoint(path, deeper)


# ---------------------------------------------------------------- run folders


def _write_run(folder: pathlib.Path, model: GPT, steps: list[int]) -> None:
    Run.write_meta(folder, {
        "model": CONFIG.to_dict(),
        "train": TrainConfig(steps=max(steps), checkpoints=tuple(steps)).to_dict(),
        "corpus": "hand-made",
        "tokenizer": "abcdefghijk",
        "log": [{"step": 0, "train_loss": 1.0, "heldout_loss": 2.0, "lr": 0.0}],
        "complete": True,
    })
    for step in steps:
        save_checkpoint(checkpoint_path(folder, step), model, step=step, lr=1e-3)


def test_run_reads_settings_steps_and_checkpoints(tmp_path, model):
    _write_run(tmp_path, model, [0, 5, 30])
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    run = Run(tmp_path)
    assert run.steps == [0, 5, 30]
    assert run.model_config == CONFIG
    assert run.train_config.steps == 30
    assert run.tokenizer.chars == "abcdefghijk"
    assert run.log[0]["heldout_loss"] == 2.0
    ck = run.load(5)
    assert ck.step == 5 and ck.lr == 1e-3
    _assert_same_weights(ck.model, model)


def test_run_checkpoint_of_a_missing_step_lists_the_available_steps(tmp_path, model):
    _write_run(tmp_path, model, [0, 5, 30])
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint at step 7; it has \[0, 5, 30\]"):
        Run(tmp_path).checkpoint(7)


def test_run_without_run_json_explains_what_a_run_folder_is(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a peelnb run folder \(no run\.json\)"):
        Run(tmp_path)
    with pytest.raises(FileNotFoundError, match="run folder .* does not exist"):
        Run(tmp_path / "absent")


def test_run_on_another_corpus_refuses_to_guess_it(tmp_path, model):
    _write_run(tmp_path, model, [0, 5])
    with pytest.raises(ValueError, match="was trained on 'hand-made', not the bundled corpus"):
        Run(tmp_path).corpus()
