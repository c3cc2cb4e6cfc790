"""Mechanics of peelnb.peel on tiny runs: schema, determinism, resume, export, bad input."""

from __future__ import annotations

import copy
import pickle
import shutil

import numpy as np
import pytest
import torch

import peelnb
import peelnb.peeling as peeling
from peelnb.checkpoints import checkpoint_path, save_checkpoint
from peelnb.config import ModelConfig
from peelnb.data import spread_windows
from peelnb.model import GPT
from peelnb.peeling import PeelWarning, splice
from peelnb.testing import assert_same_result
from peelnb.train import heldout_loss

from .conftest import TINY_PEEL


@pytest.fixture(scope="module")
def tiny_result(tiny_run):
    return peelnb.peel(tiny_run(), **TINY_PEEL)


def test_result_has_the_schema_dims_coords_and_attrs(tiny_result, tiny_run):
    ds = tiny_result
    assert ds["loss_ref"].dims == ("step", "layer", "permutation", "bits")
    assert ds["loss_model_q"].dims == ("step", "layer", "bits")
    assert ds["loss_ablate"].dims == ("step", "layer")
    assert ds["step"].values.tolist() == tiny_run().steps == [0, 20, 40]
    assert ds["layer"].values.tolist() == [0, 1]
    assert ds["permutation"].values.tolist() == [0, 1]
    assert ds["bits"].values.tolist() == [1.58, 32.0]
    assert ds["bits"].dtype == np.float64 and ds["step"].dtype == np.int64
    for name in peelnb.results.VARIABLES:
        assert np.isfinite(ds[name].values).all(), name
        assert ds[name].attrs["units"] and ds[name].attrs["long_name"]
    for key in ("schema_version", "peelnb_version", "torch_version", "target", "init", "solver_steps", "solver_lr",
                "solver_batch", "calib_tokens", "eval_tokens", "corpus", "seed", "created", "model"):
        assert key in ds.attrs, key
    assert (ds.attrs["target"], ds.attrs["init"]) == ("output", "scratch")
    assert ds.attrs["calib_tokens"] == 1024 and ds.attrs["eval_tokens"] == 256
    assert len(set(ds["checkpoint_sha256"].values.tolist())) == 3


def test_full_precision_round_to_nearest_baseline_is_the_model_itself(tiny_result):
    q32 = tiny_result["loss_model_q"].sel(bits=32).transpose("step", "layer").values
    assert np.array_equal(q32, np.repeat(tiny_result["loss_model"].values[:, None], 2, axis=1))


def test_same_seed_gives_an_identical_dataset_and_another_seed_a_different_one(tiny_run, tiny_result):
    again = peelnb.peel(tiny_run(), **TINY_PEEL)
    assert_same_result(again, tiny_result)
    other = peelnb.peel(tiny_run(), **{**TINY_PEEL, "seed": 1})
    assert not np.allclose(other["loss_ref"].values, tiny_result["loss_ref"].values)


def test_replace_references_at_zero_steps_are_their_scratch_init(tiny_run):
    """K = 1 from scratch is far from the trained block: local_err near 1 (the block's output is not matched)."""
    ds = peelnb.peel(tiny_run(), **{**TINY_PEEL, "solver_steps": 1})
    assert float(ds["local_err"].sel(step=40).min()) > 0.5


def test_downstream_evaluation_never_reruns_the_layers_below(tiny_run, monkeypatch):
    """Block 0 runs only during capture and the self-check, never while later layers are verified."""
    checkpoint = tiny_run().load(40)
    model = checkpoint.model
    calls = {"forward": 0}
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    captures = []
    real_capture = peeling._capture

    def counting_capture(adapter, model_, windows, *args, **kwargs):
        before = calls["forward"]
        out = real_capture(adapter, model_, windows, *args, **kwargs)
        captures.append(calls["forward"] - before)
        return out

    monkeypatch.setattr(peeling, "_capture", counting_capture)
    peelnb.peel({40: model}, **TINY_PEEL)
    assert len(captures) == 2  # calibration and evaluation windows, once each
    assert calls["forward"] == sum(captures) + 1  # + the self-check replay


def test_out_file_is_written_after_each_step_and_a_resumed_peel_skips_done_steps(tiny_run, tiny_result, tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "peel.nc"
    real = peeling._peel_checkpoint
    done = []

    def crash_on_second(ds, checkpoint, *args, **kwargs):
        if len(done) == 1:
            raise KeyboardInterrupt
        done.append(checkpoint.step)
        return real(ds, checkpoint, *args, **kwargs)

    monkeypatch.setattr(peeling, "_peel_checkpoint", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        peelnb.peel(tiny_run(), out=out, **TINY_PEEL)
    partial = peelnb.open(out)
    assert partial["loss_ref"].sel(step=0).notnull().all()
    assert partial["loss_ref"].sel(step=[20, 40]).isnull().all()

    resumed_steps = []

    def record(ds, checkpoint, *args, **kwargs):
        resumed_steps.append(checkpoint.step)
        return real(ds, checkpoint, *args, **kwargs)

    monkeypatch.setattr(peeling, "_peel_checkpoint", record)
    resumed = peelnb.peel(tiny_run(), out=out, **TINY_PEEL)
    assert resumed_steps == [20, 40]
    assert_same_result(resumed, tiny_result)
    assert_same_result(peelnb.open(out), resumed)


def test_resuming_into_a_file_with_other_settings_is_refused(tiny_run, tmp_path):
    out = tmp_path / "peel.nc"
    peelnb.peel(tiny_run(), out=out, **TINY_PEEL)
    expected = (r"other settings \(solver_steps: stored 5, requested 6; bits: stored \[1\.58, 32\.0\], "
                r"requested \[32\.0\]\): to resume it, peel with the stored")
    with pytest.raises(ValueError, match=expected):
        peelnb.peel(tiny_run(), out=out, **{**TINY_PEEL, "solver_steps": 6, "bits": (32,)})


def test_exported_reference_spliced_into_the_model_reproduces_loss_ref(tiny_run, tmp_path, corpus):
    run = tiny_run()
    ds = peelnb.peel(run, references=tmp_path / "refs", **TINY_PEEL)
    model = run.load(40).model
    windows = spread_windows(corpus.heldout, ds.attrs["eval_tokens"] // 16, 16)
    for layer in (0, 1):
        for bits in (1.58, 32.0):
            spliced = splice(model, tmp_path / "refs", step=40, layer=layer, permutation=1, bits=bits)
            expected = float(ds["loss_ref"].sel(step=40, layer=layer, permutation=1, bits=bits))
            assert heldout_loss(spliced, windows) == pytest.approx(expected, abs=1e-5)
    weight = splice(model, tmp_path / "refs", step=40, layer=0, permutation=0, bits=1.58).blocks[0].mlp.c_fc.weight
    assert torch.unique(weight).numel() <= 3  # ternary: one scale times {-1, 0, 1}
    assert torch.equal(model.blocks[1].mlp.c_fc.weight, run.load(40).model.blocks[1].mlp.c_fc.weight)


def test_a_checkpoint_with_nan_weights_yields_nan_cells_and_a_warning_naming_it(tiny_run):
    good = tiny_run().load(40).model
    bad = copy.deepcopy(good)
    with torch.no_grad():
        bad.blocks[1].attn.c_attn.weight[0, 0] = float("nan")
    with pytest.warns(PeelWarning, match="step 7 has NaN/inf weights in blocks.1.attn.c_attn.weight"):
        ds = peelnb.peel({5: good, 7: bad}, **TINY_PEEL)
    assert ds["loss_ref"].sel(step=7).isnull().all()
    assert ds["loss_model"].sel(step=7).isnull()
    assert np.isfinite(ds["loss_ref"].sel(step=5).values).all()


def test_byte_identical_checkpoints_are_reported(tiny_run):
    model = tiny_run().load(40).model
    with pytest.warns(PeelWarning, match="steps 1 and 2 are byte-identical"):
        ds = peelnb.peel({1: model, 2: copy.deepcopy(model)}, **TINY_PEEL)
    assert ds["checkpoint_sha256"].values[0] == ds["checkpoint_sha256"].values[1]


def test_a_subset_of_layers_is_peeled_with_its_own_layer_coordinate(tiny_run):
    ds = peelnb.peel(tiny_run(), layers=(1,), **TINY_PEEL)
    assert ds["layer"].values.tolist() == [1]
    assert ds["layer_name"].values.tolist() == ["blocks.1"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(layers=(2,)), ValueError, "layer index 2 is out of range: the model has 2 layers"),
        (dict(bits=(5,)), ValueError, "unknown bits value 5"),
        (dict(view="sideways"), ValueError, "view must be one of"),
        (dict(calib_tokens=100), ValueError, "below 10 x d_model"),
        (dict(permutations=0), ValueError, "permutations must be a positive integer"),
    ],
)
def test_bad_settings_get_clear_errors(tiny_run, kwargs, error, match):
    with pytest.raises(error, match=match):
        peelnb.peel(tiny_run(), **{**TINY_PEEL, **kwargs})


def test_too_short_data_is_refused_with_the_fix(tiny_run):
    with pytest.raises(ValueError, match="fewer than one context of 16"):
        peelnb.peel(tiny_run(), torch.arange(30) % 10, **TINY_PEEL)


def test_token_ids_outside_the_vocabulary_are_refused(tiny_run):
    with pytest.raises(ValueError, match="encode the data with the model's tokenizer"):
        peelnb.peel(tiny_run(), torch.arange(5000) % 200, **TINY_PEEL)


def test_text_with_unknown_characters_is_refused(tiny_run, tmp_path):
    text = tmp_path / "greek.txt"
    text.write_text("αβγ " * 2000, encoding="utf-8")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        peelnb.peel(tiny_run(), text, **TINY_PEEL)


def test_a_users_own_text_file_is_peeled_with_the_runs_tokenizer(tiny_run, tmp_path):
    text = tmp_path / "sonnet.txt"
    text.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 200)
    ds = peelnb.peel(tiny_run(), text, **TINY_PEEL)
    assert ds.attrs["corpus"] == str(text)
    assert np.isfinite(ds["loss_ref"].values).all()


def test_paths_that_do_not_exist_or_are_not_runs_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        peelnb.peel(tmp_path / "nowhere", **TINY_PEEL)
    with pytest.raises(FileNotFoundError, match="not a peelnb run folder"):
        peelnb.peel(tmp_path, **TINY_PEEL)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        peelnb.peel({0: tmp_path / "missing.safetensors"}, **TINY_PEEL)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("not tensors")
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        peelnb.peel({0: text}, **TINY_PEEL)
    pickled = tmp_path / "evil.pt"
    pickled.write_bytes(pickle.dumps({"weights": print}))
    with pytest.raises(ValueError, match="weights_only"):
        peelnb.peel({0: pickled}, **TINY_PEEL)


def test_a_checkpoint_whose_shapes_do_not_match_the_run_is_refused(tiny_run, tmp_path, corpus):
    folder = tmp_path / "run"
    shutil.copytree(tiny_run().path, folder)
    wider = GPT(ModelConfig(vocab_size=corpus.vocab_size, n_layer=2, d_model=32, n_head=2, n_ctx=16))
    save_checkpoint(checkpoint_path(folder, 20), wider, step=20)
    with pytest.raises(ValueError, match=r"step_0000020.safetensors.*does not match.*wte.weight: "
                                         r"checkpoint \(73, 32\) vs model \(73, 16\)"):
        peelnb.peel(folder, **TINY_PEEL)


def test_checkpoints_must_be_a_mapping_or_a_run(tiny_run):
    with pytest.raises(TypeError, match="mapping \\{step: model\\}"):
        peelnb.peel(tiny_run().load(40).model, **TINY_PEEL)
    with pytest.raises(TypeError, match="integer steps"):
        peelnb.peel({"final": tiny_run().load(40).model}, **TINY_PEEL)
