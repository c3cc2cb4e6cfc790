"""Validation and serialization of the settings dataclasses (peelnb.config)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from peelnb.config import BITS, Fault, ModelConfig, PeelConfig, TrainConfig, check_bits


def _json_round_trip(settings):
    """``from_dict`` of ``to_dict`` after passing through JSON, as run folders and attrs store it."""
    return type(settings).from_dict(json.loads(json.dumps(settings.to_dict())))


# ---------------------------------------------------------------- bits


@pytest.mark.parametrize("given, expected", [(1, 1.0), (1.58, 1.58), ("4", 4.0), (8.0, 8.0), (32, 32.0)])
def test_check_bits_returns_the_canonical_float(given, expected):
    value = check_bits(given)
    assert value == expected and isinstance(value, float)
    assert value in BITS


@pytest.mark.parametrize("bits", [1.5, 5, 0, 64, "ternary", None])
def test_unknown_bits_name_every_allowed_value(bits):
    with pytest.raises(ValueError, match=r"unknown bits value .*use one of 1, 1\.58, 2, 3, 4, 8, 32"):
        check_bits(bits)
    with pytest.raises(ValueError, match="unknown bits value"):
        ModelConfig(vocab_size=10, bits=bits)


# ---------------------------------------------------------------- ModelConfig


def test_model_config_d_model_must_be_a_multiple_of_n_head():
    with pytest.raises(ValueError, match=r"d_model \(30\) must be a multiple of n_head \(4\)"):
        ModelConfig(vocab_size=10, d_model=30, n_head=4)


@pytest.mark.parametrize("field, value", [("n_head", 0), ("d_model", -16), ("n_layer", 2.0), ("vocab_size", True),
                                          ("n_ctx", None)])
def test_model_config_sizes_must_be_positive_integers(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a positive integer, got {value!r}"):
        ModelConfig(**{"vocab_size": 10, field: value})


def test_model_config_stores_bits_as_canonical_float():
    assert ModelConfig(vocab_size=10, bits=4).bits == 4.0
    assert ModelConfig(vocab_size=10).bits == 32.0


def test_model_config_is_frozen():
    config = ModelConfig(vocab_size=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_layer = 3  # type: ignore[misc]


# ---------------------------------------------------------------- Fault


@pytest.mark.parametrize("text, expected", [("frozen:3", Fault("frozen", 3)), (" slow : 0", Fault("slow", 0)),
                                            ("noise:12", Fault("noise", 12)), ("reset:1", Fault("reset", 1))])
def test_fault_parse_reads_kind_and_layer(text, expected):
    assert Fault.parse(text) == expected


def test_fault_str_parses_back():
    fault = Fault("reset", 4)
    assert str(fault) == "reset:4"
    assert Fault.parse(str(fault)) == fault


@pytest.mark.parametrize("text", ["frozen", "frozen:", "frozen:x", "frozen:-1", "frozen:1.5", "3", ""])
def test_fault_parse_rejects_malformed_text_with_the_expected_form(text):
    with pytest.raises(ValueError, match=r"must look like KIND:LAYER, e\.g\. frozen:3 \(kinds: frozen, slow, reset, "
                                         r"noise\)"):
        Fault.parse(text)


def test_fault_parse_rejects_an_unknown_kind_listing_the_kinds():
    with pytest.raises(ValueError, match=r"fault kind must be one of 'frozen', 'slow', 'reset', 'noise', got 'melted'"):
        Fault.parse("melted:2")


@pytest.mark.parametrize("layer", [-1, 1.0, True, "2"])
def test_fault_layer_must_be_a_non_negative_integer(layer):
    with pytest.raises(ValueError, match="fault layer must be a non-negative integer"):
        Fault("frozen", layer)


# ---------------------------------------------------------------- TrainConfig


def test_train_config_default_checkpoints_are_five_even_steps():
    assert TrainConfig().checkpoints == (0, 250, 500, 750, 1000)
    assert TrainConfig(steps=8).checkpoints == (0, 2, 4, 6, 8)


def test_train_config_always_checkpoints_the_final_step_sorted_and_unique():
    assert TrainConfig(steps=10, checkpoints=(7, 3, 3)).checkpoints == (3, 7, 10)
    assert TrainConfig(steps=10, checkpoints=(10, 0)).checkpoints == (0, 10)


@pytest.mark.parametrize("checkpoints, bad", [((0, 11), "[11]"), ((-1, 5), "[-1]"), ((12, -3, 4), "[-3, 12]")])
def test_train_config_checkpoints_outside_the_run_are_named(checkpoints, bad):
    with pytest.raises(ValueError, match=re.escape(f"checkpoint steps {bad} lie outside 0..10")):
        TrainConfig(steps=10, checkpoints=checkpoints)


def test_train_config_rejects_lr_min_above_lr():
    with pytest.raises(ValueError, match=r"lr_min \(0\.01\) must not exceed lr \(0\.001\)"):
        TrainConfig(lr=1e-3, lr_min=1e-2)


@pytest.mark.parametrize("field, value", [("lr", 0.0), ("lr", float("inf")), ("lr_min", -1e-3)])
def test_train_config_rates_must_be_positive_and_finite(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a positive finite number"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field", ["steps", "batch_size", "eval_every", "eval_tokens"])
def test_train_config_counts_must_be_positive(field):
    with pytest.raises(ValueError, match=f"{field} must be a positive integer, got 0"):
        TrainConfig(**{field: 0})


@pytest.mark.parametrize("field", ["warmup", "weight_decay", "grad_clip"])
def test_train_config_rejects_negative_warmup_decay_and_clip(field):
    with pytest.raises(ValueError, match="must be >= 0"):
        TrainConfig(**{field: -1})


def test_train_config_accepts_a_fault_given_as_a_dict():
    config = TrainConfig(fault={"kind": "slow", "layer": 2})
    assert config.fault == Fault("slow", 2)


# ---------------------------------------------------------------- PeelConfig


@pytest.mark.parametrize("view, target, init, batch", [("replace", "output", "scratch", 2),
                                                       ("headroom", "task", "trained", 8)])
def test_peel_config_view_sets_target_init_and_batch(view, target, init, batch):
    config = PeelConfig(view=view)
    assert (config.target, config.init, config.batch_size) == (target, init, batch)
    assert config.selects_snapshot == (init == "trained")


def test_peel_config_default_batch_follows_an_overridden_target():
    assert PeelConfig(view="replace", target="task").batch_size == 8
    assert PeelConfig(view="headroom", target="output").batch_size == 2
    assert PeelConfig(view="headroom", batch_size=3).batch_size == 3


def test_peel_config_init_override_decides_snapshot_selection():
    config = PeelConfig(view="replace", init="trained")
    assert (config.target, config.init, config.selects_snapshot) == ("output", "trained", True)


@pytest.mark.parametrize("field, value, allowed", [("view", "repair", "'replace', 'headroom'"),
                                                   ("target", "loss", "'output', 'task'"),
                                                   ("init", "random", "'scratch', 'trained'")])
def test_peel_config_rejects_unknown_view_target_and_init(field, value, allowed):
    with pytest.raises(ValueError, match=f"{field} must be one of {allowed}, got '{value}'"):
        PeelConfig(**{field: value})


@pytest.mark.parametrize("permutations, expected", [(3, (0, 1, 2)), (1, (0,)), ((4, 0, 4), (0, 4)), ([2], (2,))])
def test_peel_config_permutations_count_or_ids(permutations, expected):
    assert PeelConfig(permutations=permutations).permutations == expected


@pytest.mark.parametrize("permutations, message", [(0, "permutations must be a positive integer, got 0"),
                                                   (-2, "permutations must be a positive integer, got -2"),
                                                   ((), "permutations must be a positive count or non-negative ids"),
                                                   ((1, -1), "permutations must be a positive count or non-negative")])
def test_peel_config_rejects_bad_permutations(permutations, message):
    with pytest.raises(ValueError, match=message):
        PeelConfig(permutations=permutations)


@pytest.mark.parametrize("permutations", ["3", 2.5, True, None, (0.5, 1)])
def test_peel_config_rejects_permutations_that_are_neither_a_count_nor_integer_ids(permutations):
    # "3" must not silently become the single permutation id 3, nor 0.5 the id 0
    with pytest.raises(ValueError, match="permutations"):
        PeelConfig(permutations=permutations)


def test_peel_config_bits_are_canonical_sorted_and_unique():
    assert PeelConfig(bits=(32, 1, 1.58, 1.0, "4")).bits == (1.0, 1.58, 4.0, 32.0)
    with pytest.raises(ValueError, match="bits must name at least one bit-width"):
        PeelConfig(bits=())
    with pytest.raises(ValueError, match="unknown bits value 6"):
        PeelConfig(bits=(4, 6))


def test_peel_config_layers_sorted_unique_and_non_negative():
    assert PeelConfig(layers=(2, 0, 2)).layers == (0, 2)
    assert PeelConfig().layers is None
    with pytest.raises(ValueError, match="layers must be non-negative indices"):
        PeelConfig(layers=(1, -1))


@pytest.mark.parametrize("kwargs, message", [
    ({"solver_steps": 0}, "solver_steps must be a positive integer"),
    ({"calib_tokens": -5}, "calib_tokens must be a positive integer"),
    ({"lr": 0.0}, "lr must be a positive finite number"),
    ({"selection_fraction": 1.0}, "selection_fraction must lie strictly between 0 and 1"),
    ({"selection_fraction": 0}, "selection_fraction must lie strictly between 0 and 1"),
])
def test_peel_config_rejects_bad_solver_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PeelConfig(**kwargs)


# ---------------------------------------------------------------- to_dict / from_dict


@pytest.mark.parametrize("settings", [
    ModelConfig(vocab_size=73, n_layer=3, n_head=2, d_model=32, n_ctx=64, bits=1.58),
    TrainConfig(steps=40, checkpoints=(0, 20), fault=Fault("reset", 1), seed=7, lr=1e-2, lr_min=1e-4),
    TrainConfig(),
    PeelConfig(view="headroom", bits=(4, 1.58), permutations=(0, 3), layers=(1,), lr=1e-4, seed=5),
    PeelConfig(),
])
def test_to_dict_from_dict_round_trips_through_json(settings):
    restored = _json_round_trip(settings)
    assert restored == settings
    assert restored.to_dict() == settings.to_dict()


def test_train_config_to_dict_stores_the_fault_as_a_plain_dict():
    data = TrainConfig(fault=Fault("frozen", 2)).to_dict()
    assert data["fault"] == {"kind": "frozen", "layer": 2}
    assert json.loads(json.dumps(data))["checkpoints"] == [0, 250, 500, 750, 1000]


@pytest.mark.parametrize("cls, data, unknown", [
    (ModelConfig, {"vocab_size": 10, "n_layers": 3}, "['n_layers']"),
    (TrainConfig, {"steps": 10, "epochs": 2, "lr_max": 1.0}, "['epochs', 'lr_max']"),
    (PeelConfig, {"view": "replace", "K": 50}, "['K']"),
    (Fault, {"kind": "frozen", "layer": 1, "when": 0.8}, "['when']"),
])
def test_from_dict_rejects_unknown_keys_naming_them_and_the_known_fields(cls, data, unknown):
    with pytest.raises(ValueError, match=re.escape(f"unknown {cls.__name__} fields {unknown}; known fields")):
        cls.from_dict(data)


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="must be a multiple of n_head"):
        ModelConfig.from_dict({"vocab_size": 10, "d_model": 10, "n_head": 3})
