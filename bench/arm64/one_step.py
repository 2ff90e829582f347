"""One training step and one codec round trip, for comparing two machines (x86 host vs emulated arm64).

    python bench/arm64/one_step.py BUNDLE OUT_DIR [--steps N]

Loads BUNDLE with the device's runtime (ai-edge-litert, no TensorFlow), trains N steps (default 1)
from the bundle's initial weights on a batch drawn from a fixed seed (PCG64: the same ids on every
machine), and writes the weights after step 1 and step N (OUT_DIR/weights-NNN.npy), the losses, and
a fixed update vector encoded with several codecs (seeded stochastic rounding included) and decoded
again (OUT_DIR/update.<spec>.bin, decoded.<spec>.npy). Then compare with

    python bench/arm64/one_step.py --compare DIR_A DIR_B

which prints the max abs weight differences and whether the encoded bytes and decoded floats are
bit-identical across the two machines.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

CODECS = ("f32", "q8", "q4|zstd", "ef|topk:0.05|q8|zstd", "sign")


def fixed_update(n: int) -> np.ndarray:
    """The same float32 vector on every machine (integer-derived uniforms; no libm involved)."""
    u = np.random.Generator(np.random.PCG64(99)).random(n)
    return ((u - 0.5) * 0.02).astype(np.float32)


def codec_file(spec: str) -> str:
    return spec.replace("|", "+").replace(":", "_").replace(",", "_")


def run(bundle_path: Path, out: Path, steps: int) -> None:
    from models.bundle import read_bundle
    from models.runtime import LiteRTModel
    from protocol.codec import parse_codec

    bundle = read_bundle(bundle_path)
    cfg = bundle.config
    rng = np.random.Generator(np.random.PCG64(1234))
    ids = rng.integers(4, cfg.vocab_size, size=(cfg.batch_size, cfg.seq_len + 1)).astype(np.int32)
    model = LiteRTModel(bundle)
    out.mkdir(parents=True, exist_ok=True)
    losses = []
    for step in range(1, steps + 1):
        losses.append(model.train_step(ids[:, :-1], ids[:, 1:], lr=0.5, clip=5.0))
        if step in (1, steps):
            weights = model.get_weights()
            np.save(out / f"weights-{step:03d}.npy", weights)
    (out / "loss.txt").write_text(" ".join(repr(x) for x in losses) + "\n")
    delta = fixed_update(weights.size)
    for spec in CODECS:
        codec = parse_codec(spec)
        payload = codec.encode(delta, rng=np.random.default_rng(0)).payload
        decoded = np.zeros(delta.size, np.float32)
        codec.decode_accumulate(payload, decoded, 1.0)
        (out / f"update.{codec_file(spec)}.bin").write_bytes(payload)
        np.save(out / f"decoded.{codec_file(spec)}.npy", decoded)
    print(f"{steps} step(s), loss {losses[0]:.6f}, {weights.size} weights -> {out}")


def compare(a: Path, b: Path) -> int:
    for wa in sorted(a.glob("weights-*.npy")):
        x, y = np.load(wa), np.load(b / wa.name)
        print(f"training {int(wa.stem.split('-')[1])} step(s): max abs weight difference {float(np.max(np.abs(x - y))):.3g}"
              f" ({int(np.sum(x != y))} of {x.size} weights differ)")
    print(f"loss before the step: {a.joinpath('loss.txt').read_text().split()[0]} vs "
          f"{b.joinpath('loss.txt').read_text().split()[0]}")
    same = True
    for spec in CODECS:
        name = codec_file(spec)
        pa, pb = (a / f"update.{name}.bin").read_bytes(), (b / f"update.{name}.bin").read_bytes()
        da, db = np.load(a / f"decoded.{name}.npy"), np.load(b / f"decoded.{name}.npy")
        ok = pa == pb and np.array_equal(da.view(np.uint32), db.view(np.uint32))
        same &= ok
        print(f"codec {spec:22s} payload {len(pa):6d} B: encoded bytes and decoded floats bit-identical: {ok}")
    return 0 if same else 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs=2, type=Path)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--compare", action="store_true")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.paths)
    run(args.paths[0], args.paths[1], args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
