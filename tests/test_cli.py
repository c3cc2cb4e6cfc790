"""The peelnb command: the quick demo end to end, peel and summary, and its errors."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import xarray as xr

import peelnb
from peelnb.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run([sys.executable, "-m", "peelnb", "demo", "--quick", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=600)
    return out, result


def test_quick_demo_writes_results_plain_xarray_can_open_and_a_report(quick_demo):
    out, result = quick_demo
    assert result.returncode == 0, result.stderr
    files = sorted(p.relative_to(out).as_posix() for p in out.glob("*/peel.nc"))
    assert files == ["clean/peel.nc", "frozen-1/peel.nc"]
    with xr.open_dataset(out / "frozen-1" / "peel.nc") as ds:
        assert ds["loss_ref"].dims == ("step", "layer", "permutation", "bits")
        assert ds["bits"].values.tolist() == [1.0, 1.58, 4.0, 32.0]
        assert ds.sizes["permutation"] == 3
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_demo_prints_what_it_does_and_where_the_planted_layer_ranks(quick_demo):
    _, result = quick_demo
    assert "training the clean run" in result.stdout
    assert "peeling 5 checkpoints" in result.stdout
    assert "planted frozen layer 1 at 32 bits (full): rank 1 of 3" in result.stdout
    assert "report.png" in result.stdout
    flagged = int(re.search(r"clean run: (\d+) of 3 layers flagged at the last step", result.stdout).group(1))
    assert ("--quick trains too briefly" in result.stdout) == (flagged > 0)


def test_demo_run_again_resumes_without_recomputing(quick_demo):
    out, _ = quick_demo
    before = (out / "clean" / "peel.nc").stat().st_mtime_ns
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert (out / "clean" / "peel.nc").stat().st_mtime_ns == before


def test_summary_command_prints_the_ranked_table(quick_demo, capsys):
    out, _ = quick_demo
    assert main(["summary", str(out / "frozen-1" / "peel.nc"), "--bits", "32"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[1] == "layers ranked by gap at step 300, most under-optimized first"
    table = printed.splitlines()[2:]
    assert table[0].split()[:3] == ["rank", "layer", "bits"]
    assert table[1].split()[:3] == ["1", "1", "32"]


def test_peel_command_peels_a_run_folder(tiny_run, tmp_path, capsys):
    out = tmp_path / "peel.nc"
    argv = ["peel", str(tiny_run().path), "--out", str(out), "--bits", "1.58,32", "--permutations", "2",
            "-K", "5", "--calib-tokens", "1024", "--eval-tokens", "256", "--no-progress"]
    assert main(argv) == 0
    ds = peelnb.open(out)
    assert ds.attrs["solver_steps"] == 5 and ds["bits"].values.tolist() == [1.58, 32.0]
    assert "result:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["summary", "missing.nc"], "result file 'missing.nc' does not exist"),
        (["peel", "not-a-run", "--out", "x.nc"], "run folder 'not-a-run' does not exist"),
        (["demo", "--quick", "--fault", "frozen:9", "--out", "unused"], "fault layer 9 is out of range"),
        (["summary", "."], "is a folder, not a result"),
        (["peel", "bad-run", "--out", "x.nc"], "bad-run/run.json' is not a peelnb run file (missing 'model')"),
        (["peel", "not-json", "--out", "x.nc"], "not-json/run.json' is not a peelnb run file (Expecting value"),
        (["summary", "store.zarr"], 'Zarr result stores need the zarr package: pip install "peelnb[zarr]"'),
    ],
)
def test_errors_are_one_clear_line_and_exit_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for run, meta in (("bad-run", "{}"), ("not-json", "")):
        (tmp_path / run).mkdir()
        (tmp_path / run / "run.json").write_text(meta)
    (tmp_path / "store.zarr").mkdir()
    monkeypatch.setitem(sys.modules, "zarr", None)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("peelnb: error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("argv", "message"), [(["demo", "--bits", "5"], "unknown bits value"),
                                               (["demo", "--bits", "1,,32"], "unknown bits value ''"),
                                               (["demo", "--fault", "frozen"], "must look like KIND:LAYER")])
def test_bad_options_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


