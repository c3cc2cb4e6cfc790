"""Corpus, tokenizer, deterministic splits and windows (peelnb.data)."""

from __future__ import annotations

import gzip

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peelnb.data import (
    BUNDLED_NAME,
    CharTokenizer,
    Corpus,
    load_text,
    random_windows,
    seeded_generator,
    split_tokens,
    spread_windows,
)


@pytest.fixture(scope="module")
def bundled_text() -> str:
    return load_text()


# ---------------------------------------------------------------- tokenizer


@settings(max_examples=50, deadline=None)
@given(text=st.text(min_size=1, max_size=200))
def test_tokenizer_round_trips_any_text_it_was_built_from(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.vocab_size == len(set(text))
    assert int(ids.max()) < tok.vocab_size and int(ids.min()) >= 0


def test_tokenizer_ids_follow_sorted_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw"
    assert tok.encode("low").tolist() == [4, 5, 7]


def test_encode_names_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"text has 2 characters outside the model's vocabulary, e\.g\. 'xz'"):
        tok.encode("abzxa")


def test_tokenizer_rejects_repeated_or_no_characters():
    with pytest.raises(ValueError, match="no repeated characters"):
        CharTokenizer("aba")
    with pytest.raises(ValueError, match="at least one character"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="empty text"):
        CharTokenizer.from_text("")


# ---------------------------------------------------------------- split


def test_split_holds_out_every_tenth_of_fifty_chunks():
    tokens = torch.arange(1000)
    train, heldout = split_tokens(tokens)
    expected = torch.cat([torch.arange(s, s + 20) for s in (180, 380, 580, 780, 980)])
    assert torch.equal(heldout, expected)
    assert train.numel() == 900 and heldout.numel() == 100
    assert not set(train.tolist()) & set(heldout.tolist())
    assert sorted(train.tolist() + heldout.tolist()) == list(range(1000))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(min_value=50, max_value=5000))
def test_split_is_about_ten_percent_disjoint_and_deterministic(n):
    tokens = torch.arange(n)
    train, heldout = split_tokens(tokens)
    again_train, again_heldout = split_tokens(tokens.clone())
    assert torch.equal(train, again_train) and torch.equal(heldout, again_heldout)
    assert train.numel() + heldout.numel() == n
    assert not set(train.tolist()) & set(heldout.tolist())
    assert abs(heldout.numel() - n / 10) <= 5  # five held-out chunks, each within one token of n / 50
    assert int(heldout.max()) >= n - n // 50 - 1  # the last chunk is held out: spread to the end


def test_corpus_from_text_splits_the_same_way_every_call():
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(2000))
    first = Corpus.from_text(text, name="letters")
    second = Corpus.from_text(text, name="letters")
    assert torch.equal(first.train, second.train) and torch.equal(first.heldout, second.heldout)
    assert first.heldout.numel() == 200 and first.train.numel() == 1800
    assert first.tokenizer.decode(first.heldout[:40]) == text[360:400]
    assert first.vocab_size == 26 and first.name == "letters"


def test_corpus_from_text_uses_a_given_tokenizer():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
    corpus = Corpus.from_text("abc " * 100, name="abc", tokenizer=tok)
    assert corpus.vocab_size == 27 and corpus.tokenizer is tok
    assert set(corpus.train.tolist()) == {0, 1, 2, 26}


# ---------------------------------------------------------------- from_tokens


def test_from_tokens_accepts_ids_below_the_vocabulary():
    tokens = torch.arange(500, dtype=torch.int32) % 7
    corpus = Corpus.from_tokens(tokens, vocab_size=7)
    assert corpus.train.dtype == torch.int64
    assert corpus.train.numel() == 450 and corpus.heldout.numel() == 50
    assert corpus.tokenizer is None and corpus.vocab_size == 7


@pytest.mark.parametrize("tokens, range_text", [(torch.tensor([0, 1, 7, 2]), r"\[0, 7\]"),
                                                (torch.tensor([3, -1, 2]), r"\[-1, 3\]")])
def test_from_tokens_rejects_ids_outside_the_vocabulary(tokens, range_text):
    with pytest.raises(ValueError, match=rf"token ids range over {range_text} but the model's vocabulary has 7 ids"):
        Corpus.from_tokens(tokens, vocab_size=7)


@pytest.mark.parametrize("tokens", [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([True, False]),
                                    torch.zeros(2, 3, dtype=torch.long)])
def test_from_tokens_rejects_non_integer_or_non_vector_tensors(tokens):
    with pytest.raises(ValueError, match="token ids must be a 1-D integer tensor"):
        Corpus.from_tokens(tokens, vocab_size=7)


# ---------------------------------------------------------------- check_context


def test_check_context_names_the_short_split():
    corpus = Corpus.from_text("abcdefghij" * 20, name="tiny")  # 180 training, 20 held-out tokens
    corpus.check_context(16)  # both splits hold a 17-token window
    with pytest.raises(ValueError, match=r"corpus 'tiny' has 20 tokens in its held-out split, fewer than one "
                                         r"context of 32 \+ 1"):
        corpus.check_context(32)
    with pytest.raises(ValueError, match="has 180 tokens in its training split"):
        corpus.check_context(500)


# ---------------------------------------------------------------- load_text


def test_load_text_reads_utf8_and_gzip(tmp_path):
    plain = tmp_path / "t.txt"
    plain.write_text("Ophelia — ä\n", encoding="utf-8")
    packed = tmp_path / "t.txt.gz"
    packed.write_bytes(gzip.compress("Ophelia — ä\n".encode()))
    assert load_text(plain) == "Ophelia — ä\n"
    assert load_text(str(packed)) == "Ophelia — ä\n"


def test_load_text_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(tmp_path / "nothing.txt")
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path)  # a folder is not a text file


def test_load_text_empty_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_text(empty)
    empty_gz = tmp_path / "empty.txt.gz"
    empty_gz.write_bytes(gzip.compress(b""))
    with pytest.raises(ValueError, match="is empty"):
        load_text(empty_gz)


def test_load_text_non_utf8_names_the_byte(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"is not UTF-8 text \(invalid continuation byte at byte 3\)"):
        load_text(latin)


# ---------------------------------------------------------------- bundled corpus


def test_bundled_text_starts_with_hamlet_and_has_73_characters(bundled_text):
    assert bundled_text.startswith("HAMLET")
    assert len(set(bundled_text)) == 73
    assert len(bundled_text) > 1_000_000


def test_bundled_corpus_uses_its_own_tokenizer_and_splits_ten_percent(bundled_text):
    corpus = Corpus.bundled()
    assert corpus.name == BUNDLED_NAME and corpus.vocab_size == 73
    assert corpus.tokenizer.decode(corpus.train[:6]) == "HAMLET"
    total = corpus.train.numel() + corpus.heldout.numel()
    assert total == len(bundled_text)
    assert corpus.heldout.numel() == pytest.approx(total / 10, abs=5)


# ---------------------------------------------------------------- windows and generators


def test_random_windows_are_contiguous_and_seeded():
    tokens = torch.arange(100)
    a = random_windows(tokens, 6, 8, seeded_generator(0, 5))
    b = random_windows(tokens, 6, 8, seeded_generator(0, 5))
    c = random_windows(tokens, 6, 8, seeded_generator(0, 6))
    assert a.shape == (6, 9)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a - a[:, :1], torch.arange(9).expand(6, 9))
    assert int(a.max()) <= 99


def test_spread_windows_cover_the_tokens_from_start_to_end():
    tokens = torch.arange(100)
    windows = spread_windows(tokens, 5, 9)
    assert windows.shape == (5, 10)
    assert windows[0, 0] == 0 and windows[-1, -1] == 99
    assert torch.equal(windows[:, 0], torch.tensor([0, 22, 45, 68, 90]))


def test_seeded_generator_depends_on_every_key_and_their_order():
    draws = {keys: torch.rand(3, generator=seeded_generator(*keys)) for keys in [(0, 1), (1, 0), (0, 2), (1, 1)]}
    assert torch.equal(draws[(0, 1)], torch.rand(3, generator=seeded_generator(0, 1)))
    values = list(draws.values())
    assert all(not torch.equal(values[i], values[j]) for i in range(4) for j in range(i + 1, 4))
