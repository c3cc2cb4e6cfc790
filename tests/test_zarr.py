"""Zarr result stores: exact round trips, appends along step, crashes mid-append, growing stores (peelnb.results)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import peelnb
from peelnb import results

ROOT = Path(__file__).resolve().parents[1]
STEP_ARRAYS = ["checkpoint_sha256", "local_err", "loss_ablate", "loss_model", "loss_model_q", "loss_ref",
               "loss_ref_calib", "solve_seconds", "step"]


def make_result(steps: list[int], seed: int = 0) -> xr.Dataset:
    """A result with distinct values in every cell, NaN holes, string coords and attrs of every stored kind."""
    rng = np.random.default_rng(seed)
    ds = results.new_dataset(steps, [0, 1, 2], [0, 1], [1.58, 32.0],
                             attrs={"view": "replace", "seed": 0, "solver_steps": 50, "solver_lr": 3e-3,
                                    "model": '{"class": "GPT"}', "flag": np.bool_(True), "n": np.int64(7)},
                             layer_names=["blocks.0", "blocks.1", "blocks.2"])
    ds.attrs["created"] = "2026-01-01T00:00:00+00:00"
    hashes = [f"{rng.integers(2**62):064x}" for _ in steps]
    ds = ds.assign_coords(checkpoint_sha256=("step", np.asarray(hashes, dtype="<U64")))
    for name in results.VARIABLES:
        ds[name][:] = rng.normal(2.0, 0.5, ds[name].shape)
    ds["loss_ref"][dict(layer=2, permutation=1)] = np.nan
    return ds


def stored(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` as files store it: attributes as plain str, int and float."""
    out = ds.copy()
    out.attrs = {k: int(v) if isinstance(v, (bool, np.bool_)) else v for k, v in ds.attrs.items()}
    return out


def assert_exact(actual: xr.Dataset, expected: xr.Dataset) -> None:
    xr.testing.assert_identical(actual, expected)
    for name in expected.variables:
        assert actual[name].dtype == expected[name].dtype, name


def step_lengths(store: Path) -> dict[str, int]:
    """Length along step of every step array, from each array's own metadata (not the commit record)."""
    return {name: json.loads((store / name / ".zarray").read_text())["shape"][0] for name in STEP_ARRAYS}


# ---------------------------------------------------------------- save / open


def test_zarr_round_trip_is_exact_and_equals_the_netcdf_one(tmp_path):
    ds = make_result([0, 100, 250])
    store = peelnb.save(ds, tmp_path / "peel.zarr")
    nc = peelnb.save(ds, tmp_path / "peel.nc")
    from_zarr, from_nc = peelnb.open(store), peelnb.open(nc)
    assert_exact(from_zarr, stored(ds))
    assert_exact(from_zarr, from_nc)
    assert from_zarr["checkpoint_sha256"].dtype == "<U64" and from_zarr["layer_name"].dtype == "<U8"
    assert np.isnan(from_zarr["loss_ref"].sel(layer=2, permutation=1)).all()
    with xr.open_zarr(store) as plain:  # any Zarr reader: format 2, consolidated, one chunk per step
        xr.testing.assert_identical(plain.load(), stored(ds))
    assert (store / ".zmetadata").is_file()
    assert zarr.open_group(str(store), mode="r")["loss_ref"].chunks == (1, 3, 2, 2)
    assert isinstance(ds.attrs["flag"], np.bool_)  # the caller's dataset is not changed


def test_converting_between_netcdf_and_zarr_is_exact(tmp_path):
    ds = peelnb.tutorial.example_result()
    store = peelnb.save(ds, tmp_path / "a.zarr")
    nc = peelnb.save(peelnb.open(store), tmp_path / "b.nc")
    back = peelnb.open(peelnb.save(peelnb.open(nc), tmp_path / "c.zarr"))
    assert_exact(back, ds)


def test_save_replaces_a_store_whole_and_atomically(tmp_path, monkeypatch):
    store = tmp_path / "peel.zarr"
    peelnb.save(make_result([0, 100]), store)
    peelnb.save(make_result([5], seed=1), store)
    assert_exact(peelnb.open(store), stored(make_result([5], seed=1)))
    # where the system cannot swap two folders in one step, the old store is renamed aside first
    monkeypatch.setattr("peelnb._io.exchange_paths", lambda a, b: False)
    peelnb.save(make_result([7], seed=2), store)
    assert_exact(peelnb.open(store), stored(make_result([7], seed=2)))

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_zarr", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        peelnb.save(make_result([9], seed=3), store)
    monkeypatch.undo()
    assert_exact(peelnb.open(store), stored(make_result([7], seed=2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peel.zarr"]


def test_open_rejects_folders_that_are_not_result_stores(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        peelnb.open(tmp_path / "absent.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is a folder, not a result: open a .nc file .* or a Zarr store"):
        peelnb.open(tmp_path / "empty")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(ValueError, match="is not a Zarr store peelnb can read.*consolidate_metadata"):
        peelnb.open(tmp_path / "empty.zarr")
    xr.Dataset({"t": ("time", [1.0, 2.0])}).to_zarr(tmp_path / "other.zarr", zarr_format=2)
    with pytest.raises(ValueError, match="not a peelnb result: dimension 'step' is missing"):
        peelnb.open(tmp_path / "other.zarr")


# ---------------------------------------------------------------- append


def test_appends_keep_steps_sorted_skip_present_ones_and_never_duplicate(tmp_path):
    full = make_result([0, 10, 20, 30, 40])
    store = tmp_path / "run.zarr"
    assert results.append_step(full.sel(step=[0, 20]), store) == [0, 20]  # creates the store
    assert results.append_step(full.sel(step=[20, 30]), store) == [30]  # 20 is present: skipped
    assert results.append_step(full.sel(step=[40]), store) == [40]
    assert step_lengths(store) == dict.fromkeys(STEP_ARRAYS, 4)  # appended in place, not rewritten
    assert results.append_step(full.sel(step=[10]), store) == [10]  # sorts before the last: merged in
    assert results.append_step(full, store) == []
    back = peelnb.open(store)
    assert back["step"].values.tolist() == [0, 10, 20, 30, 40]
    assert_exact(back, stored(full))
    with xr.open_zarr(store) as plain:
        assert plain["step"].values.tolist() == [0, 10, 20, 30, 40]


def test_a_present_step_keeps_its_committed_values(tmp_path):
    store = tmp_path / "run.zarr"
    first = make_result([0, 10])
    results.append_step(first, store)
    assert results.append_step(make_result([10, 20], seed=5), store) == [20]
    back = peelnb.open(store)
    xr.testing.assert_identical(back.sel(step=[0, 10]), stored(first))
    xr.testing.assert_identical(back.sel(step=[20]), stored(make_result([10, 20], seed=5)).sel(step=[20]))


def test_append_writes_steps_given_out_of_order_sorted(tmp_path):
    full = make_result([0, 10, 20])
    store = tmp_path / "run.zarr"
    results.append_step(full.sel(step=[0]), store)
    assert results.append_step(full.sel(step=[20, 10]), store) == [10, 20]
    assert_exact(peelnb.open(store), stored(full))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ds: ds.sel(bits=[32.0]), r"bits is \[32\.0\], the store's \[1\.58, 32\.0\]"),
        (lambda ds: ds.sel(layer=[0, 2]), r"layer is \[0, 2\], the store's \[0, 1, 2\]"),
        (lambda ds: ds.sel(permutation=[0]), r"permutation is \[0\], the store's \[0, 1\]"),
        (lambda ds: ds.assign_attrs(view="headroom"), r"view is 'headroom', the store's 'replace'"),
        (lambda ds: ds.assign_attrs(seed=1), r"seed is 1, the store's 0"),
        (lambda ds: ds.assign_coords(layer_name=("layer", ["a", "b", "c"])), r"layer_name is \['a', 'b', 'c'\]"),
        (lambda ds: ds.assign(loss_model=ds["loss_model"].astype("float32")), r"loss_model is float32"),
        (lambda ds: ds.assign(grad_norm=ds["loss_ablate"]), r"the store lacks \['grad_norm'\]"),
    ],
)
def test_append_with_other_settings_is_refused_naming_the_difference(tmp_path, change, message):
    store = tmp_path / "run.zarr"
    results.append_step(make_result([0]), store)
    with pytest.raises(ValueError, match=rf"cannot append to .*other settings \(.*{message}.*write to another store"):
        results.append_step(change(make_result([10])), store)
    assert_exact(peelnb.open(store), stored(make_result([0])))


def test_append_ignores_creation_time_and_versions(tmp_path):
    store = tmp_path / "run.zarr"
    results.append_step(make_result([0]), store)
    later = make_result([10]).assign_attrs(created="2030-01-01T00:00:00+00:00", peelnb_version="9.9",
                                           torch_version="9.9")
    assert results.append_step(later, store) == [10]
    assert peelnb.open(store).attrs["created"] == make_result([0]).attrs["created"]


def test_append_refuses_repeated_steps_and_netcdf_paths(tmp_path):
    ds = make_result([0, 10])
    with pytest.raises(ValueError, match=r"the steps to append repeat: \[10, 10\]"):
        results.append_step(ds.sel(step=[10, 10]), tmp_path / "run.zarr")
    with pytest.raises(ValueError, match="is not a Zarr store: .*ends in .zarr"):
        results.append_step(ds, tmp_path / "run.nc")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- crashes


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("arrays_written", [0, 3, len(STEP_ARRAYS)])
def test_a_crash_mid_append_keeps_the_committed_steps_and_a_rerun_completes(tmp_path, monkeypatch, arrays_written):
    full = make_result([0, 10, 20, 30])
    store = tmp_path / "run.zarr"
    results.append_step(full.sel(step=[0, 10]), store)
    real_write = results._write_region
    calls = []

    def crash_after_some_arrays(array, axis, start, values):
        calls.append(1)
        if len(calls) > arrays_written:
            shape = list(array.shape)
            shape[axis] = start + values.shape[axis]
            array.resize(tuple(shape))  # the crash hits after the resize, before the data
            raise Crash
        real_write(array, axis, start, values)

    def crash_before_commit(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(results, "_write_region", crash_after_some_arrays)
    monkeypatch.setattr(zarr, "consolidate_metadata", crash_before_commit)
    with pytest.raises(Crash):
        results.append_step(full.sel(step=[20, 30]), store)
    monkeypatch.undo()

    lengths = step_lengths(store)
    assert sum(n == 4 for n in lengths.values()) == min(arrays_written + 1, len(STEP_ARRAYS))  # a torn append
    assert_exact(peelnb.open(store), stored(full.sel(step=[0, 10])))  # readers see the committed steps only
    with xr.open_zarr(store) as plain:
        xr.testing.assert_identical(plain.load(), stored(full.sel(step=[0, 10])))

    assert results.append_step(full.sel(step=[20, 30]), store) == [20, 30]
    assert_exact(peelnb.open(store), stored(full))
    assert step_lengths(store) == dict.fromkeys(STEP_ARRAYS, 4)


def test_a_rerun_after_a_torn_append_of_fewer_steps_trims_the_leftovers(tmp_path, monkeypatch):
    full = make_result([0, 10, 20, 30])
    store = tmp_path / "run.zarr"
    results.append_step(full.sel(step=[0]), store)
    monkeypatch.setattr(zarr, "consolidate_metadata", lambda *args, **kwargs: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        results.append_step(full.sel(step=[10, 20, 30]), store)
    monkeypatch.undo()
    assert set(step_lengths(store).values()) == {4}  # written but not committed
    assert results.append_step(full.sel(step=[10]), store) == [10]
    assert step_lengths(store) == dict.fromkeys(STEP_ARRAYS, 2)
    assert_exact(peelnb.open(store), stored(full.sel(step=[0, 10])))


_KILLED_APPEND = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from peelnb import results
from test_zarr import make_result

real, calls = results._write_region, []

def write_then_die(array, axis, start, values):
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    real(array, axis, start, values)

results._write_region = write_then_die
results.append_step(make_result([0, 10, 20]).sel(step=[20]), {store!r})
"""


def test_a_process_killed_mid_append_leaves_a_readable_store(tmp_path):
    full = make_result([0, 10, 20])
    store = tmp_path / "run.zarr"
    results.append_step(full.sel(step=[0, 10]), store)
    script = _KILLED_APPEND.format(tests=str(ROOT / "tests"), store=str(store))
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == -9, done.stderr
    assert sorted(step_lengths(store).values()) == [2] * 6 + [3] * 3
    assert_exact(peelnb.open(store), stored(full.sel(step=[0, 10])))
    assert results.append_step(full.sel(step=[20]), store) == [20]
    assert_exact(peelnb.open(store), stored(full))


# ---------------------------------------------------------------- a growing store

_APPENDER = """
import sys, time
sys.path.insert(0, {tests!r})
from peelnb import results
from test_zarr import make_result

full = make_result(list(range(0, {n} * 10, 10)))
for step in full["step"].values[1:]:
    results.append_step(full.sel(step=[step]), {store!r})
    time.sleep(0.1)
print("torch" in sys.modules)
"""


def test_open_reads_a_store_another_process_is_appending_to(tmp_path):
    n = 8
    full = make_result(list(range(0, n * 10, 10)))
    store = tmp_path / "run.zarr"
    results.append_step(full.sel(step=[0]), store)
    seen = peelnb.open(store)
    assert seen["step"].values.tolist() == [0]
    script = _APPENDER.format(tests=str(ROOT / "tests"), store=str(store), n=n)
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    counts = []
    try:
        while writer.poll() is None:
            ds = peelnb.open(store)  # never a torn state: always the first k steps, exactly
            k = ds.sizes["step"]
            assert_exact(ds, stored(full.isel(step=slice(0, k))))
            counts.append(k)
            time.sleep(0.01)
    finally:
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert out.split() == ["False"]  # appending to a store never imports torch
    assert counts == sorted(counts) and len(set(counts)) >= 3  # it saw the store grow
    assert_exact(peelnb.open(store), stored(full))


def test_open_shows_a_step_appended_after_it_last_looked(tmp_path):
    full = make_result([0, 10])
    store = tmp_path / "run.zarr"
    results.append_step(full.sel(step=[0]), store)
    before = peelnb.open(store)
    script = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); from peelnb import results; "
              f"from test_zarr import make_result; results.append_step(make_result([0, 10]).sel(step=[10]), "
              f"{str(store)!r})")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=ROOT)
    assert before["step"].values.tolist() == [0]  # what was opened is in memory, unchanged
    assert_exact(peelnb.open(store), stored(full))


# ---------------------------------------------------------------- peel(out=...zarr)


def test_peel_appends_each_finished_step_to_a_zarr_store_and_resumes_from_it(tmp_path, corpus, monkeypatch):
    from peelnb.config import ModelConfig
    from peelnb.model import GPT

    from .conftest import TINY_MODEL, TINY_PEEL  # here, so that writer processes can import this module alone

    config = ModelConfig(vocab_size=corpus.vocab_size, **TINY_MODEL)
    models = {step: GPT(config, seed=step) for step in (0, 10, 20)}
    store = tmp_path / "peel.zarr"
    appended = []
    real_append = results.append_step

    def record(ds, path):
        appended.append(ds["step"].values.tolist())
        return real_append(ds, path)

    monkeypatch.setattr(results, "append_step", record)
    first = peelnb.peel({0: models[0], 10: models[10]}, corpus, out=store, **TINY_PEEL)
    assert appended == [[0], [10]]  # one append per finished step
    assert_exact(peelnb.open(store), first)

    appended.clear()
    resumed = peelnb.peel(models, corpus, out=store, **TINY_PEEL)
    assert appended == [[20]]  # the steps in the store are not computed again:
    xr.testing.assert_identical(resumed.sel(step=[0, 10]), first)  # same solve timings, read back
    back = peelnb.open(store)
    assert back["step"].values.tolist() == [0, 10, 20]
    xr.testing.assert_identical(back, resumed)


# ---------------------------------------------------------------- without the extra


def test_zarr_stores_without_zarr_installed_name_the_extra(tmp_path, monkeypatch):
    store = peelnb.save(make_result([0]), tmp_path / "run.zarr")
    monkeypatch.setitem(sys.modules, "zarr", None)
    extra = r'pip install "peelnb\[zarr\]"'
    with pytest.raises(ImportError, match=extra):
        peelnb.save(make_result([0]), tmp_path / "other.zarr")
    with pytest.raises(ImportError, match=extra):
        peelnb.open(store)
    with pytest.raises(ImportError, match=extra):
        results.append_step(make_result([10]), store)
    peelnb.save(make_result([0]), tmp_path / "still.nc")  # netCDF needs no zarr
    assert sorted(os.listdir(tmp_path)) == ["run.zarr", "still.nc"]
