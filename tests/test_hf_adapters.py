"""Adapters for Hugging Face models and peelnb's GPT: capture and replay of full block calls, quantization
layout, scratch init, tied embeddings, model modes, and a planted frozen block found in every architecture."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import peelnb
from peelnb.adapters import Adapter, GPT2Adapter, LlamaAdapter, ModelDims, adapter_for
from peelnb.adapters.capture import SEQUENCE, UNIFORM, capture
from peelnb.data import Corpus, random_windows, seeded_generator
from peelnb.peeling import _rtn_params, _self_check, peel_windows, splice
from peelnb.solver import References
from peelnb.testing import assert_same_result

from .hf_tiny import ARCHS, CTX, VOCAB, logits, tiny_model

TINY = dict(bits=(1.58, 32), permutations=2, solver_steps=5, calib_tokens=1024, eval_tokens=256, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _windows(n: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, CTX + 1), generator=torch.Generator().manual_seed(seed))


def _replayed_logits(adapter, model, captured, first: int = 0) -> torch.Tensor:
    """Logits of the captured h_first sent through blocks first..L-1 (their captured calls) and the head."""
    index = torch.arange(captured[first].shape[0])
    h = captured[first]
    with torch.no_grad():
        for i, block in enumerate(adapter.blocks(model)[first:], start=first):
            h = adapter.call(block, h, captured.calls[i].bind(index))
        return adapter.head(model, h)


@pytest.mark.parametrize("arch", ARCHS)
def test_replaying_the_captured_blocks_reproduces_the_models_logits(arch):
    model = tiny_model(arch)
    adapter = adapter_for(model)
    windows = _windows()
    expected = logits(model, windows[:, :-1])
    captured = capture(adapter, model, windows, chunk_tokens=3 * CTX)  # chunks of 3, 3 and 1 sequences
    for first in (0, 2):
        diff = (_replayed_logits(adapter, model, captured, first) - expected).abs().max().item()
        assert diff < 1e-4, (first, diff)
    _self_check(adapter, model, captured, step=0)


def test_eager_attention_masks_and_sliding_windows_replay_per_block():
    """Eager attention hands blocks (B, 1, T, T) masks; Qwen2 gives sliding-window layers their own mask."""
    model = tiny_model("qwen2", attn_implementation="eager", use_sliding_window=True, sliding_window=4,
                       max_window_layers=1)
    adapter = adapter_for(model)
    windows = _windows()
    captured = capture(adapter, model, windows, chunk_tokens=3 * CTX)
    masks = [leaf.value for call in captured.calls for leaf in call.leaves if leaf.kind == UNIFORM]
    assert len(masks) == 3 and not torch.equal(masks[0], masks[2])  # full vs sliding window
    assert (_replayed_logits(adapter, model, captured) - logits(model, windows[:, :-1])).abs().max() < 1e-4


class _ToyBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, h: torch.Tensor, *, gate: torch.Tensor, scale: float) -> torch.Tensor:
        return h + scale * gate[:, None, None] * torch.tanh(self.proj(h))


class _Toy(torch.nn.Module):
    """Blocks receive a per-sequence gate computed from the tokens: it must be indexed like the hidden states."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.blocks = torch.nn.ModuleList(_ToyBlock() for _ in range(2))
        self.out = torch.nn.Linear(8, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h, gate = self.emb(idx), idx[:, 0].float() / VOCAB
        for block in self.blocks:
            h = block(h, gate=gate, scale=0.5)
        return self.out(h)


class _ToyAdapter(Adapter):
    def blocks(self, model):
        return model.blocks

    def head(self, model, h):
        return model.out(h)

    def quantized_weights(self, block):
        return ["proj.weight"]

    def dims(self, model):
        return ModelDims(n_ctx=None, d_model=8, vocab_size=VOCAB, default_ctx=CTX)


def test_per_sequence_arguments_follow_the_sequences_through_chunks_and_sampling():
    model, adapter = _Toy().eval(), _ToyAdapter()
    windows = _windows(9)
    captured = capture(adapter, model, windows, chunk_tokens=4 * CTX)
    assert [leaf.kind for leaf in captured.calls[0].leaves] == [SEQUENCE, "shared"]
    torch.testing.assert_close(_replayed_logits(adapter, model, captured), logits(model, windows[:, :-1]))
    index = torch.tensor([[7, 2], [0, 8]])  # two stacked copies, each on its own sequences
    block = model.blocks[1]
    params = {k: torch.stack([v, 2 * v]) for k, v in block.named_parameters()}
    got = adapter.stacked_call(block, params, captured[1][index], captured.calls[1].bind(index))
    for r in range(2):
        args, kwargs = captured.calls[1].bind(index[r]).assemble(captured[1][index[r]])
        torch.testing.assert_close(kwargs["gate"], windows[index[r], 0].float() / VOCAB)
        single = functional_call(block, {k: v[r] for k, v in params.items()}, args, kwargs)
        torch.testing.assert_close(got[r], single)
    ds = peelnb.peel({3: model}, torch.arange(4000) % VOCAB, adapter=_ToyAdapter(), n_ctx=CTX, **TINY)
    assert ds["loss_ref"].notnull().all() and ds.attrs["n_ctx"] == CTX


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_the_generic_stacked_call_equals_each_block_run_alone(arch):
    model = tiny_model(arch)
    adapter = adapter_for(model)
    captured = capture(adapter, model, _windows(3))
    block = adapter.blocks(model)[1]
    gen = torch.Generator().manual_seed(1)
    params = {n: torch.stack([p + 0.05 * torch.randn(p.shape, generator=gen) for _ in range(4)])
              for n, p in block.named_parameters()}
    index = torch.arange(3)
    call = captured.calls[1].bind(index)
    stacked = adapter.stacked_call(block, params, captured[1].expand(4, -1, -1, -1), call)
    for r in range(4):
        single = copy.deepcopy(block)
        single.load_state_dict({k: v[r] for k, v in params.items()})
        torch.testing.assert_close(stacked[r], adapter.call(single, captured[1], call), rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_weights_are_quantized_per_output_unit():
    """GPT-2 stores linear weights (in, out): a 1-bit row scale must be shared down each column."""
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    assert isinstance(adapter, GPT2Adapter)
    assert adapter.transposed_weights(block) == adapter.quantized_weights(block) == [
        "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    w = block.mlp.c_fc.weight  # (in 32, out 128)
    one_bit = _rtn_params(adapter, block, [1.0])["mlp.c_fc.weight"][0]
    magnitudes = one_bit.abs()
    assert torch.allclose(magnitudes, magnitudes[:1].expand_as(magnitudes))  # one scale per output column
    torch.testing.assert_close(magnitudes[0], w.abs().mean(dim=0))
    refs = References(adapter, block, peelnb.config.PeelConfig(bits=(1,), permutations=1, init="trained"),
                      layer=0, n_layer=3)
    torch.testing.assert_close(refs.effective()["mlp.c_fc.weight"][0], one_bit)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scratch_init_is_the_models_own_init_seeded(arch):
    model = tiny_model(arch)
    adapter = adapter_for(model)
    block = copy.deepcopy(adapter.blocks(model)[1])
    adapter.init_block(block, 3, seeded_generator(5))
    again = copy.deepcopy(block)
    adapter.init_block(again, 3, seeded_generator(5))
    assert all(torch.equal(a, b) for a, b in zip(block.parameters(), again.parameters()))
    fresh = tiny_model(arch, seed=9)  # transformers' own _init_weights
    own = dict(adapter.blocks(fresh)[1].named_parameters())
    for name, p in block.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, own[name]), name  # norms one, biases zero
        else:
            assert p.std().item() == pytest.approx(own[name].std().item(), rel=0.1), name


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tied_embeddings_are_the_head(arch):
    model = tiny_model(arch, tie_word_embeddings=True)
    adapter = adapter_for(model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    windows = _windows(3)
    captured = capture(adapter, model, windows)
    assert (_replayed_logits(adapter, model, captured) - logits(model, windows[:, :-1])).abs().max() < 1e-4
    with torch.no_grad():
        before = adapter.head(model, captured[-1])
        model.get_input_embeddings().weight.mul_(2)
        torch.testing.assert_close(adapter.head(model, captured[-1]), 2 * before)  # the head reads the embedding
    ds = peelnb.peel(model, torch.arange(4000) % VOCAB, n_ctx=16, **TINY)
    assert ds["loss_ref"].notnull().all()


def test_a_model_given_in_train_mode_comes_back_in_train_mode_and_peels_as_in_eval_mode():
    model = tiny_model("gpt2", resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3).train()
    model.transformer.h[0].eval()  # a mixed state must come back as it was
    model.transformer.h[1].requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    data = torch.arange(4000) % VOCAB
    trained_mode = peelnb.peel({1: model}, data, n_ctx=16, **TINY)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    eval_mode = peelnb.peel({1: copy.deepcopy(model).eval()}, data, n_ctx=16, **TINY)
    assert_same_result(trained_mode, eval_mode)


def test_hooks_are_removed_when_the_forward_pass_fails():
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    too_long = torch.zeros(2, 2 * CTX + 1, dtype=torch.long)  # GPT-2 has CTX learned positions
    with pytest.raises(IndexError):
        capture(adapter, model, too_long)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in adapter.blocks(model))


def test_an_unknown_hugging_face_architecture_gets_an_error_saying_how_to_describe_it():
    import transformers as tf

    opt = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                         num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(TypeError, match="model_type 'opt'.*knows gpt2, gpt_neox, llama, qwen2.*LlamaAdapter.*"
                                        "subclass peelnb.adapters.Adapter"):
        peelnb.peel(opt, torch.arange(4000) % VOCAB, **TINY)
    with pytest.raises(TypeError, match="found no decoder blocks at `layers` in OPTForCausalLM"):
        peelnb.peel(opt, torch.arange(4000) % VOCAB, adapter=LlamaAdapter(), **TINY)


def test_an_adapter_naming_blocks_the_model_does_not_run_is_caught():
    class Wrong(_ToyAdapter):
        def blocks(self, model):
            return [model.blocks[0], torch.nn.Linear(8, 8)]

    with pytest.raises(RuntimeError, match="never called its last block"):
        peelnb.peel({0: _Toy().eval()}, torch.arange(4000) % VOCAB, adapter=Wrong(), n_ctx=CTX, **TINY)


TRAIN_STEPS = 400


def _train(model: torch.nn.Module, frozen: int | None, corpus: Corpus) -> torch.nn.Module:
    """Train briefly on the bundled corpus (character ids), block ``frozen`` (if any) never updated."""
    adapter = adapter_for(model)
    if frozen is not None:
        adapter.blocks(model)[frozen].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    generator = seeded_generator(1)
    model.train()
    for _ in range(TRAIN_STEPS):
        batch = random_windows(corpus.train, 16, CTX, generator)
        loss = F.cross_entropy(logits_with_grad(model, batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


def logits_with_grad(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids) if isinstance(model, peelnb.model.GPT) else model(input_ids=ids, use_cache=False)
    return out if isinstance(out, torch.Tensor) else out.logits


def _peel_trained(model: torch.nn.Module, corpus: Corpus):
    return peelnb.peel({TRAIN_STEPS: model}, corpus, bits=(32,), permutations=2, calib_tokens=8192,
                       eval_tokens=2048, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_a_planted_frozen_block_is_ranked_first(arch, corpus):
    """Three layers trained 400 steps, layer 1 frozen at its random init: the replace view ranks it first."""
    ds = _peel_trained(_train(tiny_model(arch), frozen=1, corpus=corpus), corpus)
    table = ds.peel.summary(bits=32).set_index("layer")
    assert table.index[0] == 1, table.to_string()
    assert table["flagged"].tolist() == [True, False, False], table.to_string()
    best = ds.peel.best().sel(step=TRAIN_STEPS, bits=32)
    assert float(best.sel(layer=1)) > float(best.drop_sel(layer=1).max()), best.values


@pytest.mark.slow
def test_the_same_training_without_the_planted_fault_flags_no_layer(corpus):
    """The counterfactual: trained the same way, layer 1 pulls clearly ahead of its cheap reference."""
    ds = _peel_trained(_train(tiny_model("gpt_neox"), frozen=None, corpus=corpus), corpus)
    table = ds.peel.summary(bits=32)
    assert not table["flagged"].any(), table.to_string()
    assert float(ds.peel.best().sel(step=TRAIN_STEPS, bits=32, layer=1)) < -0.02


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_an_exported_reference_spliced_into_the_model_reproduces_loss_ref(arch, tmp_path, corpus):
    """Trust, but verify: the replayed verification equals the spliced model's own forward pass."""
    model = tiny_model(arch)
    data = Corpus.from_tokens(corpus.train[:20000], vocab_size=VOCAB)
    ds = peelnb.peel({0: model}, data, references=tmp_path, n_ctx=16, **TINY)
    _, evaluation = peel_windows(data, 16, calib_tokens=TINY["calib_tokens"], eval_tokens=TINY["eval_tokens"],
                                 seed=0)
    for bits in (1.58, 32.0):
        spliced = splice(model, tmp_path, step=0, layer=1, permutation=1, bits=bits)
        out = logits(spliced, evaluation[:, :-1])
        loss = F.cross_entropy(out.flatten(0, 1), evaluation[:, 1:].flatten()).item()
        assert loss == pytest.approx(float(ds["loss_ref"].sel(step=0, layer=1, permutation=1, bits=bits)), abs=1e-5)
    adapter = adapter_for(model)
    name = f"{ds['layer_name'].values[1]}.{adapter.quantized_weights(adapter.blocks(model)[1])[0]}"
    assert not torch.equal(spliced.state_dict()[name], model.state_dict()[name])  # the reference, not the model
