"""Text -> word tokens -> ids, the same way on the server and on every device.

The tokenizer is deliberately tiny (lower-case, one regular expression) so a device can
reproduce it exactly without any dependency; the vocabulary travels inside the training
bundle as the JSON of `Vocabulary.to_json()` (format `fedboard-vocab/1`), so the ids a device
computes always match the model it trains. numpy-free and TensorFlow-free on purpose.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

PAD = 0
OOV = 1
BOS = 2
EOS = 3
SPECIALS: tuple[str, ...] = ("<pad>", "<oov>", "<bos>", "<eos>")
"""The special words; `SPECIALS[i]` is the word of special id i."""

VOCAB_FORMAT = "fedboard-vocab/1"

_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case `text` and return its words (`[a-z]+(?:'[a-z]+)?`); punctuation and digits go."""
    return _TOKEN.findall(text.lower())


def is_token(word: str) -> bool:
    """True when `word` is something `tokenize` can produce."""
    return _TOKEN.fullmatch(word) is not None


@dataclass(frozen=True)
class Vocabulary:
    """An ordered word list: a word's id is its index. Ids 0-3 are `SPECIALS`."""

    words: tuple[str, ...]
    _ids: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        words = self.words
        if not isinstance(words, tuple):
            words = tuple(words)
            object.__setattr__(self, "words", words)
        problem = _check_words(words)
        if problem:
            raise ValueError(f"invalid vocabulary: {problem}")
        object.__setattr__(self, "_ids", {w: i for i, w in enumerate(words)})

    @property
    def size(self) -> int:
        """Number of ids, specials included (5,004 for the benchmark)."""
        return len(self.words)

    def __len__(self) -> int:
        return len(self.words)

    def id_of(self, word: str) -> int:
        """The id of `word`, `OOV` when it is not in the vocabulary."""
        return self._ids.get(word, OOV)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of `tokens`; unknown words become `OOV`."""
        get = self._ids.get
        return [get(t, OOV) for t in tokens]

    def encode_block(self, text: str) -> list[int]:
        """One block of text as one sequence: `[BOS] + ids + [EOS]`."""
        return [BOS, *self.encode(tokenize(text)), EOS]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The words of `ids` (specials come back as `<pad>`, `<oov>`, ...)."""
        words = self.words
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(words):
                raise ValueError(f"id {i} is outside the vocabulary (size {len(words)})")
            out.append(words[i])
        return out

    def to_json(self) -> dict[str, Any]:
        """The shared `fedboard-vocab/1` dict; the bundle carries it verbatim."""
        return {"format": VOCAB_FORMAT, "words": list(self.words)}

    @classmethod
    def from_json(cls, d: Any) -> "Vocabulary":
        """Parse `to_json()` output; anything else raises a ValueError saying what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"vocabulary JSON must be an object, got {type(d).__name__}")
        extra = sorted(set(d) - {"format", "words"})
        if extra:
            raise ValueError(f"vocabulary JSON has unknown keys {extra}; expected only 'format' and 'words'")
        if d.get("format") != VOCAB_FORMAT:
            raise ValueError(f"vocabulary JSON format is {d.get('format')!r}, expected {VOCAB_FORMAT!r}")
        words = d.get("words")
        if not isinstance(words, list):
            raise ValueError(f"vocabulary JSON 'words' must be a list, got {type(words).__name__}")
        return cls(tuple(words))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON to `path` (via a temporary file, so a reader never sees half of it)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Vocabulary":
        """Read a file written by `save`."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_json(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _check_words(words: Sequence[Any]) -> str | None:
    """Why `words` is not a valid vocabulary, or None when it is."""
    if tuple(words[: len(SPECIALS)]) != SPECIALS:
        return f"the first {len(SPECIALS)} words must be {list(SPECIALS)}, got {list(words[:len(SPECIALS)])}"
    seen: set[str] = set()
    for i, w in enumerate(words):
        if not isinstance(w, str):
            return f"word {i} is {type(w).__name__} {w!r}, not a string"
        if i >= len(SPECIALS) and not is_token(w):
            return f"word {i} {w!r} is not a token the tokenizer can produce"
        if w in seen:
            return f"word {i} {w!r} appears twice"
        seen.add(w)
    return None


def build_vocabulary(texts: Iterable[str], size: int = 5000) -> Vocabulary:
    """The `size` most frequent words of `texts` (ties alphabetical) after the specials.

    Fewer than `size` when the texts have fewer distinct words.
    """
    if size < 1:
        raise ValueError(f"vocabulary size must be at least 1 word, got {size}")
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(tokenize(text))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
    return Vocabulary(SPECIALS + tuple(w for w, _ in ranked))
