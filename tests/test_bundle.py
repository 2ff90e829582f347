"""Bundle format: round trip, determinism, and detection of every kind of damage.

Uses a stand-in flatbuffer (the bundle only checks the TFL3 identifier), so
these tests need neither TensorFlow nor the interpreter.
"""

import hashlib
import io
import json
import random
import sys
import zipfile

import numpy as np
import pytest

from models.bundle import Bundle, BundleError, WeightSpec, read_bundle, release_zero_pages, weight_layout
from models.config import ModelConfig

CONFIG = ModelConfig(vocab_size=50, embed_dim=8, units=16, seq_len=5, batch_size=4)
FAKE_TFLITE = b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 4 + bytes(4096)


def vocab(n: int) -> dict:
    return {"format": "fedboard-vocab/1", "words": ["<pad>", "<oov>", "<bos>", "<eos>"] + [f"w{i}" for i in range(n - 4)]}


def make(seed: int = 0, config: ModelConfig = CONFIG) -> Bundle:
    w = np.random.default_rng(seed).standard_normal(config.param_count).astype(np.float32)
    return Bundle.create(config, vocab(config.vocab_size), FAKE_TFLITE, w)


def rezip(data: bytes, replace: dict[str, bytes] | None = None, drop: str | None = None, add: dict | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            if name == drop:
                continue
            dst.writestr(name, (replace or {}).get(name, src.read(name)))
        for name, blob in (add or {}).items():
            dst.writestr(name, blob)
    return out.getvalue()


def test_reference_layout_covers_every_parameter():
    layout = weight_layout(ModelConfig())
    assert [s.name for s in layout] == [
        "embedding", "cifg/kernel", "cifg/recurrent_kernel", "cifg/bias", "projection", "output_bias"]
    assert layout[0].shape == (5004, 96) and layout[-1].shape == (5004,)
    assert sum(s.size for s in layout) == 781_068
    assert all(a.offset + a.size == b.offset for a, b in zip(layout, layout[1:]))


def test_round_trip_is_exact_and_deterministic():
    bundle = make()
    data = bundle.to_bytes()
    back = Bundle.from_bytes(data)
    assert back == bundle and back.sha256 == bundle.sha256
    assert back.config == CONFIG and back.layout == bundle.layout
    assert back.tflite == FAKE_TFLITE and back.vocab_json == vocab(50)
    np.testing.assert_array_equal(back.initial_weights, bundle.initial_weights)
    assert back.initial_weights.dtype == np.float32
    assert back.to_bytes() == data  # equal bundles are equal bytes
    assert bundle.model_id == "cifg-" + bundle.sha256[:12]


def test_identity_depends_on_every_member():
    base = make(0)
    assert make(1).sha256 != base.sha256  # weights
    assert Bundle.create(CONFIG, vocab(50) | {"note": 1}, FAKE_TFLITE, base.initial_weights).sha256 != base.sha256
    assert Bundle.create(CONFIG, vocab(50), FAKE_TFLITE + b"\0", base.initial_weights).sha256 != base.sha256
    moved = base.with_initial_weights(base.initial_weights + 1)
    assert moved.model_id != base.model_id and moved.tflite == base.tflite


def test_write_and_read(tmp_path):
    bundle = make()
    path = bundle.write(tmp_path / "m.fbz")
    assert read_bundle(path) == bundle
    assert not (tmp_path / "m.fbz.tmp").exists()
    with pytest.raises(BundleError, match="cannot read"):
        read_bundle(tmp_path / "missing.fbz")


def test_detects_a_changed_member():
    data = make().to_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        weights = bytearray(zf.read("weights.f32"))
    weights[17] ^= 0x01
    with pytest.raises(BundleError, match="weights.f32 is corrupt"):
        Bundle.from_bytes(rezip(data, {"weights.f32": bytes(weights)}))


def test_flipped_bytes_are_detected_or_harmless():
    """Flip single bytes anywhere: either the read fails with BundleError, or the
    byte was zip bookkeeping that changes nothing (the same verified bundle)."""
    bundle = make()
    data = bundle.to_bytes()
    rng = random.Random(7)
    detected = 0
    for pos in rng.sample(range(len(data)), 300):
        damaged = bytearray(data)
        damaged[pos] ^= 1 << rng.randrange(8)
        try:
            back = Bundle.from_bytes(bytes(damaged))
        except BundleError:
            detected += 1
        else:
            assert back.sha256 == bundle.sha256
            np.testing.assert_array_equal(back.initial_weights, bundle.initial_weights)
    assert detected > 250


def test_not_a_zip():
    with pytest.raises(BundleError, match="not a zip"):
        Bundle.from_bytes(b"hello, this is not a bundle")


def test_missing_and_extra_members():
    data = make().to_bytes()
    with pytest.raises(BundleError, match="missing member.*vocab.json"):
        Bundle.from_bytes(rezip(data, drop="vocab.json"))
    with pytest.raises(BundleError, match="unexpected member"):
        Bundle.from_bytes(rezip(data, add={"evil.sh": b"rm -rf /"}))


def test_manifest_problems():
    data = make().to_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.from_bytes(rezip(data, {"manifest.json": b"{nope"}))
    with pytest.raises(BundleError, match="unsupported bundle format"):
        Bundle.from_bytes(rezip(data, {"manifest.json": json.dumps(manifest | {"format": "x/9"}).encode()}))
    bigger = manifest | {"config": CONFIG.to_dict() | {"units": 17}}
    with pytest.raises(BundleError, match="layout covers"):
        Bundle.from_bytes(rezip(data, {"manifest.json": json.dumps(bigger).encode()}))
    no_members = {k: v for k, v in manifest.items() if k != "members"}
    with pytest.raises(BundleError, match="incomplete"):
        Bundle.from_bytes(rezip(data, {"manifest.json": json.dumps(no_members).encode()}))


def test_constructor_checks():
    p = CONFIG.param_count
    good = np.zeros(p, np.float32)
    with pytest.raises(BundleError, match="float32"):
        Bundle.create(CONFIG, vocab(50), FAKE_TFLITE, np.zeros(p - 1, np.float32))
    with pytest.raises(BundleError, match="NaN"):
        Bundle.create(CONFIG, vocab(50), FAKE_TFLITE, np.full(p, np.nan, np.float32))
    with pytest.raises(BundleError, match="vocabulary has 49 words"):
        Bundle.create(CONFIG, vocab(49), FAKE_TFLITE, good)
    with pytest.raises(BundleError, match="TFL3"):
        Bundle.create(CONFIG, vocab(50), b"not a flatbuffer", good)
    bad_layout = (WeightSpec("all", (p - 1,), 0, p - 1),)
    with pytest.raises(BundleError, match="layout covers"):
        Bundle.create(CONFIG, vocab(50), FAKE_TFLITE, good, layout=bad_layout)
    b = make()
    with pytest.raises(BundleError, match="does not match its contents"):
        Bundle(b.config, b.vocab_json, b.tflite, b.layout, b.initial_weights.copy(), "0" * 64)


def test_weights_are_read_only_and_split_into_views():
    b = make()
    with pytest.raises(ValueError):
        b.initial_weights[0] = 1.0
    parts = b.split_weights(b.initial_weights)
    assert parts["cifg/kernel"].shape == (8, 48)
    assert np.shares_memory(parts["embedding"], b.initial_weights)
    np.testing.assert_array_equal(parts["output_bias"], b.initial_weights[-50:])


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:")) / 1024


@pytest.mark.skipif(sys.platform != "linux", reason="madvise(MADV_DONTNEED) is the Linux mechanism")
def test_release_zero_pages_keeps_the_content_and_frees_the_memory():
    """The graph's zero initial values stop counting in RSS; the bytes read back the same."""
    head, tail = bytes(range(256)) * 64, b"\xff" * 5000
    data = head + b"\0" * (16 << 20) + tail  # written out in full: every page resident
    digest = hashlib.sha256(data).hexdigest()
    before = _rss_anon_mb()
    released = release_zero_pages(data)
    after = _rss_anon_mb()
    assert (16 << 20) - 2 * 4096 <= released <= 16 << 20
    assert before - after > 12, (before, after)
    assert hashlib.sha256(data).hexdigest() == digest  # reads see the zeros again
    assert data[:len(head)] == head and data[-len(tail):] == tail
    assert release_zero_pages(data) == released  # idempotent
    assert release_zero_pages(b"\x01" * (1 << 20)) == 0  # nothing to release
    assert release_zero_pages(bytes(100)) == 0  # too small to bother


def test_read_weights_are_a_read_only_view_of_the_member_bytes():
    back = Bundle.from_bytes(make(4).to_bytes())
    w = back.initial_weights
    assert w.dtype == np.float32 and not w.flags.writeable
    assert not w.flags.owndata  # no second copy of the weights
    np.testing.assert_array_equal(w, make(4).initial_weights)


def test_hostile_manifests_are_bundle_errors():
    """Found by bench/fuzz_campaign.py: each of these escaped as a plain exception before."""
    data = make().to_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    huge_int = b'{"format": ' + b"9" * 5000 + b"}"                       # ValueError from int parsing
    deep = b"[" * 100_000 + b"]" * 100_000                                 # RecursionError
    inf_size = json.dumps(manifest | {"members": {**manifest["members"], "model.tflite": {
        **manifest["members"]["model.tflite"], "size": float("inf")}}}).encode()  # OverflowError in int()
    layout = [dict(d) for d in manifest["layout"]]
    layout[0]["shape"] = [2**62, 2**62]                                    # int64 overflow in a product
    for bad in (huge_int, deep, inf_size, json.dumps(manifest | {"layout": layout}).encode()):
        with pytest.raises(BundleError):
            Bundle.from_bytes(rezip(data, {"manifest.json": bad}))
