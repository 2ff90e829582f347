import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.tokenizer import (
    BOS, EOS, OOV, PAD, SPECIALS, VOCAB_FORMAT, Vocabulary, build_vocabulary, is_token, tokenize,
)


def test_special_ids_match_the_contract():
    assert (PAD, OOV, BOS, EOS) == (0, 1, 2, 3)
    assert SPECIALS == ("<pad>", "<oov>", "<bos>", "<eos>")


@pytest.mark.parametrize("text, tokens", [
    ("Hello, World!", ["hello", "world"]),
    ("It's 5 o'clock... DON'T panic", ["it's", "o'clock", "don't", "panic"]),
    ("rock'n'roll", ["rock'n", "roll"]),
    ("'tis the dogs' bone", ["tis", "the", "dogs", "bone"]),
    ("x2y  café\tnaïve", ["x", "y", "caf", "na", "ve"]),
    ("", []),
    ("123 !!! ...", []),
])
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


def test_is_token():
    assert is_token("don't") and is_token("a")
    assert not is_token("Hello") and not is_token("two words") and not is_token("") and not is_token("<pad>")


def test_build_vocabulary_orders_by_count_then_alphabet():
    vocab = build_vocabulary(["b a c", "a b d", "a e"], size=3)
    # a:3, b:2, then c, d, e tie at 1 -> alphabetical, and size cuts after c
    assert vocab.words == SPECIALS + ("a", "b", "c")
    assert vocab.size == 7 == len(vocab)


def test_build_vocabulary_with_fewer_distinct_words_than_size():
    vocab = build_vocabulary(["One two. ONE"], size=5000)
    assert vocab.words == SPECIALS + ("one", "two")


def test_build_vocabulary_rejects_a_non_positive_size():
    with pytest.raises(ValueError, match="at least 1"):
        build_vocabulary(["a"], size=0)


def test_encode_decode_and_blocks():
    vocab = build_vocabulary(["the cat sat", "the dog"])
    the, cat = vocab.id_of("the"), vocab.id_of("cat")
    assert the == 4  # the most frequent word comes right after the specials
    assert vocab.id_of("zebra") == OOV
    assert vocab.encode(["the", "zebra", "cat"]) == [the, OOV, cat]
    assert vocab.encode_block("The zebra, the CAT!") == [BOS, the, OOV, the, cat, EOS]
    assert vocab.encode_block("") == [BOS, EOS]
    assert vocab.decode([BOS, the, OOV, cat, EOS, PAD]) == ["<bos>", "the", "<oov>", "cat", "<eos>", "<pad>"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([vocab.size])


def test_json_round_trip_and_file_round_trip(tmp_path):
    vocab = build_vocabulary(["to be or not to be that is the question"])
    d = vocab.to_json()
    assert d == {"format": VOCAB_FORMAT, "words": list(vocab.words)}
    assert Vocabulary.from_json(json.loads(json.dumps(d))) == vocab
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert Vocabulary.load(path) == vocab
    assert not (tmp_path / "vocab.json.tmp").exists()


GOOD = ["<pad>", "<oov>", "<bos>", "<eos>", "the", "cat"]


@pytest.mark.parametrize("bad, message", [
    (["not", "a", "dict"], "must be an object"),
    ({"words": GOOD}, "format"),
    ({"format": "fedboard-vocab/2", "words": GOOD}, "format"),
    ({"format": VOCAB_FORMAT, "words": GOOD, "extra": 1}, "unknown keys"),
    ({"format": VOCAB_FORMAT}, "'words' must be a list"),
    ({"format": VOCAB_FORMAT, "words": "the cat"}, "'words' must be a list"),
    ({"format": VOCAB_FORMAT, "words": ["<oov>", "<pad>", "<bos>", "<eos>", "the"]}, "first 4 words"),
    ({"format": VOCAB_FORMAT, "words": GOOD[:3]}, "first 4 words"),
    ({"format": VOCAB_FORMAT, "words": GOOD + ["the"]}, "appears twice"),
    ({"format": VOCAB_FORMAT, "words": GOOD + [7]}, "not a string"),
    ({"format": VOCAB_FORMAT, "words": GOOD + ["Dog"]}, "not a token"),
    ({"format": VOCAB_FORMAT, "words": GOOD + ["two words"]}, "not a token"),
    ({"format": VOCAB_FORMAT, "words": GOOD + [""]}, "not a token"),
    ({"format": VOCAB_FORMAT, "words": GOOD + ["<pad>"]}, "not a token"),
])
def test_from_json_rejects_bad_input_with_a_clear_message(bad, message):
    with pytest.raises(ValueError, match=message):
        Vocabulary.from_json(bad)


def test_load_names_the_file_on_bad_content(tmp_path):
    path = tmp_path / "v.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="v.json: not valid JSON"):
        Vocabulary.load(path)
    path.write_text(json.dumps({"format": VOCAB_FORMAT, "words": ["x"]}))
    with pytest.raises(ValueError, match="v.json: invalid vocabulary"):
        Vocabulary.load(path)


def test_vocabulary_is_hashable_and_compares_by_words():
    a = Vocabulary(tuple(GOOD))
    b = Vocabulary(list(GOOD))  # a list is accepted and stored as a tuple
    assert a == b and hash(a) == hash(b) and isinstance(b.words, tuple)


words = st.from_regex(r"[a-z]{1,6}(?:'[a-z]{1,2})?", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(words, min_size=1, max_size=30))
def test_known_tokens_survive_encode_decode(tokens):
    vocab = build_vocabulary([" ".join(tokens)])
    ids = vocab.encode(tokens)
    assert OOV not in ids
    assert vocab.decode(ids) == tokens
    assert vocab.encode_block(" ".join(tokens)) == [BOS, *ids, EOS]
