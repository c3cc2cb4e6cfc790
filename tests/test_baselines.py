"""Baselines (`peel(..., baselines=True)`): values against independent computations, storage, ranking."""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import peelnb
from peelnb.config import ModelConfig
from peelnb.model import GPT
from peelnb.peeling import peel_windows
from peelnb.results import OPTIONAL_VARIABLES, validate
from peelnb.spectral import eigenvalues, fit_power_law, matrix_alpha
from peelnb.testing import assert_same_result

from .conftest import TINY_PEEL

SEEDED = np.random.default_rng(20261203)


@pytest.fixture(scope="module")
def tiny(tiny_run):
    run = tiny_run()
    return run, peelnb.peel(run, baselines=True, **TINY_PEEL)


def _weightwatcher():
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import weightwatcher
        from weightwatcher.WW_powerlaw import WWFit
    return weightwatcher, WWFit


def _power_law_matrix(alpha: float, m: int, rng: np.random.Generator) -> np.ndarray:
    """An (m, m) matrix whose eigenvalues of W^T W are drawn from a Pareto law with density ~ x^-alpha on [1, inf)."""
    evals = (1.0 - rng.random(m)) ** (-1.0 / (alpha - 1.0))
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((m, m)))
    return u @ np.diag(np.sqrt(evals)) @ v.T


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_alpha_recovers_a_known_power_law_spectrum(alpha):
    weight = _power_law_matrix(alpha, 800, np.random.default_rng(int(alpha * 10)))
    fit = fit_power_law(eigenvalues(weight))
    # the estimate lies within 4 of its standard errors, (alpha - 1) / sqrt(n_tail), of the truth
    assert abs(fit.alpha - alpha) < 4 * (fit.alpha - 1) / np.sqrt(fit.n_tail), fit
    assert fit.n_tail > 100


def test_alpha_matches_weightwatchers_fit_on_the_same_eigenvalues():
    # Same estimator, same eigenvalues: agreement to rounding, on large and small (N < 20) spectra alike.
    _, WWFit = _weightwatcher()
    for shape in [(256, 64), (64, 64), (300, 100), (16, 16), (40, 12), (30, 19), (9, 9)]:
        for heavy in (False, True):
            weight = SEEDED.standard_normal(shape)
            if heavy:
                weight = weight @ np.diag(SEEDED.pareto(1.5, shape[1]) + 0.1)
            evals = eigenvalues(weight)
            with contextlib.redirect_stdout(io.StringIO()):
                theirs = WWFit(evals[evals > 1e-5])
            ours = fit_power_law(evals)
            assert ours.alpha == pytest.approx(theirs.alpha, rel=1e-9), shape
            assert ours.xmin == pytest.approx(theirs.xmin, rel=1e-12), shape


def test_alpha_of_a_flat_spectrum_is_nan_and_bad_matrices_are_refused():
    assert np.isnan(fit_power_law(np.ones(30)).alpha)
    assert np.isnan(fit_power_law(np.array([1.0])).alpha)
    with pytest.raises(ValueError, match="2-D"):
        eigenvalues(np.ones(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        matrix_alpha(np.full((3, 3), np.nan))


@pytest.mark.parametrize("which", ["trained, 16 eigenvalues per matrix", "initialized, 64 per matrix"])
def test_peel_alpha_matches_the_weightwatcher_package_on_the_same_checkpoint(tiny_run, corpus, which):
    # The package's analyze() on the model vs peelnb's alpha in the result: its per-matrix alphas
    # averaged per block. Both take float64 singular values of the same stored weights, so they agree
    # to SVD rounding (rel 1e-6 leaves room for a LAPACK driver difference, nothing more). The trained
    # tiny model exercises the small-sample estimator (N < 20), the wider one the plain one.
    if which.startswith("trained"):
        model = tiny_run().load(40).model
    else:
        model = GPT(ModelConfig(vocab_size=corpus.vocab_size, n_layer=2, d_model=64, n_head=4, n_ctx=16), seed=3)
    ds = peelnb.peel({7: model}, baselines=True, bits=(32,), permutations=1, solver_steps=2, calib_tokens=1024,
                     eval_tokens=256, progress=False)
    weightwatcher, _ = _weightwatcher()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        frame = weightwatcher.WeightWatcher(model=model).analyze()
    for layer in ds["layer"].values:
        rows = frame[frame["longname"].str.startswith(f"blocks.{layer}.")]
        assert len(rows) == 4
        assert float(ds["alpha"].sel(step=7, layer=layer)) == pytest.approx(rows["alpha"].mean(), rel=1e-6)


def test_grad_norm_is_the_relative_gradient_of_the_calibration_loss(tiny):
    run, ds = tiny
    settings = ds.attrs
    calib, _ = peel_windows(run.corpus(), settings["n_ctx"], calib_tokens=TINY_PEEL["calib_tokens"],
                            eval_tokens=TINY_PEEL["eval_tokens"], seed=settings["seed"])
    for step in run.steps:
        model = run.load(step).model.eval()
        logits = model(calib[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), calib[:, 1:].flatten()).backward()
        for layer, block in enumerate(model.blocks):
            grad = torch.cat([p.grad.flatten() for p in block.parameters()]).norm()
            norm = torch.cat([p.detach().flatten() for p in block.parameters()]).norm()
            assert float(ds["grad_norm"].sel(step=step, layer=layer)) == pytest.approx(float(grad / norm), rel=1e-4)


def test_weight_change_is_relative_to_the_previous_checkpoint_and_nan_at_the_first(tiny):
    run, ds = tiny
    steps = run.steps
    assert bool(ds["weight_change"].sel(step=steps[0]).isnull().all())
    for before, after in itertools.pairwise(steps):
        old, new = run.load(before).model, run.load(after).model
        for layer in range(len(new.blocks)):
            a = torch.cat([p.detach().flatten() for p in old.blocks[layer].parameters()]).double()
            b = torch.cat([p.detach().flatten() for p in new.blocks[layer].parameters()]).double()
            expected = float((b - a).norm() / a.norm())
            assert expected > 0
            assert float(ds["weight_change"].sel(step=after, layer=layer)) == pytest.approx(expected, rel=1e-9)


def test_weight_change_of_a_frozen_layer_is_zero_and_resumed_peels_reload_the_previous_checkpoint(tiny_run, tmp_path):
    run = tiny_run("frozen:1")
    out = tmp_path / "peel.nc"
    first = peelnb.peel({s: run.checkpoint(s) for s in run.steps[:2]}, baselines=True, out=out, **TINY_PEEL)
    assert float(first["weight_change"].sel(step=run.steps[1], layer=1)) == 0.0
    assert float(first["weight_change"].sel(step=run.steps[1], layer=0)) > 0
    # the third step is computed in a fresh call: its previous checkpoint is loaded again
    whole = peelnb.peel({s: run.checkpoint(s) for s in run.steps}, baselines=True, out=out, **TINY_PEEL)
    straight = peelnb.peel({s: run.checkpoint(s) for s in run.steps}, baselines=True, **TINY_PEEL)
    assert_same_result(whole, straight, ignore_attrs=("created",))


def test_baselines_carry_units_and_survive_netcdf_and_zarr_round_trips(tiny, tmp_path):
    _, ds = tiny
    for name, (dims, long_name, units) in OPTIONAL_VARIABLES.items():
        assert ds[name].dims == dims
        assert ds[name].attrs == {"long_name": long_name, "units": units}
        assert bool(ds[name].isel(step=slice(1, None)).notnull().all()), name
    assert ds.attrs["baselines"] == 1
    for path in (tmp_path / "peel.nc", tmp_path / "peel.zarr"):
        assert peelnb.open(peelnb.save(ds, path)).identical(ds)
    store = tmp_path / "grown.zarr"
    from peelnb.results import append_step

    for step in ds["step"].values:
        append_step(ds.sel(step=[step]), store)
    assert peelnb.open(store).identical(ds)


def test_a_peel_without_baselines_has_none_and_a_wrong_baseline_is_refused(tiny_run, tiny):
    _, with_baselines = tiny
    plain = peelnb.peel(tiny_run(), **TINY_PEEL)
    assert not set(OPTIONAL_VARIABLES) & set(plain.data_vars)
    assert "baselines" not in plain.attrs
    assert_same_result(with_baselines.drop_vars(list(OPTIONAL_VARIABLES)), plain,
                       ignore_attrs=("created", "baselines"))
    bad = with_baselines.copy()
    bad["alpha"] = bad["alpha"].isel(step=0, drop=True)
    with pytest.raises(ValueError, match="'alpha' has dims"):
        validate(bad)


@pytest.mark.parametrize(("by", "largest_first"), [("alpha", True), ("grad_norm", False), ("weight_change", False)])
def test_summary_ranks_by_a_baseline_in_its_documented_direction(tiny, by, largest_first):
    _, ds = tiny
    step = int(ds["step"].values[-1])
    table = ds.peel.summary(bits=32, by=by)
    values = ds[by].sel(step=step).values
    order = np.argsort(-values if largest_first else values, kind="stable")
    assert table["layer"].tolist() == ds["layer"].values[order].tolist()
    assert table["rank"].tolist() == [1, 2]
    assert np.allclose(table[by], values[order])


def test_summary_ranks_by_ablation_smallest_loss_increase_first_and_says_what_it_cannot_rank_by(tiny, tiny_run):
    _, ds = tiny
    table = ds.peel.summary(bits=32, by="ablation")
    cost = (ds["loss_ablate"] - ds["loss_model"]).sel(step=int(ds["step"][-1])).values
    assert table["layer"].tolist() == ds["layer"].values[np.argsort(cost)].tolist()
    assert np.allclose(table["ablation"], np.sort(cost))
    with pytest.raises(ValueError, match="pass one of"):
        ds.peel.summary(by="loss")
    with pytest.raises(ValueError, match="baselines=True"):
        peelnb.peel(tiny_run(), **TINY_PEEL).peel.summary(by="alpha")


def test_the_viewer_and_heatmap_offer_the_baselines(tiny):
    _, ds = tiny
    ax = peelnb.plot.gap_heatmap(ds, bits=32, variable="alpha")
    assert np.allclose(ax.images[0].get_array(), ds["alpha"].transpose("layer", "step").values, equal_nan=True)
    viewer = peelnb.explore(ds)
    assert {"grad_norm", "weight_change", "alpha"} <= set(viewer.controls["variable"].options)
    viewer.variable = "weight_change"
    assert viewer.variable == "weight_change"


def test_the_command_line_peels_with_baselines_and_ranks_by_them(tiny_run, tmp_path, capsys):
    from peelnb.cli import main

    out = tmp_path / "peel.nc"
    argv = ["peel", str(tiny_run().path), "--out", str(out), "--bits", "32", "--permutations", "1", "-K", "2",
            "--calib-tokens", "1024", "--eval-tokens", "256", "--baselines", "--no-progress"]
    assert main(argv) == 0
    ds = peelnb.open(out)
    capsys.readouterr()
    assert main(["summary", str(out), "--by", "weight_change"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("layers ranked by weight_change at step ")
    header = lines[2].split()
    assert "weight_change" in header and "alpha" in header
    ranked = [int(line.split()[header.index("layer")]) for line in lines[3:]]
    assert ranked == ds.peel.summary(by="weight_change")["layer"].tolist()
