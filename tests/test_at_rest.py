"""Encryption at rest through the real client: `fedboard client add-text`, `client`, `rotate-key` as processes.

What a user typed must not be readable in any file the device writes; a wrong or missing key is a
clear error that changes nothing; rotate-key re-seals everything and survives a kill at any step.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from device_sim.mosquitto import free_port
from edge_client.at_rest import PAUSE_ENV, ROTATION_STEPS, key_source, open_device_stores
from edge_client.client_config import load_client_config
from edge_client.outbox import Outbox
from edge_client.residuals import ResidualStore
from edge_client.sealing import Keyring, StoreKey, StoreKeyError
from edge_client.store_keys import load_keyring
from edge_client.textstore import TextStore
from protocol.signing import write_keypair

ROOT = Path(__file__).resolve().parents[1]
SECRETS = ["zanzibar marmalade rendezvous", "quetzalcoatl saxophone", "my pin is 48151623"]
WORDS = [b"zanzibar", b"marmalade", b"rendezvous", b"quetzalcoatl", b"saxophone", b"48151623", b"notesapp"]
RESIDUAL = np.linspace(-1.0, 1.0, 1000, dtype=np.float32)


@pytest.fixture
def config_file(tmp_path):
    _, public = write_keypair(tmp_path / "keys")
    path = tmp_path / "etc" / "client.toml"
    path.parent.mkdir()
    path.write_text(f"""
[device]
id = "pi-1"
fleet = "home"
state_dir = "{tmp_path / 'state'}"

[broker]
host = "127.0.0.1"
port = {free_port()}
bootstrap_timeout_s = 2

[trust]
aggregator_public_key = "{public}"
""")
    return path


def fedboard(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_client.commands", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def files_of(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (the state: text store, WAL, residual, outbox)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_no_plain_words(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            for word in WORDS:
                assert word not in data, f"{word!r} readable in {path}"


def add_secrets(config_file: Path) -> None:
    out = fedboard("client", "add-text", "--config", str(config_file), *SECRETS[:2])
    assert out.returncode == 0, out.stderr
    export = config_file.parent / "export.jsonl"
    export.write_text(json.dumps({"text": SECRETS[2], "app": "notesapp"}) + "\n")
    out = fedboard("client", "add-text", "--config", str(config_file), "--file", str(export), "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    export.unlink()


def fill_residual_and_outbox(config) -> None:
    """What a device has after a round: a residual and an update waiting for the broker."""
    keyring = load_keyring(key_source(config))
    ResidualStore(config.device.state_dir, keyring=keyring).save(RESIDUAL)
    Outbox(config.device.state_dir / "outbox", keyring=keyring).put(
        "fedboard/home/update/pi-1", 7, 2e9, b"update payload zanzibar")


def read_everything(config) -> tuple[list[tuple[str, str | None]], np.ndarray | None, list[bytes]]:
    keyring = load_keyring(key_source(config))
    stores = open_device_stores(config, keyring)
    try:
        rows = [(text, app) for _, text, app in stores.text.rows()]
        return rows, stores.residuals.load(RESIDUAL.size), [item.data for item in stores.outbox.pending()]
    finally:
        stores.close()


EXPECTED_ROWS = [(SECRETS[0], None), (SECRETS[1], None), (SECRETS[2], "notesapp")]


@pytest.fixture(scope="module")
def bundle(cache_dir):
    from models.bundle_cache import get_or_export_bundle
    from models.config import ModelConfig
    from models.tokenizer import build_vocabulary

    vocab = build_vocabulary(["i am going to the park", "see you at the station at six"] * 3, size=50)
    config = ModelConfig(vocab_size=vocab.size, embed_dim=8, units=16, seq_len=20, batch_size=16)
    return get_or_export_bundle(config, vocab.to_json(), seed=0, cache_dir=cache_dir / "bundles")


def test_typed_text_residual_and_outbox_are_not_readable_on_disk(config_file, bundle):
    config = load_client_config(config_file)
    add_secrets(config_file)
    fill_residual_and_outbox(config)
    bundle.write(config.device.state_dir / "bundle.fbz")  # `predict` runs beside the sealed stores
    out = fedboard("predict", "i am going to", "--config", str(config_file))
    assert out.returncode == 0 and "->" in out.stdout, out.stderr
    key_file = config.device.key_file
    assert key_file.parent == config_file.parent and config.device.state_dir not in key_file.parents
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert_no_plain_words(config.device.state_dir)
    rows, residual, updates = read_everything(config)
    assert rows == EXPECTED_ROWS
    np.testing.assert_array_equal(residual, RESIDUAL)
    assert updates == [b"update payload zanzibar"]


def test_a_plain_store_of_an_older_client_is_sealed_in_place(config_file):
    config = load_client_config(config_file)
    with TextStore(config.device.data) as plain:  # as an older client wrote it
        plain.add_many(SECRETS[:2])
        plain.add(SECRETS[2], app="notesapp")
    ResidualStore(config.device.state_dir).save(RESIDUAL)
    Outbox(config.device.state_dir / "outbox").put("fedboard/home/update/pi-1", 7, 2e9, b"update payload zanzibar")
    assert any(b"zanzibar" in p.read_bytes() for p in config.device.state_dir.rglob("*") if p.is_file())
    # the real client starts, seals every store, then fails to reach the (closed) broker port
    out = fedboard("client", "--config", str(config_file))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "broker" in out.stderr
    assert_no_plain_words(config.device.state_dir)
    rows, residual, updates = read_everything(config)
    assert rows == EXPECTED_ROWS
    np.testing.assert_array_equal(residual, RESIDUAL)
    assert updates == [b"update payload zanzibar"]


def test_a_wrong_key_is_a_clear_error_and_changes_nothing(config_file):
    config = load_client_config(config_file)
    add_secrets(config_file)
    fill_residual_and_outbox(config)
    key_file = config.device.key_file
    good = key_file.read_bytes()
    key_file.write_bytes(StoreKey.generate().encode())
    before = files_of(config.device.state_dir)
    for args in (("client", "add-text", "--config", str(config_file), "more text"),
                 ("client", "--config", str(config_file)),
                 ("client", "rotate-key", "--config", str(config_file))):
        out = fedboard(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and "another key" in out.stderr and "wrong store key" in out.stderr, \
            out.stderr
        assert files_of(config.device.state_dir) == before, args
        assert not key_source(config).staged_file.exists()
    key_file.write_bytes(good)
    assert read_everything(config)[0] == EXPECTED_ROWS


def test_a_missing_or_unprotected_key_is_a_clear_error_and_changes_nothing(config_file):
    config = load_client_config(config_file)
    add_secrets(config_file)
    key_file = config.device.key_file
    good = key_file.read_bytes()
    before = files_of(config.device.state_dir)
    key_file.unlink()
    for args in (("client", "add-text", "--config", str(config_file), "more"), ("client", "--config", str(config_file)),
                 ("client", "rotate-key", "--config", str(config_file))):
        out = fedboard(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert "no store key" in out.stderr and str(key_file) in out.stderr, out.stderr
        assert not key_file.exists()  # never replaced by a new key while sealed data exists
        assert files_of(config.device.state_dir) == before
    key_file.write_bytes(good)
    os.chmod(key_file, 0o644)
    out = fedboard("client", "add-text", "--config", str(config_file), "more")
    assert out.returncode == 2 and "chmod 600" in out.stderr, out.stderr
    assert files_of(config.device.state_dir) == before


def test_rotate_key_reseals_everything_and_the_old_key_no_longer_opens_it(config_file):
    config = load_client_config(config_file)
    add_secrets(config_file)
    fill_residual_and_outbox(config)
    old = config.device.key_file.read_bytes()
    out = fedboard("client", "rotate-key", "--config", str(config_file))
    assert out.returncode == 0, out.stderr
    assert "3 text(s), the residual, 1 outbox item(s) re-encrypted" in out.stdout, out.stdout
    assert config.device.key_file.read_bytes() != old and not key_source(config).staged_file.exists()
    assert stat.S_IMODE(config.device.key_file.stat().st_mode) == 0o600
    assert_no_plain_words(config.device.state_dir)
    rows, residual, updates = read_everything(config)
    assert rows == EXPECTED_ROWS and updates == [b"update payload zanzibar"]
    np.testing.assert_array_equal(residual, RESIDUAL)
    config.device.key_file.write_bytes(old)
    with pytest.raises(StoreKeyError, match="another key"):
        read_everything(config)


def check_add_text_waits(config_file: Path) -> None:
    """While a rotation runs, the keyboard's add-text is refused clearly (it holds the old key)."""
    out = fedboard("client", "add-text", "--config", str(config_file), "typed during the rotation")
    assert out.returncode == 2 and "key rotation is running" in out.stderr and "Traceback" not in out.stderr, \
        out.stderr


def run_until_paused(config_file: Path, step: str, while_paused=None) -> None:
    """rotate-key with the fault point at `step`: wait until it says it is there, then SIGKILL it."""
    env = {**os.environ, PAUSE_ENV: step}
    proc = subprocess.Popen([sys.executable, "-m", "edge_client.commands", "client", "rotate-key", "--config",
                             str(config_file)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    timer = threading.Timer(120, proc.kill)  # a hang fails the test instead of blocking it
    timer.start()
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if f"paused at {step}" in line:
                break
        assert any(f"paused at {step}" in line for line in lines), "".join(lines)
        if while_paused is not None:
            while_paused(config_file)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        timer.cancel()
        proc.kill()
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("step", ROTATION_STEPS)
def test_rotate_key_killed_at_any_step_leaves_everything_readable_and_finishes_when_run_again(config_file, step):
    config = load_client_config(config_file)
    add_secrets(config_file)
    out = fedboard("client", "add-text", "--config", str(config_file), *[f"filler text number {i}" for i in range(20)])
    assert out.returncode == 0, out.stderr
    fill_residual_and_outbox(config)
    expected = read_everything(config)
    old = config.device.key_file.read_bytes()
    run_until_paused(config_file, step, while_paused=check_add_text_waits if step == "staged" else None)
    staged = key_source(config).staged_file
    assert staged.exists() == (step != "switched")
    # killed: every record is readable (old key, staged key, or the new one once switched) ...
    rows, residual, updates = read_everything(config)
    assert rows == expected[0] and updates == expected[2]
    np.testing.assert_array_equal(residual, expected[1])
    assert_no_plain_words(config.device.state_dir)
    # ... the keyboard can still add text, and running rotate-key again finishes the job
    out = fedboard("client", "add-text", "--config", str(config_file), "typed after the crash")
    assert out.returncode == 0, out.stderr
    out = fedboard("client", "rotate-key", "--config", str(config_file))
    assert out.returncode == 0, out.stderr
    assert ("interrupted rotation finished" in out.stdout) == (step != "switched"), out.stdout
    assert not staged.exists() and config.device.key_file.read_bytes() != old
    rows, residual, updates = read_everything(config)
    assert rows == expected[0] + [("typed after the crash", None)] and updates == expected[2]
    np.testing.assert_array_equal(residual, expected[1])
    config.device.key_file.write_bytes(old)
    with pytest.raises(StoreKeyError):
        read_everything(config)


def test_the_service_reads_its_key_from_the_systemd_credential_and_never_writes_it(config_file, tmp_path):
    """What the unit's LoadCredentialEncrypted= gives the client: $CREDENTIALS_DIRECTORY/fedboard-store-key."""
    from edge_client.store_keys import CREDENTIAL_NAME

    unit = (ROOT / "edge_client" / "deploy" / "fedboard-client.service").read_text()
    assert f"LoadCredentialEncrypted={CREDENTIAL_NAME}:" in unit
    config = load_client_config(config_file)
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    key = StoreKey.generate()
    (credentials / CREDENTIAL_NAME).write_bytes(key.encode())
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)}
    out = fedboard("client", "add-text", "--config", str(config_file), *SECRETS[:2], env=env)
    assert out.returncode == 0, out.stderr
    assert not config.device.key_file.exists()  # the credential is the key: no key file made
    assert_no_plain_words(config.device.state_dir)
    with TextStore(config.device.data, keyring=Keyring(key)) as store:
        assert store.texts() == SECRETS[:2]
    # without the credential (and no key file) the data cannot be opened, and nothing is created
    out = fedboard("client", "add-text", "--config", str(config_file), "more")
    assert out.returncode == 2 and "no store key" in out.stderr, out.stderr
    assert not config.device.key_file.exists()
    out = fedboard("client", "rotate-key", "--config", str(config_file), env=env)
    assert out.returncode == 2 and "systemd credential" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_rotate_key_refuses_while_the_client_uses_the_stores(config_file):
    from edge_client.at_rest import StateLock

    config = load_client_config(config_file)
    add_secrets(config_file)
    old = config.device.key_file.read_bytes()
    before = files_of(config.device.state_dir)
    with StateLock(config.device.state_dir, exclusive=False):  # what a running client (or add-text) holds
        out = fedboard("client", "rotate-key", "--config", str(config_file))
    assert out.returncode == 2 and "stop the service" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert config.device.key_file.read_bytes() == old and not key_source(config).staged_file.exists()
    assert files_of(config.device.state_dir) == before
