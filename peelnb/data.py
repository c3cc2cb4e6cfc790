"""The bundled corpus, a character tokenizer, deterministic splits and batches."""

from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

BUNDLED_CORPUS = "shakespeare_tragedies.txt.gz"
BUNDLED_NAME = "Shakespeare tragedies (Project Gutenberg, public domain)"
SPLIT_CHUNKS = 50
HELDOUT_EVERY = 10


def load_text(path: str | Path | None = None) -> str:
    """Read a text corpus; ``None`` reads the bundled Shakespeare tragedies.

    Parameters
    ----------
    path : str, Path or None
        A UTF-8 text file (``.gz`` is decompressed), or None for the corpus
        bundled with peelnb.

    Returns
    -------
    str
        The text.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is empty or not UTF-8 text.

    Examples
    --------
    >>> load_text()[:6]
    'HAMLET'
    """
    if path is None:
        resource = importlib.resources.files("peelnb") / "data" / BUNDLED_CORPUS
        with resource.open("rb") as fh:
            return gzip.decompress(fh.read()).decode("utf-8")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text:
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


@dataclass(frozen=True)
class CharTokenizer:
    """Character-level tokenizer: token id ``i`` is ``chars[i]``.

    Examples
    --------
    >>> tok = CharTokenizer.from_text("abca")
    >>> tok.encode("cab").tolist(), tok.decode([0, 1])
    ([2, 0, 1], 'ab')
    """

    chars: str

    def __post_init__(self) -> None:
        if not self.chars or len(set(self.chars)) != len(self.chars):
            raise ValueError("a tokenizer needs at least one character and no repeated characters")

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The sorted set of characters of ``text``."""
        if not text:
            raise ValueError("cannot build a tokenizer from empty text")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """Token ids of ``text`` as a 1-D int64 tensor.

        Raises
        ------
        ValueError
            If ``text`` holds characters outside the vocabulary.
        """
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - index.keys())
        if unknown:
            shown = "".join(unknown[:20])
            raise ValueError(
                f"text has {len(unknown)} characters outside the model's vocabulary, e.g. {shown!r}; "
                "use text written in the model's characters, or train a model on this text"
            )
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor | list[int]) -> str:
        """Text of a sequence of token ids."""
        return "".join(self.chars[int(i)] for i in ids)


def split_tokens(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Deterministic training / held-out split.

    The token stream is cut into 50 equal contiguous chunks; every tenth chunk
    is held out (10%, spread over the whole corpus), the rest is training data.
    """
    chunks = torch.tensor_split(tokens, SPLIT_CHUNKS)
    heldout = [c for i, c in enumerate(chunks) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train = [c for i, c in enumerate(chunks) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    return torch.cat(train), torch.cat(heldout)


@dataclass(frozen=True)
class Corpus:
    """Token ids of a corpus, split into training and held-out parts.

    Attributes
    ----------
    name : str
        Description stored with runs and results.
    train, heldout : Tensor
        1-D int64 token ids; calibration comes from ``train``, evaluation
        from ``heldout``; the two never share tokens.
    vocab_size : int
        Size of the id space the tokens live in.
    tokenizer : CharTokenizer or None
        The tokenizer, when the corpus came from text.
    """

    name: str
    train: Tensor
    heldout: Tensor
    vocab_size: int
    tokenizer: CharTokenizer | None = None

    @classmethod
    def from_text(cls, text: str, *, name: str, tokenizer: CharTokenizer | None = None) -> Corpus:
        """Tokenize ``text`` (building a tokenizer if none is given) and split it."""
        tokenizer = tokenizer or CharTokenizer.from_text(text)
        train, heldout = split_tokens(tokenizer.encode(text))
        return cls(name, train, heldout, tokenizer.vocab_size, tokenizer)

    @classmethod
    def from_tokens(cls, tokens: Tensor, *, vocab_size: int, name: str = "token ids") -> Corpus:
        """Split a 1-D tensor of token ids; every id must be below ``vocab_size``."""
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"token ids must be a 1-D integer tensor, "
                             f"got {tokens.dtype} of shape {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise ValueError(
                f"token ids range over [{int(tokens.min())}, {int(tokens.max())}] but the model's vocabulary "
                f"has {vocab_size} ids: encode the data with the model's tokenizer"
            )
        train, heldout = split_tokens(tokens.long())
        return cls(name, train, heldout, vocab_size)

    @classmethod
    def bundled(cls) -> Corpus:
        """The bundled Shakespeare tragedies with their own character tokenizer."""
        return cls.from_text(load_text(), name=BUNDLED_NAME)

    def check_context(self, n_ctx: int) -> None:
        """Raise a clear error unless both splits hold at least one context."""
        for split, tokens in (("training", self.train), ("held-out", self.heldout)):
            if tokens.numel() < n_ctx + 1:
                raise ValueError(
                    f"corpus {self.name!r} has {tokens.numel()} tokens in its {split} split, fewer than one "
                    f"context of {n_ctx} + 1: use a longer text (at least about {10 * (n_ctx + 1)} tokens)"
                )


def random_windows(tokens: Tensor, n: int, n_ctx: int, generator: torch.Generator) -> Tensor:
    """``n`` windows of ``n_ctx + 1`` tokens at random starts, ``(n, n_ctx + 1)``."""
    starts = torch.randint(0, tokens.numel() - n_ctx, (n,), generator=generator)
    return tokens[starts[:, None] + torch.arange(n_ctx + 1)]


def spread_windows(tokens: Tensor, n: int, n_ctx: int) -> Tensor:
    """``n`` windows of ``n_ctx + 1`` tokens spread evenly over ``tokens``, ``(n, n_ctx + 1)``."""
    starts = torch.linspace(0, tokens.numel() - n_ctx - 1, n).round().long()
    return tokens[starts[:, None] + torch.arange(n_ctx + 1)]


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (seed, step, layer, ...)."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)
