"""peel(..., client=...) on a LocalCluster of two worker processes gives the serial Dataset (peelnb.cluster)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections import defaultdict

import pytest
import torch
import xarray as xr
from dask.distributed import Client, LocalCluster, get_task_stream
from safetensors import safe_open

import peelnb
from peelnb import peeling
from peelnb.peeling import PeelWarning

from .conftest import TINY_PEEL
from .hf_tiny import tiny_model

TOKENS = torch.arange(20000) % 80
TIMING = ["solve_seconds"]
"""Wall times: the only variable that differs from the serial run."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def assert_identical_but_timing(got: xr.Dataset, expected: xr.Dataset) -> None:
    xr.testing.assert_identical(got.drop_vars(TIMING).assign_attrs(created=expected.attrs["created"]),
                                expected.drop_vars(TIMING))
    assert got["solve_seconds"].notnull().equals(expected["solve_seconds"].notnull())


def tasks_by_step(stream: list[dict]) -> dict[int, list[str]]:
    """Workers that ran each step's tasks (task keys name the step)."""
    ran = defaultdict(list)
    for task in stream:
        match = re.search(r"peelnb-\w+-step(\d+)-layers", str(task["key"]))
        if match:
            ran[int(match.group(1))].append(task["worker"])
    return dict(ran)


def references(folder) -> dict[str, tuple[dict, dict]]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            out[str(path.relative_to(folder))] = ({k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata())
    return out


@pytest.mark.slow
def test_dask_peel_of_model_objects_is_identical_to_the_serial_one(client, tmp_path):
    m0, m1 = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=1)  # 3 layers: groups [0, 1] and [2]
    checkpoints = {0: m0, 10: m1, 20: m1}  # steps 10 and 20 byte-identical: both runs warn
    settings = dict(TINY_PEEL, baselines=True)
    with pytest.warns(PeelWarning, match="steps 10 and 20 are byte-identical"):
        serial = peelnb.peel(checkpoints, TOKENS, references=tmp_path / "serial", **settings)
    m0.train()
    with pytest.warns(PeelWarning, match="steps 10 and 20 are byte-identical"), get_task_stream(client) as stream:
        dist = peelnb.peel(checkpoints, TOKENS, client=client, out=tmp_path / "peel.zarr",
                           references=tmp_path / "dist", **settings)
    assert_identical_but_timing(dist, serial)
    assert dist["grad_norm"].notnull().all() and dist["weight_change"].sel(step=[10, 20]).notnull().all()
    assert m0.training and all(m.training for m in m0.modules())  # the model given is left as it was
    xr.testing.assert_identical(peelnb.open(tmp_path / "peel.zarr"), dist)
    exported, expected = references(tmp_path / "dist"), references(tmp_path / "serial")
    assert list(exported) == list(expected) and len(expected) == 9
    for name, (tensors, meta) in expected.items():
        assert exported[name][1] == meta
        assert all(torch.equal(exported[name][0][k], t) for k, t in tensors.items()), name
    ran = tasks_by_step(stream.data)
    assert {step: len(workers) for step, workers in ran.items()} == {0: 1, 10: 1, 20: 1}  # one task per checkpoint


@pytest.mark.slow
def test_a_single_checkpoint_is_split_by_layers_over_the_workers(client):
    model = tiny_model("llama", layers=3)
    whole = peelnb.peel({7: model}, TOKENS, **TINY_PEEL)
    per_hidden = whole.attrs["memory_cache_bytes"] // 4  # h_0 .. h_3 over all splits
    budget = 2 * per_hidden + whole.attrs["eval_tokens"] * 32 * 4  # one layer's input and output, and h_L of eval
    serial = peelnb.peel({7: model}, TOKENS, memory_budget=budget, **TINY_PEEL)
    assert serial.attrs["capture_passes"] == 3
    with get_task_stream(client) as stream:
        dist = peelnb.peel({7: model}, TOKENS, client=client, memory_budget=budget, **TINY_PEEL)
    assert_identical_but_timing(dist, serial)
    keys = sorted(re.search(r"layers[\d-]+", str(task["key"])).group() for task in stream.data
                  if "peelnb-" in str(task["key"]))
    assert keys == ["layers0-1", "layers2-2"]  # two groups of layers for two workers


@pytest.mark.slow
def test_a_worker_error_stops_the_peel_and_a_rerun_resumes_from_out(client, tiny_run, tmp_path, monkeypatch):
    run = tiny_run()
    files = {step: run.checkpoint(step) for step in run.steps}  # checkpoint paths: the workers read them
    broken = {**files, 20: tmp_path / "gone.safetensors"}
    out = tmp_path / "peel.zarr"
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):  # raised on a worker, as serially
        peelnb.peel(broken, client=client, out=out, **TINY_PEEL)
    assert peelnb.open(out)["step"].values.tolist() == [0]  # the steps before the error are kept

    bars = []

    class Bar(peeling.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(peeling, "tqdm", Bar)
    with get_task_stream(client) as stream:
        resumed = peelnb.peel(files, client=client, out=out, **dict(TINY_PEEL, progress=True))
    assert sorted(tasks_by_step(stream.data)) == [20, 40]  # step 0 was not peeled again
    assert bars[0].n == bars[0].total == 3 * 2 * 2 * 2  # steps x layers x permutations x bits
    serial = peelnb.peel(files, **TINY_PEEL)
    assert_identical_but_timing(resumed, serial)
    assert_identical_but_timing(peelnb.open(out), serial)


def test_a_model_that_cannot_be_pickled_gets_a_clear_error(client):
    model = tiny_model("peelnb")
    model.lock = threading.Lock()
    with pytest.raises(TypeError, match=r"step 5 cannot be sent to the Dask workers .*save it"):
        peelnb.peel({5: model}, TOKENS, client=client, **TINY_PEEL)


def test_client_must_be_a_dask_client_and_dask_an_installed_extra(monkeypatch):
    model = tiny_model("peelnb")
    with pytest.raises(TypeError, match=r"client must be a dask.distributed.Client, got str"):
        peelnb.peel({0: model}, TOKENS, client="tcp://scheduler:8786", **TINY_PEEL)
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "peelnb\[dask\]"'):
        peelnb.peel({0: model}, TOKENS, client=object(), **TINY_PEEL)


def test_the_serial_peel_imports_no_dask_scheduler():
    """``distributed`` (Dask's cluster client) is imported only for client=; xarray itself imports core dask."""
    code = (
        "import sys, torch, peelnb\n"
        "from peelnb.config import ModelConfig\nfrom peelnb.model import GPT\n"
        "model = GPT(ModelConfig(vocab_size=73, n_layer=1, d_model=16, n_head=2, n_ctx=16))\n"
        "peelnb.peel({0: model}, bits=(32,), permutations=1, solver_steps=2, calib_tokens=512, eval_tokens=128,"
        " progress=False)\n"
        "print(sorted(m for m in ('distributed', 'peelnb.cluster') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_layers_are_split_only_as_far_as_the_workers_need():
    from peelnb.cluster import groups_of

    assert groups_of([0, 1, 2, 3, 4, 5, 6], workers=3, steps=1) == [[0, 1, 2], [3, 4], [5, 6]]
    assert groups_of([0, 1, 2, 3, 4, 5, 6], workers=4, steps=2) == [[0, 1, 2, 3], [4, 5, 6]]
    assert groups_of([0, 1, 2, 3], workers=4, steps=4) == [[0, 1, 2, 3]]  # a whole checkpoint per task
    assert groups_of([2, 5], workers=8, steps=1) == [[2], [5]]
    assert groups_of([0, 1, 2], workers=0, steps=1) == [[0, 1, 2]]  # no worker yet: whole checkpoints
