import json
from pathlib import Path

import pytest

from models.corpus import (
    Corpus, CorpusError, guess_format, read_corpus, read_dir, read_jsonl, read_speakers, read_tsv,
)
from models.tokenizer import tokenize

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ speakers
def test_read_speakers_groups_blocks_by_speaker_in_file_order(tmp_path):
    path = write(tmp_path / "play.txt",
                 "First Citizen:\nBefore we proceed,\nhear me speak.\n\n"
                 "All:\nSpeak, speak.\n\n"
                 "First Citizen:\nYou are all resolved?\n")
    corpus = read_speakers(path)
    assert corpus == Corpus("play", {
        "First Citizen": ["Before we proceed,\nhear me speak.", "You are all resolved?"],
        "All": ["Speak, speak."],
    })
    assert corpus.n_users == 2 and corpus.n_blocks == 3


def test_read_speakers_tolerates_crlf_extra_blank_lines_and_no_final_newline(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\r\n\r\nA:\r\nhi there\r\n\r\n\r\n  \r\nB:\r\nbye")
    assert read_speakers(path).users == {"A": ["hi there"], "B": ["bye"]}


def test_read_speakers_names_file_and_line_of_a_block_without_speaker(tmp_path):
    path = write(tmp_path / "bad.txt", "A:\nhello\n\nthis line has no speaker\nmore\n")
    with pytest.raises(CorpusError, match=r"bad\.txt line 4: a block must start with a line 'SPEAKER NAME:'") as e:
        read_speakers(path)
    assert e.value.line == 4 and e.value.path.endswith("bad.txt")


def test_read_speakers_rejects_an_empty_speaker_name(tmp_path):
    path = write(tmp_path / "bad.txt", "A:\nhello\n\n :\nnobody\n")
    with pytest.raises(CorpusError, match="line 4"):
        read_speakers(path)


@pytest.mark.parametrize("reader", [read_speakers, read_tsv, read_jsonl])
def test_empty_file_is_an_error(tmp_path, reader):
    path = write(tmp_path / "empty.txt", "\n\n  \n")
    with pytest.raises(CorpusError, match=r"empty\.txt: no blocks found"):
        reader(path)


@pytest.mark.parametrize("reader", [read_speakers, read_tsv, read_jsonl])
def test_missing_file_is_an_error(tmp_path, reader):
    with pytest.raises(CorpusError, match=r"nope\.txt: file not found"):
        reader(tmp_path / "nope.txt")


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes(b"u1\tfine\nu2\tcaf\xe9\n")
    with pytest.raises(CorpusError, match=r"latin1\.tsv line 2: not valid UTF-8"):
        read_tsv(path)


# ------------------------------------------------------------------ tsv
def test_read_tsv_one_line_one_block(tmp_path):
    path = write(tmp_path / "chat.tsv", "alice\thi bob\nbob\they\n\nalice\tsee you\tlater\n")
    corpus = read_tsv(path)
    assert corpus.name == "chat"
    assert corpus.users == {"alice": ["hi bob", "see you\tlater"], "bob": ["hey"]}


def test_read_tsv_skips_a_utf8_bom(tmp_path):
    path = tmp_path / "bom.tsv"
    path.write_bytes("u\tcafé\r\n".encode("utf-8-sig"))
    assert read_tsv(path).users == {"u": ["café"]}


@pytest.mark.parametrize("content, line, problem", [
    ("a\tx\nno tab here\n", 2, "no tab"),
    ("a\tx\n\n\tmissing user\n", 3, "empty user"),
])
def test_read_tsv_bad_lines(tmp_path, content, line, problem):
    path = write(tmp_path / "bad.tsv", content)
    with pytest.raises(CorpusError, match=rf"bad\.tsv line {line}: {problem}"):
        read_tsv(path)


# ------------------------------------------------------------------ jsonl
def test_read_jsonl(tmp_path):
    lines = [{"user": "a", "text": "one"}, {"user": 7, "text": "two", "ts": 1}, {"user": "a", "text": ""}]
    path = write(tmp_path / "m.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert read_jsonl(path).users == {"a": ["one", ""], "7": ["two"]}


@pytest.mark.parametrize("bad, problem", [
    ('{"user": "a", "text": "x"', "not valid JSON"),
    ('["a", "x"]', "expected an object"),
    ('{"text": "x"}', "no 'user' key"),
    ('{"user": "a"}', "no 'text' key"),
    ('{"user": "", "text": "x"}', "'user' must be a non-empty string"),
    ('{"user": null, "text": "x"}', "'user' must be a non-empty string"),
    ('{"user": true, "text": "x"}', "'user' must be a non-empty string"),
    ('{"user": "a", "text": 3}', "'text' must be a string"),
])
def test_read_jsonl_bad_lines(tmp_path, bad, problem):
    path = write(tmp_path / "bad.jsonl", '{"user": "ok", "text": "fine"}\n' + bad + "\n")
    with pytest.raises(CorpusError, match=rf"bad\.jsonl line 2: {problem}"):
        read_jsonl(path)


# ------------------------------------------------------------------ dir
def test_read_dir_one_file_per_user(tmp_path):
    d = tmp_path / "users"
    d.mkdir()
    write(d / "bob.txt", "first message\nstill first\n\nsecond\n")
    write(d / "alice.txt", "only one")
    write(d / "empty.txt", "\n\n")
    write(d / "notes.md", "ignored")
    corpus = read_dir(d)
    assert corpus.name == "users"
    assert list(corpus.users) == ["alice", "bob"]
    assert corpus.users == {"alice": ["only one"], "bob": ["first message\nstill first", "second"]}


def test_read_dir_errors(tmp_path):
    with pytest.raises(CorpusError, match="directory not found"):
        read_dir(tmp_path / "missing")
    with pytest.raises(CorpusError, match=r"no \.txt files"):
        read_dir(tmp_path)
    write(tmp_path / "a.txt", "\n")
    with pytest.raises(CorpusError, match="no blocks found"):
        read_dir(tmp_path)
    with pytest.raises(CorpusError, match="not a directory"):
        read_dir(tmp_path / "a.txt")


# ------------------------------------------------------------------ read_corpus
def test_read_corpus_guesses_the_format(tmp_path):
    write(tmp_path / "s.txt", "A:\nhi\n")
    write(tmp_path / "t.tsv", "a\thi\n")
    write(tmp_path / "j.jsonl", '{"user": "a", "text": "hi"}\n')
    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "a.txt", "hi\n")
    assert [guess_format(tmp_path / n) for n in ("s.txt", "t.tsv", "j.jsonl", "d")] == ["speakers", "tsv", "jsonl", "dir"]
    for name in ("s.txt", "t.tsv", "j.jsonl", "d"):
        corpus = read_corpus(tmp_path / name)
        assert list(corpus.users.values()) in ([["hi"]],)
    # an explicit format wins over the extension
    write(tmp_path / "chat.log", "a\thi\n")
    assert read_corpus(str(tmp_path / "chat.log"), "tsv").users == {"a": ["hi"]}


def test_read_corpus_errors(tmp_path):
    write(tmp_path / "chat.log", "a\thi\n")
    with pytest.raises(CorpusError, match="cannot tell the corpus format"):
        read_corpus(tmp_path / "chat.log")
    with pytest.raises(CorpusError, match="file not found"):
        read_corpus(tmp_path / "missing.csv")
    with pytest.raises(CorpusError, match="unknown corpus format 'csv'"):
        read_corpus(tmp_path / "chat.log", "csv")
    with pytest.raises(CorpusError, match="takes no path"):
        read_corpus(tmp_path / "chat.log", "builtin")


def test_read_corpus_none_is_the_builtin_synthetic_corpus():
    corpus = read_corpus(None, seed=1)
    assert corpus.name.startswith("synthetic-keyboard")
    assert corpus.n_users == 300
    assert read_corpus(None, "builtin", seed=1) == corpus
    assert read_corpus(None, seed=2) != corpus


def test_corpus_error_is_a_value_error_with_structured_fields():
    e = CorpusError("something broke", path="x.tsv", line=3)
    assert isinstance(e, ValueError)
    assert str(e) == "x.tsv line 3: something broke"
    assert (e.path, e.line, e.problem) == ("x.tsv", 3, "something broke")
    assert str(CorpusError("plain")) == "plain"


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"benchmark data {SHAKESPEARE} is not on this machine")
def test_tinyshakespeare_speakers():
    corpus = read_corpus(SHAKESPEARE)
    assert corpus.name == "tinyshakespeare"
    assert corpus.n_users == 309
    assert corpus.n_blocks == 7222
    words = {u: sum(len(tokenize(b)) for b in blocks) for u, blocks in corpus.users.items()}
    assert sum(n >= 500 for n in words.values()) == 86
    assert corpus.users["First Citizen"][0] == "Before we proceed any further, hear me speak."
