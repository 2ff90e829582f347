"""What encryption at rest costs the text store: adding rows, and reading a device's training windows.

For a store of --rows texts from the built-in synthetic keyboard corpus (the default is the
client's [store] max_rows), measures, plain and sealed (AES-GCM per row, edge_client/sealing.py)
in the same run, alternating so that load from other processes hits both alike:
- rows/s added one at a time (`add`: one transaction each, as a keyboard appends),
- rows/s added in batches of 100 (`add_many`: an import),
- seconds to read every text back (`texts()`, retention included),
- seconds to get the training windows the client trains on (`StoreWindows.training_windows()`
  on a fresh cache: read, decrypt, tokenize, cut), and again with nothing changed (a check-in's
  cache hit),
and the sealed/plain ratio of each. The best of --repeats runs (the least disturbed by other
load: the fastest rate, the shortest time), medians in the JSON too. Prints a table and writes JSON.

    python bench/textstore_crypto.py [--rows 50000] [--repeats 5] [--out textstore_crypto.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_client.sealing import Keyring, StoreKey  # noqa: E402
from edge_client.text_windows import StoreWindows  # noqa: E402
from edge_client.textstore import TextStore  # noqa: E402
from models.tokenizer import build_vocabulary  # noqa: E402

SINGLE_ADDS = 2000
BATCH = 100


def corpus(n: int) -> list[str]:
    from models.synthetic import synthetic_corpus

    texts: list[str] = []
    for blocks in synthetic_corpus(seed=0).users.values():
        texts.extend(blocks)
        if len(texts) >= n:
            break
    while len(texts) < n:
        texts.extend(texts[: n - len(texts)])
    return texts[:n]


def one_run(directory: Path, texts: list[str], vocab, seq_len: int, keyring: Keyring | None) -> dict:
    path = directory / f"texts-{'sealed' if keyring else 'plain'}-{time.monotonic_ns()}.db"
    with TextStore(path, max_rows=None, max_age_days=90, keyring=keyring) as store:
        singles = texts[:SINGLE_ADDS]
        start = time.perf_counter()
        for text in singles:
            store.add(text)
        single_rows_s = len(singles) / (time.perf_counter() - start)
        rest = texts[SINGLE_ADDS:]
        start = time.perf_counter()
        for i in range(0, len(rest), BATCH):
            store.add_many(rest[i:i + BATCH])
        batch_rows_s = len(rest) / max(time.perf_counter() - start, 1e-9)
        start = time.perf_counter()
        read = store.texts()
        read_s = time.perf_counter() - start
        assert len(read) == len(texts)
        windows = StoreWindows(store, vocab, seq_len)
        start = time.perf_counter()
        x, _ = windows.training_windows()
        windows_s = time.perf_counter() - start
        start = time.perf_counter()
        windows.training_windows()  # the next check-in, nothing changed: a cache hit
        cached_s = time.perf_counter() - start
    size = path.stat().st_size
    for leftover in directory.glob(path.name + "*"):
        leftover.unlink()
    return {"add_rows_per_s": single_rows_s, "add_many_rows_per_s": batch_rows_s, "read_texts_s": read_s,
            "training_windows_s": windows_s, "checkin_cached_s": cached_s, "windows": int(len(x)),
            "file_bytes": size}


def run(rows: int, repeats: int, seq_len: int = 20) -> dict:
    texts = corpus(rows)
    vocab = build_vocabulary(texts, size=10_000)
    keyring = Keyring(StoreKey.generate())
    runs: dict[str, list[dict]] = {"plain": [], "sealed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for name, ring in (("plain", None), ("sealed", keyring)):
                runs[name].append(one_run(Path(tmp), texts, vocab, seq_len, ring))
    medians = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for name, results in runs.items()}
    best = {name: {key: (max if key.endswith("per_s") else min)(r[key] for r in results) for key in results[0]}
            for name, results in runs.items()}
    ratios = {key: best["sealed"][key] / best["plain"][key]
              for key in ("add_rows_per_s", "add_many_rows_per_s", "read_texts_s", "training_windows_s", "checkin_cached_s",
                          "file_bytes")}
    return {"rows": rows, "repeats": repeats, "single_adds": SINGLE_ADDS, "batch": BATCH, "seq_len": seq_len,
            "machine": platform.machine(), "python": platform.python_version(), "best": best, "median": medians,
            "sealed_over_plain": ratios, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.rows <= SINGLE_ADDS:
        parser.error(f"--rows must be more than {SINGLE_ADDS}")
    report = run(args.rows, args.repeats)
    m, r = report["best"], report["sealed_over_plain"]
    print(f"{args.rows} texts, best of {args.repeats} ({report['machine']}, Python {report['python']})")
    print(f"{'':24}{'plain':>12}{'sealed':>12}{'ratio':>8}")
    for key, label in (("add_rows_per_s", "add (rows/s)"), ("add_many_rows_per_s", "add_many (rows/s)"),
                       ("read_texts_s", "texts() (s)"), ("training_windows_s", "training windows (s)"),
                       ("checkin_cached_s", "unchanged, cached (s)"),
                       ("file_bytes", "file (bytes)")):
        print(f"{label:24}{m['plain'][key]:>12.4g}{m['sealed'][key]:>12.4g}{r[key]:>8.2f}")
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
