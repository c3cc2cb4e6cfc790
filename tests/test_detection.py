"""Acceptance: real training, planted faults, fixed seeds, no mocks.

A 3-layer character model is trained for 1000 steps on the bundled corpus,
clean or with a fault planted in one layer, and peeled at steps 0, 500, 1000.
"""

from __future__ import annotations

import numpy as np
import pytest

import peelnb
from peelnb.data import spread_windows
from peelnb.peeling import splice
from peelnb.train import heldout_loss

pytestmark = pytest.mark.slow
FINAL = 1000


@pytest.fixture(scope="module")
def replaced(real_run):
    """Replace-view results (the defaults), cached per fault."""
    cache = {}

    def get(fault):
        if fault not in cache:
            cache[fault] = peelnb.peel(real_run(fault), progress=False)
        return cache[fault]

    return get


@pytest.mark.parametrize("bits", [32, 1.58])
@pytest.mark.parametrize(("fault", "layer"), [("frozen:1", 1), ("reset:2", 2)])
def test_planted_layer_is_ranked_first_and_flagged_at_the_final_step(replaced, fault, layer, bits):
    table = replaced(fault).peel.summary(bits=bits)
    assert int(table["step"].iloc[0]) == FINAL
    assert int(table["layer"].iloc[0]) == layer, table.to_string()
    assert bool(table["flagged"].iloc[0]), table.to_string()
    assert table["flagged"].sum() == 1, table.to_string()


@pytest.mark.parametrize(("fault", "layer"), [("frozen:1", 1), ("reset:2", 2)])
def test_planted_layer_is_matched_while_trained_layers_pull_clearly_ahead(replaced, fault, layer):
    best = replaced(fault).peel.best().sel(step=FINAL, bits=32)
    assert float(best.sel(layer=layer)) > -0.002
    others = best.drop_sel(layer=layer)
    assert float(others.max()) < -0.01, best.values


def test_clean_model_flags_no_layer_at_the_end_but_most_layers_when_young(replaced):
    flags = replaced(None).peel.flagged()
    assert not bool(flags.sel(step=FINAL).any()), flags.sel(step=FINAL).values
    assert float(flags.sel(step=0).mean()) > 0.5, flags.sel(step=0).values


@pytest.fixture(scope="module")
def headroom_noise(real_run, tmp_path_factory):
    """Headroom view of a run whose layer 1 got noise after training, references exported."""
    folder = tmp_path_factory.mktemp("references")
    run = real_run("noise:1")
    ds = peelnb.peel(run, view="headroom", references=folder, progress=False)
    return run, ds, folder


def test_damaged_layer_has_headroom_and_its_exported_reference_repairs_the_model(headroom_noise, corpus):
    run, ds, folder = headroom_noise
    gap = ds.peel.gap().sel(step=FINAL, layer=1, bits=32)
    assert float(gap.max()) > 0
    permutation = int(gap.idxmax("permutation"))
    checkpoint = run.load(FINAL)
    repaired = splice(checkpoint.model, folder, step=FINAL, layer=1, permutation=permutation, bits=32)
    n_ctx = run.model_config.n_ctx
    windows = spread_windows(corpus.heldout, ds.attrs["eval_tokens"] // n_ctx, n_ctx)
    before, after = heldout_loss(checkpoint.model, windows), heldout_loss(repaired, windows)
    assert after < before
    # trust, but verify: the spliced model reproduces the recorded losses
    assert after == pytest.approx(float(ds["loss_ref"].sel(step=FINAL, layer=1, permutation=permutation, bits=32)),
                                  abs=1e-5)
    assert before == pytest.approx(float(ds["loss_model"].sel(step=FINAL)), abs=1e-5)


def test_headroom_gap_is_never_below_minus_the_noise_floor(headroom_noise):
    _, ds, _ = headroom_noise
    gap = ds.peel.gap().sel(bits=32)
    floor = ds.peel.noise().sel(bits=32)
    assert bool((gap >= -floor - 1e-9).all()), (gap + floor).min().item()


def test_low_bit_headroom_references_beat_round_to_nearest(headroom_noise):
    _, ds, _ = headroom_noise
    low = ds.sel(step=[500, FINAL], bits=[b for b in ds["bits"].values if b < 32])
    assert bool((low["loss_ref"].min("permutation") <= low["loss_model_q"]).all())


def test_trained_init_reproduces_itself_at_full_precision_but_not_at_one_bit(real_run):
    ds = peelnb.peel({FINAL: real_run(None).checkpoint(FINAL)}, target="output", init="trained", bits=(1, 32),
                     permutations=2, solver_steps=10, progress=False)
    err = ds["local_err"].sel(step=FINAL)
    assert float(err.sel(bits=32).max()) < 1e-4
    assert float(err.sel(bits=1).min()) > 0.1
    assert np.isfinite(ds["loss_ref"].values).all()
