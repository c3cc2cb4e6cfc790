"""Checkpoint suites and data for Hugging Face models: folders, steps from names, offline revisions,
compiled state dicts, tokenizers, and the clear errors of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import peelnb
from peelnb.suites import load_folder, step_from_name
from peelnb.testing import assert_same_result

from .hf_tiny import VOCAB, char_tokenizer, save_suite, tiny_model

TINY = dict(bits=(32,), permutations=2, solver_steps=3, calib_tokens=1024, eval_tokens=256, n_ctx=16,
            progress=False)
DATA = torch.arange(6000) % VOCAB
SOURCE_ATTRS = ("created", "source", "model", "solver_lr", "solver_lr_source")


pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer_state(folder, lr: float) -> None:
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": [{"learning_rate": 2 * lr, "step": 1},
                                                                           {"learning_rate": lr, "step": 2}]}))


@pytest.mark.parametrize(("name", "step"), [("checkpoint-500", 500), ("step1000", 1000), ("step_20", 20),
                                            ("global_step7", 7), ("main", None), ("checkpoint-final", None)])
def test_steps_are_read_from_checkpoint_names(name, step):
    assert step_from_name(name) == step


def test_a_folder_of_trainer_checkpoints_peels_as_steps_read_from_the_names(tmp_path):
    models = {"checkpoint-500": tiny_model("gpt2", seed=1), "checkpoint-1000": tiny_model("gpt2", seed=2)}
    suite = save_suite(tmp_path / "run", models)
    (suite / "runs").mkdir()  # Trainer's log folder: not a checkpoint
    _trainer_state(suite / "checkpoint-1000", lr=3e-5)
    ds = peelnb.peel(suite, DATA, view="headroom", **TINY)
    assert ds["step"].values.tolist() == [500, 1000]
    assert ds.attrs["solver_lr"] == pytest.approx(1e-5)  # a third of the last logged training rate
    assert "final training rate 3e-05" in ds.attrs["solver_lr_source"]
    direct = peelnb.peel({500: models["checkpoint-500"], 1000: models["checkpoint-1000"]}, DATA, view="headroom",
                         lr=1e-5, **TINY)
    assert_same_result(ds, direct, ignore_attrs=(*SOURCE_ATTRS, "peel_config"))  # loading changes nothing


def test_step_folders_and_revisions_of_a_local_folder(tmp_path):
    suite = save_suite(tmp_path / "suite", {"step1000": tiny_model("llama", seed=1),
                                            "step2000": tiny_model("llama", seed=2)})
    assert peelnb.peel(suite, DATA, **TINY)["step"].values.tolist() == [1000, 2000]
    assert peelnb.peel(suite, DATA, revisions=["step2000"], **TINY)["step"].values.tolist() == [2000]
    with pytest.raises(FileNotFoundError, match=r"no model folder for revision 'step3000'; it has \['step1000', "
                                                r"'step2000'\]"):
        peelnb.peel(suite, DATA, revisions=["step3000"], **TINY)
    with pytest.raises(ValueError, match="cannot tell the training step of revision 'main'"):
        peelnb.peel(suite, DATA, revisions=["main"], **TINY)


def test_a_folder_mixing_architectures_is_refused_naming_both(tmp_path):
    suite = save_suite(tmp_path / "mixed", {"checkpoint-1": tiny_model("gpt2"), "checkpoint-2": tiny_model("llama")})
    with pytest.raises(ValueError, match=r"mix architectures: GPT2LMHeadModel \(.*checkpoint-1\) and "
                                         r"LlamaForCausalLM \(.*checkpoint-2\)"):
        peelnb.peel(suite, DATA, **TINY)
    with pytest.raises(ValueError, match="mix architectures: GPT2LMHeadModel .* and Qwen2ForCausalLM"):
        peelnb.peel({1: tiny_model("gpt2"), 2: tiny_model("qwen2")}, DATA, **TINY)


def test_a_folder_without_checkpoints_says_what_it_expected(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()  # no config.json
    with pytest.raises(FileNotFoundError, match="not a peelnb run folder.*Hugging Face model folder.*checkpoint-500/"):
        peelnb.peel(tmp_path, DATA, **TINY)
    (tmp_path / "weights.safetensors").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"is a file: pass checkpoint files as a mapping \{step: file\}"):
        peelnb.peel(tmp_path / "weights.safetensors", DATA, **TINY)


def _cache_revision(cache, model_id: str, revision: str, model) -> None:
    """Lay out one revision of a model in a Hugging Face cache, as a download would."""
    repo = cache / f"models--{model_id.replace('/', '--')}"
    commit = f"{abs(hash(revision)):040d}"[:40]
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    model.save_pretrained(repo / "snapshots" / commit)


def test_revisions_are_read_from_the_local_cache_and_a_missing_one_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _cache_revision(tmp_path / "hub", "tiny/pythia", "step100", tiny_model("gpt_neox", seed=1))
    _cache_revision(tmp_path / "hub", "tiny/pythia", "step200", tiny_model("gpt_neox", seed=2))
    ds = peelnb.peel("tiny/pythia", DATA, revisions=["step100", "step200"], **TINY)
    assert ds["step"].values.tolist() == [100, 200]
    with pytest.raises(FileNotFoundError, match=r"revision 'step300' of 'tiny/pythia' is not in the local Hugging "
                                                r"Face cache .*hub\) and peelnb works offline: fetch it first while "
                                                r"online \(hf download tiny/pythia --revision step300\)"):
        peelnb.peel("tiny/pythia", DATA, revisions=["step100", "step300"], **TINY)
    with pytest.raises(FileNotFoundError, match="nor is 'tiny/other' a model in the local Hugging Face cache"):
        peelnb.peel("tiny/other", DATA, **TINY)


def test_compiled_state_dicts_with_orig_mod_prefixes_load_exactly(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "m")
    state = {f"_orig_mod.{k}": v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_folder(tmp_path / "m")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    compiled = torch.compile(model)  # the wrapper; peel unwraps it without compiling anything
    assert_same_result(peelnb.peel({0: compiled}, DATA, **TINY), peelnb.peel({0: loaded}, DATA, **TINY),
                       ignore_attrs=SOURCE_ATTRS)


def test_a_folder_lacking_weights_is_refused_rather_than_randomly_initialized(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "m")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if ".h.1." not in k and k != "lm_head.weight"}
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights of its model \(transformer\.h\.1\."):
        peelnb.peel(tmp_path / "m", DATA, **TINY)


def test_token_ids_outside_the_models_vocabulary_are_refused():
    with pytest.raises(ValueError, match=r"token ids range over \[0, 99\] but the model's vocabulary has 80 ids: "
                                         "encode the data with the model's tokenizer"):
        peelnb.peel(tiny_model("llama"), torch.arange(6000) % 100, **TINY)


def test_a_tokenizer_larger_than_the_models_embedding_is_refused(tmp_path):
    with pytest.raises(ValueError, match="the tokenizer has 74 tokens but the model's embedding has 60 rows"):
        peelnb.peel(tiny_model("gpt2", vocab=60), tokenizer=char_tokenizer(), **TINY)


def test_text_is_encoded_with_the_tokenizer_saved_with_the_suite_or_the_one_given(tmp_path):
    folder = tmp_path / "suite" / "checkpoint-3"
    tiny_model("qwen2").save_pretrained(folder)
    char_tokenizer().save_pretrained(tmp_path / "suite")  # the suite's root holds the tokenizer
    text = tmp_path / "sonnet.txt"
    text.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 100)
    ds = peelnb.peel(tmp_path / "suite", text, **TINY)
    assert ds["step"].values.tolist() == [3] and ds.attrs["corpus"] == str(text)
    for tokenizer in (char_tokenizer(), str(tmp_path / "suite")):
        given = peelnb.peel({3: load_folder(folder)}, text, tokenizer=tokenizer, **TINY)
        assert_same_result(ds, given, ignore_attrs=SOURCE_ATTRS)
    with pytest.raises(ValueError, match="a text file needs the model's tokenizer: pass tokenizer="):
        peelnb.peel({3: load_folder(folder)}, text, **TINY)


def test_the_default_window_of_a_long_context_model_is_128_tokens_and_n_ctx_is_checked():
    model = tiny_model("llama", ctx=512)
    data = torch.arange(40000) % VOCAB
    settings = {**TINY, "n_ctx": None, "calib_tokens": 512, "eval_tokens": 256}
    assert peelnb.peel(model, data, **settings).attrs["n_ctx"] == 128
    with pytest.raises(ValueError, match="n_ctx=1024 exceeds the model's context of 512 tokens"):
        peelnb.peel(model, data, **{**settings, "n_ctx": 1024})


def test_a_model_object_takes_its_step_from_the_folder_it_was_loaded_from(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path / "checkpoint-700")
    assert peelnb.peel(load_folder(tmp_path / "checkpoint-700"), DATA, **TINY)["step"].values.tolist() == [700]
    assert peelnb.peel(tiny_model("gpt2"), DATA, **TINY)["step"].values.tolist() == [0]


def test_without_transformers_a_hugging_face_path_names_the_extra_to_install(tmp_path, monkeypatch):
    tiny_model("gpt2").save_pretrained(tmp_path / "m")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "peelnb\[hf\]"'):
        peelnb.peel(tmp_path / "m", DATA, **TINY)


def test_importing_peelnb_and_its_engine_does_not_import_transformers():
    code = "import sys, peelnb, peelnb.peeling, peelnb.adapters; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
