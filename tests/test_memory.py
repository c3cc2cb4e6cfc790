"""Memory bounds: capture dtype, the memory estimate said before a run, and capture passes under a budget
that give exactly the Dataset of one pass."""

from __future__ import annotations

import logging

import pytest
import torch

import peelnb
from peelnb.adapters import adapter_for
from peelnb.adapters.capture import capture
from peelnb.cli import main
from peelnb.memory import parse_bytes, plan
from peelnb.testing import assert_same_result

from .hf_tiny import CTX, VOCAB, char_tokenizer, tiny_model

TINY = dict(bits=(1.58, 32), permutations=2, solver_steps=3, calib_tokens=1024, eval_tokens=256, n_ctx=16,
            progress=False)
DATA = torch.arange(6000) % VOCAB
MEMORY_ATTRS = ("created", "memory_cache_bytes", "memory_estimate_bytes", "capture_passes", "memory_budget_bytes")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("view", ["replace", "headroom"])
def test_a_tiny_budget_peels_in_passes_and_gives_the_identical_dataset(view):
    model = tiny_model("llama", layers=4)
    whole = peelnb.peel({5: model}, DATA, view=view, **TINY)
    assert whole.attrs["capture_passes"] == 1
    per_hidden = whole.attrs["memory_cache_bytes"] // 5  # h_0 .. h_4 over all splits
    eval_hidden = whole.attrs["eval_tokens"] * 32 * 4  # h_L of the evaluation split, kept for loss_model
    budget = 2 * per_hidden + eval_hidden  # one layer's input and output
    chunked = peelnb.peel({5: model}, DATA, view=view, memory_budget=budget, **TINY)
    assert chunked.attrs["capture_passes"] == 4 and chunked.attrs["memory_budget_bytes"] == budget
    assert chunked.attrs["memory_cache_bytes"] <= budget < whole.attrs["memory_cache_bytes"]
    assert_same_result(chunked, whole, ignore_attrs=MEMORY_ATTRS)
    pairs = peelnb.peel({5: model}, DATA, view=view, memory_budget=3 * per_hidden + eval_hidden, layers=(0, 1, 3),
                        **TINY)
    assert pairs.attrs["capture_passes"] == 2  # layers 0 and 1 share h_1
    assert_same_result(pairs, whole.sel(layer=[0, 1, 3]), ignore_attrs=(*MEMORY_ATTRS, "peel_config"))


def test_a_budget_below_one_layer_is_refused_with_what_would_fit():
    with pytest.raises(ValueError, match=r"memory_budget=1\.0 KiB is below what one layer's cached activations "
                                         r"take .*lower calib_tokens.*capture_dtype='bfloat16'"):
        peelnb.peel({0: tiny_model("gpt2")}, DATA, memory_budget="1KiB", **TINY)


def test_the_memory_a_peel_will_use_is_logged_before_it_runs_and_recorded(caplog):
    with caplog.at_level(logging.INFO, logger="peelnb.memory"):
        ds = peelnb.peel({0: tiny_model("gpt_neox")}, DATA, **TINY)
    message = [r.getMessage() for r in caplog.records if r.name == "peelnb.memory"]
    assert len(message) == 1 and message[0].startswith("peel will use about")
    # 1,024 calibration + 256 evaluation tokens x 32 floats x 4 bytes, for h_0..h_3
    assert ds.attrs["memory_cache_bytes"] == 4 * (1024 + 256) * 32 * 4
    assert ds.attrs["memory_estimate_bytes"] > ds.attrs["memory_cache_bytes"]


def test_the_command_line_prints_the_memory_estimate(tmp_path, capsys):
    tiny_model("gpt2").save_pretrained(tmp_path / "checkpoint-9")
    char_tokenizer().save_pretrained(tmp_path)
    text = tmp_path / "words.txt"
    text.write_text("hello world " * 400)
    argv = ["peel", str(tmp_path / "checkpoint-9"), "--data", str(text), "--out", str(tmp_path / "p.nc"),
            "--bits", "32", "--permutations", "1", "-K", "2", "--calib-tokens", "1024", "--eval-tokens", "256",
            "--ctx", "16", "--memory-budget", "1GB", "--capture-dtype", "bfloat16", "--no-progress"]
    assert main(argv) == 0
    assert "peel will use about" in capsys.readouterr().err
    ds = peelnb.open(tmp_path / "p.nc")
    assert ds["step"].values.tolist() == [9] and ds.attrs["capture_dtype"] == "bfloat16"


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_hidden_states_are_stored_in_the_capture_dtype(dtype, tolerance):
    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    windows = torch.randint(0, VOCAB, (5, CTX + 1), generator=torch.Generator().manual_seed(0))
    full = capture(adapter, model, windows)
    half = capture(adapter, model, windows, dtype=dtype)
    assert all(h.dtype == dtype for h in half.hidden)
    assert half.nbytes < full.nbytes
    for a, b in zip(full.hidden, half.hidden):
        torch.testing.assert_close(b.float(), a, rtol=tolerance, atol=tolerance)
    name = str(dtype).removeprefix("torch.")
    ds = peelnb.peel({0: model}, DATA, capture_dtype=name, **TINY)
    reference = peelnb.peel({0: model}, DATA, **TINY)
    assert ds.attrs["capture_dtype"] == name
    assert ds.attrs["memory_cache_bytes"] * 2 == reference.attrs["memory_cache_bytes"]
    assert abs(float(ds["loss_model"][0]) - float(reference["loss_model"][0])) < 10 * tolerance


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"memory_budget": "lots"}, "memory_budget 'lots' is not a size"),
    ({"memory_budget": 0}, "memory_budget must be positive"),
    ({"capture_dtype": "int8"}, "capture_dtype must be one of float32, bfloat16, float16"),
])
def test_bad_memory_settings_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peelnb.peel({0: tiny_model("gpt2")}, DATA, **{**TINY, **kwargs})


def test_the_plan_groups_consecutive_layers_greedily():
    result = plan([0, 1, 2, 3, 4], 5, hidden_bytes=10, eval_hidden_bytes=1, model_bytes=0, solver_bytes=0,
                  verify_bytes=0, budget=31)
    assert result.passes == [[0, 1], [2, 3], [4]]  # 3 hidden states + h_L of the evaluation split = 31
    assert result.cache_bytes == 31 and parse_bytes("2 GB") == 2 * 10**9 and parse_bytes("1MiB") == 2**20
