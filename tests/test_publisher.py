"""Publishing: signed full and delta downlinks that rebuild the same weights bit for bit."""
import hashlib

import numpy as np
import pytest

from aggregator.publisher import (apply_delta, build_inference_message, build_model_message, build_release,
                                  weights_digest)
from aggregator_testkit import keypair
from protocol.codec import parse_codec
from protocol.envelope import Kind, decode_envelope
from protocol.errors import TrustError
from protocol.model_message import ModelMessage
from protocol.signing import ModelTrust, SignedManifest

DIM = 20_000


def unpack(data: bytes, kind=Kind.MODEL):
    message = ModelMessage.from_envelope(decode_envelope(data, expect=kind))
    return message, SignedManifest.from_bytes(message.signed_manifest)


def rebuild_from_delta(data: bytes, base: np.ndarray, trust: ModelTrust) -> np.ndarray:
    """What a device does with a delta (edge_client.device._rebuild_from_delta, in short)."""
    message, signed = unpack(data)
    manifest = trust.accept(signed, message.weights_payload)
    assert manifest.extra["base_f32_sha256"] == weights_digest(base)
    weights = apply_delta(base, parse_codec(manifest.codec).decode(message.weights_payload, base.size))
    assert weights_digest(weights) == manifest.extra["weights_f32_sha256"]
    return weights


@pytest.mark.parametrize("delta_codec", ["q8", "f16|zstd", "ef|topk:0.05|q4|zstd"])
def test_delta_and_full_paths_reconstruct_the_same_bits(delta_codec):
    key, public = keypair()
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(DIM).astype(np.float32)
    v0 = build_release(fleet="f", model_id="m", version=0, proposed=w0, previous=None, full_codec="f32|zstd",
                       delta_codec=delta_codec, private_key=key)
    assert v0.delta is None  # nothing to be a delta against yet
    proposed = w0 + 0.01 * rng.standard_normal(DIM).astype(np.float32)
    v1 = build_release(fleet="f", model_id="m", version=1, proposed=proposed, previous=v0.full, full_codec="f32|zstd",
                       delta_codec=delta_codec, private_key=key)
    # the delta device: holds v0, checked by the manifest, rebuilds v1
    trust = ModelTrust(public, "f", "m", last_version=0)
    via_delta = rebuild_from_delta(v1.delta.envelope_bytes, v0.weights, trust)
    # the full device: decodes the lossless full message
    message, signed = unpack(v1.full.envelope_bytes)
    manifest = ModelTrust(public, "f", "m").accept(signed, message.weights_payload)
    via_full = parse_codec(manifest.codec).decode(message.weights_payload, DIM)
    assert np.array_equal(via_delta, via_full) and np.array_equal(via_full, v1.weights)
    assert manifest.extra["weights_f32_sha256"] == weights_digest(v1.weights)
    # the server adopted what the delta encodes, which moved the model towards what the optimizer proposed
    assert np.linalg.norm(v1.weights - proposed) < 0.9 * np.linalg.norm(w0 - proposed)
    assert len(v1.delta.envelope_bytes) < len(v1.full.envelope_bytes) / 1.7


def test_delta_is_refused_by_a_device_that_holds_another_version():
    key, public = keypair()
    w0 = np.zeros(DIM, np.float32)
    v0 = build_model_message(fleet="f", model_id="m", version=0, weights=w0, codec_spec="f32", private_key=key)
    v1 = build_release(fleet="f", model_id="m", version=1, proposed=w0 + 0.5, previous=v0, full_codec="f32",
                       delta_codec="q8", private_key=key)
    message, signed = unpack(v1.delta.envelope_bytes)
    assert signed.manifest.base_version == 0
    with pytest.raises(TrustError, match="stale_base"):
        ModelTrust(public, "f", "m", last_version=None).accept(signed, message.weights_payload)
    _, other = keypair()
    with pytest.raises(TrustError, match="bad_signature"):
        ModelTrust(other, "f", "m", last_version=0).accept(signed, message.weights_payload)


def test_lossy_full_codec_adopts_decoded_weights_and_delta_needs_lossless_full():
    key, _ = keypair()
    w = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
    full = build_model_message(fleet="f", model_id="m", version=2, weights=w, codec_spec="f16", private_key=key)
    assert np.array_equal(full.weights, w.astype(np.float16).astype(np.float32))
    _, signed = unpack(full.envelope_bytes)
    assert signed.manifest.extra["weights_f32_sha256"] == hashlib.sha256(full.weights.tobytes()).hexdigest()
    with pytest.raises(ValueError, match="lossless"):
        build_release(fleet="f", model_id="m", version=3, proposed=w, previous=full, full_codec="f16",
                      delta_codec="q8", private_key=key)


def test_int8_inference_message_is_signed_and_names_its_weights():
    key, public = keypair()
    w = np.ones(DIM, np.float32)
    data = build_inference_message(fleet="f", model_id="m", version=4, tflite=b"\x1c\0\0\0TFL3int8", weights=w,
                                   private_key=key)
    message, signed = unpack(data, Kind.INFERENCE_MODEL)
    manifest = ModelTrust(public, "f", "m").accept(signed, message.weights_payload)
    assert manifest.codec == "tflite-int8" and message.weights_payload == b"\x1c\0\0\0TFL3int8"
    assert manifest.extra["weights_f32_sha256"] == weights_digest(w)


# -- end to end: real devices (TFLite runtime) keep their model and take the delta ------------------------
KEYBOARD = ["i am going to the park", "see you at the station at six", "we are at home now",
            "can you call me later", "the cat is on the sofa", "thanks for the lovely dinner"]


@pytest.fixture(scope="module")
def tiny_bundle(cache_dir):
    from models.bundle_cache import get_or_export_bundle
    from models.config import ModelConfig
    from models.tokenizer import build_vocabulary

    vocab = build_vocabulary(KEYBOARD, size=100)  # the same tiny model as test_app.py: exported once
    config = ModelConfig(vocab_size=vocab.size, embed_dim=8, units=16, seq_len=20, batch_size=16)
    return get_or_export_bundle(config, vocab.to_json(), seed=0, cache_dir=cache_dir / "bundles"), vocab


@pytest.mark.mosquitto
def test_devices_rebuild_the_delta_downlink_exactly_and_fall_back_to_the_full_model(tiny_bundle, mosquitto):

    from aggregator.server import Aggregator, AggregatorConfig
    from aggregator_testkit import wait_until
    from edge_client.device import DeviceClient, DeviceConfig
    from edge_client.trainer import ArrayWindows, InterpreterPool
    from models.partition import windows_of_sequences, windows_to_xy
    from models.runtime import InferenceModel
    from protocol.transport import MqttSettings
    import paho.mqtt.client as mqtt

    bundle, vocab = tiny_bundle
    key, public = keypair()
    settings = MqttSettings(port=mosquitto.port)
    config = AggregatorConfig(fleet="delta", clients_per_round=2, over_selection=1.0, expected_checkins=2,
                              checkin_window_s=10.0, report_deadline_s=60.0, codec="q8", downlink="f32",
                              downlink_delta="q8", mu=0.1, client_lr=1.0, int8_every=2)
    agg = Aggregator(config, bundle, settings, key)
    agg.start()
    pool = InterpreterPool(bundle, size=1)
    x, y = windows_to_xy(windows_of_sequences([vocab.encode_block(t) for t in KEYBOARD * 6], 20))
    devices = [DeviceClient(DeviceConfig(fleet="delta", device_id=f"pi-{i}", mqtt=settings, keep_model=True),
                            pool, ArrayWindows(x, y), ModelTrust(public, "delta", bundle.model_id)) for i in range(2)]
    int8 = {}
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_message = lambda c, u, m: int8.setdefault("data", m.payload)
    watcher.connect("127.0.0.1", mosquitto.port)
    watcher.loop_start()
    watcher.subscribe(agg.topics.model_int8, 1)
    try:
        for d in devices:
            d.start()
        wait_until(lambda: all(d.ready.is_set() for d in devices), 20, "devices connected")
        versions = {}
        for round_id in (1, 2, 3):
            if round_id == 3:  # one device's copy of v2 is damaged: the delta's base check refuses it
                devices[1]._weights = devices[1]._weights.copy()
                devices[1]._weights[0] += 1.0
            before = [d.stats.downlink_bytes for d in devices]
            result = agg.run_round()
            assert result.committed and result.participants == 2, result
            assert all(d._plan.mu == 0.1 for d in devices)  # FedProx travels in the plan to the trainer
            versions[result.version] = agg.weights.copy()
            received = [d.stats.downlink_bytes - b for d, b in zip(devices, before)]
            if round_id == 1:
                full_size = received[0]
                assert received == [full_size, full_size]
            elif round_id == 2:  # both hold v0: a q8 delta, about a quarter of the full model
                assert all(r < 0.4 * full_size for r in received), (received, full_size)
            else:
                assert received[0] < 0.4 * full_size and received[1] > full_size  # delta refused, then full
        for d in devices:
            assert d._model_version == 2 and np.array_equal(d._weights, versions[2])  # what round 3 trained from
        assert devices[0].stats.models_refused == 0 and devices[1].stats.models_refused == 1
        assert agg.model.version == 3 and result.delta_bytes > 0
        # the int8 inference model of v2 was exported in the background and published, signed
        wait_until(lambda: "data" in int8, 120, "retained int8 model")
        message, signed = unpack(int8["data"], Kind.INFERENCE_MODEL)
        manifest = ModelTrust(public, "delta", bundle.model_id).accept(signed, message.weights_payload)
        assert manifest.version == 2 and manifest.extra["weights_f32_sha256"] == weights_digest(versions[2])
        top3 = InferenceModel(message.weights_payload, bundle.config).top_k(x[:2], 3)
        assert top3.shape == (2, 20, 3)
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        for d in devices:
            d.stop()
        agg.stop()
