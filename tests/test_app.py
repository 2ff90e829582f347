"""ClientApp: the real device against a real Mosquitto with TLS and passwords, and a real aggregator."""
import base64
import datetime
import hashlib
import ipaddress
import logging
import os
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_client.app import (BootstrapError, ClientApp, EligibilityGate, PersistentTrust, TrustState,
                             load_saved_model, load_trust_state, verify_model_message)
from edge_client.client_config import load_client_config
from edge_client.eligibility import EligibilityPolicy
from edge_client.linux_platform import LinuxPlatform
from edge_client.platform import StaticPlatform
from edge_client.textstore import TextStore
from models.bundle_cache import get_or_export_bundle
from models.config import ModelConfig
from models.tokenizer import build_vocabulary
from protocol.errors import TrustError
from protocol.signing import ModelManifest, generate_keypair, load_private_key, sign_manifest, write_keypair
from protocol.transport import MqttSettings

KEYBOARD = ["i am going to the park", "see you at the station at six", "we are at home now",
            "can you call me later", "the cat is on the sofa", "thanks for the lovely dinner"]
PASSWORDS = {"aggregator": "agg-secret", "pi-1": "pi-secret", "pi-2": "pi2-secret"}


# -- fixtures: a bundle, keys, a TLS + password Mosquitto -----------------------------------------------
@pytest.fixture(scope="module")
def bundle(cache_dir):
    vocab = build_vocabulary(KEYBOARD, size=100)
    config = ModelConfig(vocab_size=vocab.size, embed_dim=8, units=16, seq_len=20, batch_size=16)
    return get_or_export_bundle(config, vocab.to_json(), seed=0, cache_dir=cache_dir / "bundles")


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedboard test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                          x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    files = {"ca": directory / "ca.crt", "cert": directory / "server.crt", "key": directory / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                                      serialization.NoEncryption()))
    return files


def mosquitto_password_line(user: str, password: str) -> str:
    """Mosquitto 2's `$7$` format (PBKDF2-HMAC-SHA512, 101 iterations), for when mosquitto_passwd is missing."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return f"{user}:$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"


def write_password_file(path: Path, users: dict[str, str], use_binary: bool = True) -> None:
    tool = shutil.which("mosquitto_passwd") or next(
        (p for p in ("/usr/bin/mosquitto_passwd",) if os.path.exists(p)), None)
    if tool and use_binary:
        for i, (user, password) in enumerate(users.items()):
            subprocess.run([tool, "-b", *(["-c"] if i == 0 else []), str(path), user, password], check=True,
                           capture_output=True, timeout=30)
    else:
        path.write_text("".join(mosquitto_password_line(u, p) for u, p in users.items()))


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    """Mosquitto with a TLS listener and password authentication (no anonymous clients)."""
    from device_sim.mosquitto import MosquittoBroker, find_mosquitto, free_port

    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the README's test command (bash .ci/run), which installs it")
    directory = tmp_path_factory.mktemp("tls")
    tls = make_tls_files(directory)
    write_password_file(directory / "passwd", PASSWORDS)
    port = free_port()
    extra = "\n".join([
        f"listener {port} 127.0.0.1", f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}",
        "allow_anonymous false", f"password_file {directory / 'passwd'}",
    ])
    with MosquittoBroker(extra_config=extra) as broker:
        broker.tls_port = port
        broker.ca = tls["ca"]
        yield broker


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    private, public = write_keypair(directory)
    return load_private_key(private), public


def client_toml(directory: Path, broker, public_key: Path, *, device: str = "pi-1", fleet: str = "home",
                password: str | None = None, extra: str = "") -> Path:
    (directory / "broker.password").write_text((password or PASSWORDS[device]) + "\n")
    path = directory / "client.toml"
    path.write_text(f"""
[device]
id = "{device}"
fleet = "{fleet}"
state_dir = "state"
data = "state/texts.db"

[broker]
host = "127.0.0.1"
port = {broker.tls_port}
username = "{device}"
password_file = "broker.password"
tls_ca = "{broker.ca}"
keepalive_s = 10
bootstrap_timeout_s = 15

[trust]
aggregator_public_key = "{public_key}"

[policy]
require_idle = false
require_unmetered = false
max_cpu_temp_c = 200
min_free_memory_mb = 0

[training]
threads = 1
{extra}
""")
    return path


def device_platform():
    """The real Linux sensors, unless this machine has no network link at all (then an ideal device)."""
    linux = LinuxPlatform(idle_after_s=0)
    return None if linux.read().link_up else StaticPlatform()


def aggregator_for(bundle, broker, private_key, fleet: str, checkin_window_s: float = 30.0):
    from aggregator.server import Aggregator, AggregatorConfig

    settings = MqttSettings(host="127.0.0.1", port=broker.tls_port, username="aggregator",
                            password=PASSWORDS["aggregator"], tls_ca=str(broker.ca), keepalive_s=10)
    config = AggregatorConfig(fleet=fleet, clients_per_round=1, expected_checkins=1, checkin_window_s=checkin_window_s,
                              report_deadline_s=60.0, codec="q8", downlink="f32", local_epochs=2, client_lr=1.0)
    agg = Aggregator(config, bundle, settings, private_key, client_id=f"aggregator-{fleet}")
    agg.start()
    return agg


# -- the integration test ---------------------------------------------------------------------------------
@pytest.mark.mosquitto
def test_device_trains_a_round_over_tls_with_a_password_and_survives_a_restart(
        tmp_path, bundle, secure_broker, keys, caplog):
    private_key, public_path = keys
    agg = aggregator_for(bundle, secure_broker, private_key, "home")
    try:
        config = load_client_config(client_toml(tmp_path, secure_broker, public_path))
        with TextStore(config.device.data) as store:
            store.add_many(KEYBOARD * 5)

        started = time.monotonic()
        app = ClientApp(config, platform=device_platform())
        with caplog.at_level(logging.INFO):
            app.start()
        try:
            assert (config.device.state_dir / "bundle.fbz").exists()
            assert "fetched and cached" in caplog.text
            assert not app.device.pool.keep_idle  # the interpreter lives only while a round trains
            result = agg.run_round()
        finally:
            app.stop()
        first_round_s = time.monotonic() - started
        assert result.committed and result.participants == 1 and result.version == 1, result
        assert result.uplink_bytes > 0 and not result.rejected
        saved = load_trust_state(config.device.state_dir / "trust.json", "home")
        assert saved is not None and saved.version == 0  # it trained from model v0
        weights_v1 = agg.weights.copy()

        # A restart: the bundle comes from the cache, the trust state from trust.json.
        caplog.clear()
        started = time.monotonic()
        app = ClientApp(config, platform=device_platform())
        with caplog.at_level(logging.INFO):
            app.start()
        try:
            assert "fetched and cached" not in caplog.text
            result = agg.run_round()
        finally:
            app.stop()
        restart_round_s = time.monotonic() - started
        assert result.committed and result.participants == 1 and result.version == 2, result
        assert load_trust_state(config.device.state_dir / "trust.json", "home").version == 1
        saved_bundle, saved_weights = load_saved_model(config)
        assert saved_bundle.sha256 == bundle.sha256
        np.testing.assert_array_equal(saved_weights, weights_v1)  # f32 downlink: exact
        print(f"client rounds over TLS: first (with bundle fetch) {first_round_s:.1f} s, "
              f"after restart {restart_round_s:.1f} s")
    finally:
        agg.stop()


@pytest.mark.mosquitto
def test_run_stops_when_asked_and_an_ineligible_device_does_not_check_in(tmp_path, bundle, secure_broker, keys):
    import threading

    private_key, public_path = keys
    agg = aggregator_for(bundle, secure_broker, private_key, "idle", checkin_window_s=2.0)
    try:
        config = load_client_config(client_toml(tmp_path, secure_broker, public_path, fleet="idle"))
        with TextStore(config.device.data) as store:
            store.add_many(KEYBOARD)
        unplugged = StaticPlatform(battery_percent=50.0, charging=False)
        app = ClientApp(config, platform=unplugged)
        runner = threading.Thread(target=app.run)
        runner.start()
        deadline = time.monotonic() + 30
        while runner.is_alive() and (app.device is None or app.device.stats.connects == 0) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.is_alive() and app.device is not None and app.device.stats.connects == 1
        result = agg.run_round()
        assert not result.committed and result.checkins == 0
        assert unplugged.reads >= 1
        app.stop()
        runner.join(10)
        assert not runner.is_alive()
    finally:
        agg.stop()


# -- bootstrap failures say what is wrong ----------------------------------------------------------------
@pytest.mark.mosquitto
def test_bootstrap_errors_are_clear(tmp_path, bundle, secure_broker, keys):
    _, public_path = keys
    # nothing published for this fleet yet
    config = _with_timeout(load_client_config(client_toml(tmp_path, secure_broker, public_path, fleet="empty")), 1.0)
    with pytest.raises(BootstrapError, match="no retained global model on fedboard/empty/model/current"):
        ClientApp(config).start()
    # a wrong password
    bad = load_client_config(client_toml(tmp_path, secure_broker, public_path, password="wrong"))
    with pytest.raises(BootstrapError, match="refused the connection"):
        ClientApp(_with_timeout(bad, 5.0)).start()


@pytest.mark.mosquitto
def test_bootstrap_refuses_a_model_signed_by_another_key(tmp_path, bundle, secure_broker, keys):
    private_key, public_path = keys
    agg = aggregator_for(bundle, secure_broker, private_key, "signed")
    try:
        other = tmp_path / "other"
        _, other_public = write_keypair(other)
        config = load_client_config(client_toml(tmp_path, secure_broker, other_public, fleet="signed"))
        with pytest.raises(BootstrapError, match="refused the retained model.*bad_signature"):
            ClientApp(_with_timeout(config, 5.0)).start()
        assert not (config.device.state_dir / "bundle.fbz").exists()
    finally:
        agg.stop()


@pytest.mark.mosquitto
def test_tls_with_the_wrong_ca_is_refused(tmp_path, secure_broker, keys):
    _, public_path = keys
    other_ca = make_tls_files(tmp_path)["ca"]
    config = load_client_config(client_toml(tmp_path, secure_broker, public_path))
    config = _with_broker(config, tls_ca=other_ca, bootstrap_timeout_s=5.0)
    with pytest.raises(BootstrapError, match="TLS handshake"):
        ClientApp(config).start()


def test_password_file_fallback_format_is_accepted_by_mosquitto(tmp_path):
    """The hand-written $7$ line works where mosquitto_passwd is missing."""
    from device_sim.mosquitto import MosquittoBroker, find_mosquitto

    import paho.mqtt.client as mqtt

    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed")
    write_password_file(tmp_path / "passwd", {"u": "p"}, use_binary=False)
    with MosquittoBroker(extra_config=f"allow_anonymous false\npassword_file {tmp_path / 'passwd'}") as broker:
        codes = []
        for password in ("p", "wrong"):
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            client.username_pw_set("u", password)
            client.on_connect = lambda c, u, f, rc, p=None: codes.append(rc.is_failure)
            client.connect("127.0.0.1", broker.port)
            client.loop_start()
            deadline = time.monotonic() + 5
            while len(codes) < (1 if password == "p" else 2) and time.monotonic() < deadline:
                time.sleep(0.02)
            client.loop_stop()
            client.disconnect()
        assert codes == [False, True]


def _with_broker(config, **changes):
    import dataclasses

    return dataclasses.replace(config, broker=dataclasses.replace(config.broker, **changes))


def _with_timeout(config, seconds):
    return _with_broker(config, bootstrap_timeout_s=seconds)


# -- unit tests of the pieces -------------------------------------------------------------------------------
def signed(private_key, version: int, payload: bytes, fleet: str = "home"):
    manifest = ModelManifest(fleet=fleet, model_id="cifg-abc", version=version,
                             weights_sha256=hashlib.sha256(payload).hexdigest(), codec="f32",
                             payload_len=len(payload), extra={"bundle_sha256": "0" * 64})
    return sign_manifest(private_key, manifest)


def test_persistent_trust_survives_restarts_without_going_back(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

    private_pem, public_pem = generate_keypair()
    key, public = load_pem_private_key(private_pem, None), load_pem_public_key(public_pem)
    trust = PersistentTrust(public, "home", None, tmp_path)
    assert trust.last_version is None
    trust.accept(signed(key, 3, b"v3"), b"v3")
    assert load_trust_state(tmp_path / "trust.json", "home") == TrustState("home", 3, hashlib.sha256(b"v3").hexdigest(),
                                                                           "cifg-abc")
    assert (tmp_path / "trust.json").stat().st_mode & 0o777 == 0o600

    restarted = PersistentTrust(public, "home", None, tmp_path)
    restarted.accept(signed(key, 3, b"v3"), b"v3")  # the unchanged retained model: accepted again
    with pytest.raises(TrustError, match="old_version"):
        PersistentTrust(public, "home", None, tmp_path).accept(signed(key, 3, b"other"), b"other")
    with pytest.raises(TrustError, match="old_version"):
        PersistentTrust(public, "home", None, tmp_path).accept(signed(key, 2, b"v2"), b"v2")
    restarted.accept(signed(key, 4, b"v4"), b"v4")
    assert load_trust_state(tmp_path / "trust.json", "home").version == 4
    with pytest.raises(TrustError, match="old_version"):
        PersistentTrust(public, "home", None, tmp_path).accept(signed(key, 3, b"v3"), b"v3")
    # the saved model message verifies on its own (what `fedboard predict` reads)
    model = verify_model_message((tmp_path / "model.fbm").read_bytes(), public, "home")
    assert model.manifest.version == 4 and model.payload == b"v4"
    # another fleet's state is ignored; a corrupt one is an error, never silently "no state"
    assert load_trust_state(tmp_path / "trust.json", "elsewhere") is None
    (tmp_path / "trust.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt.*delete it"):
        PersistentTrust(public, "home", None, tmp_path)


def test_eligibility_gate_follows_the_platform_and_caches_during_training():
    now = [0.0]
    platform = StaticPlatform()
    gate = EligibilityGate(platform, EligibilityPolicy(), check_interval_s=1.0, clock=lambda: now[0])
    assert gate(False) == (True, ())
    platform.set(charging=False, battery_percent=90.0)
    assert gate(False) == (False, ("not_charging",))
    platform.set(charging=True, idle=False)
    assert gate(False) == (False, ("not_idle",))
    assert gate(True) == (True, ())  # training loads the CPU itself: idleness is not asked
    reads = platform.reads
    platform.set(charging=False)
    assert gate(True) == (True, ()) and platform.reads == reads  # cached within the interval
    now[0] += 1.5
    assert gate(True) == (False, ("not_charging",))


TUNED_MALLOC = r"""
import json, threading
import numpy as np
from edge_client.app import tune_malloc

def rss_anon_mb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:")) / 1024

def round_like(kept):
    # what a round does on the training thread: weight-sized buffers made and dropped, with
    # small objects that outlive them allocated in between (they pin the heap under glibc's defaults)
    for _ in range(3):
        buffers = []
        for _ in range(8):
            buffers.append(np.ones(781_068, np.float32))
            kept.append(np.ones(64, np.float32))
        del buffers

done = {} if TUNE == "no" else tune_malloc()
kept = []
base = rss_anon_mb()
worker = threading.Thread(target=round_like, args=(kept,))
worker.start()
worker.join()
print(json.dumps({"done": done, "growth_mb": rss_anon_mb() - base}))
"""


def run_malloc_probe(tune: bool, env: dict[str, str]) -> dict:
    code = f"TUNE = {'yes' if tune else 'no'!r}\n" + TUNED_MALLOC
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_tune_malloc_gives_freed_buffers_back_and_leaves_env_settings_alone():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    untuned, tuned = run_malloc_probe(False, env), run_malloc_probe(True, env)
    assert tuned["done"] == {"MALLOC_ARENA_MAX": 2, "MALLOC_MMAP_THRESHOLD_": 131072}
    assert tuned["growth_mb"] < 4, tuned  # 75 MB were allocated and freed
    assert untuned["growth_mb"] > tuned["growth_mb"] + 10, (untuned, tuned)  # what it is for
    assert run_malloc_probe(True, {**env, "MALLOC_ARENA_MAX": "4"})["done"] == {"MALLOC_MMAP_THRESHOLD_": 131072}
