"""Peak RSS of the real device client refusing a bundle bomb delivered over a real broker.

A 429 kB bundle whose manifest.json inflated to 400 MB once drove the client to 863 MB, over
the `MemoryMax=300M` of edge_client/deploy/fedboard-client.service (a Pi would kill it in a
loop). Here a Mosquitto runs with exactly the configuration `fedboard broker-config` writes;
a signed global model and a bomb are published retained with the aggregator's credentials
(as a compromised or buggy publisher would); the real `fedboard client` (its own process,
TensorFlow blocked) bootstraps from them and must refuse. Variants:

- unsigned: the signed model names the genuine bundle; a bomb sits on the bundle topic
  (refused on the bytes' sha256, unopened);
- signed-manifest: the signed model names the bomb itself; manifest.json inflates to
  `--inflate-mb` while its zip header claims 1,000 bytes (refused at MAX_MANIFEST_BYTES);
- signed-honest: the same, with a zip header that tells the truth (refused on the header);
- signed-member: a valid manifest that says model.tflite is 64 bytes; it inflates to
  `--inflate-mb` (refused at 64 bytes + one chunk).

Peak RSS is the client's own VmHWM, printed at exit (getrusage of a vfork+exec child holds
the parent's peak too). Target: every variant under 300 MB, exit status 2, one clear line.

    python bench/bundle_bomb.py [--inflate-mb 400] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MEMORY_MAX_MB = 300  # edge_client/deploy/fedboard-client.service
FLEET = "home"
VARIANTS = ("unsigned", "signed-manifest", "signed-honest", "signed-member")


# -- zip bombs -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZipEntry:
    """One member as raw deflate bytes, with the sizes its headers claim (which may lie)."""

    name: str
    compressed: bytes
    crc: int
    claimed_size: int
    method: int = 8  # deflate


@functools.lru_cache(maxsize=8)
def deflate_bomb(size: int, fill: bytes = b" ") -> tuple[bytes, int]:
    """`size` bytes of `fill` as a raw deflate stream (about 1/1000 of the size) and their crc32."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = fill * (1 << 20)
    parts, crc, left = [], 0, size
    while left > 0:
        piece = chunk[:left]
        crc = zlib.crc32(piece, crc)
        parts.append(comp.compress(piece))
        left -= len(piece)
    parts.append(comp.flush())
    return b"".join(parts), crc


def deflated(name: str, data: bytes) -> ZipEntry:
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    return ZipEntry(name, comp.compress(data) + comp.flush(), zlib.crc32(data), len(data))


def raw_zip(entries: list[ZipEntry]) -> bytes:
    """A zip written by hand, so its headers can claim any size (zipfile writes only the truth)."""
    out, central = bytearray(), bytearray()
    for e in entries:
        name = e.name.encode()
        offset = len(out)
        out += struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, e.method, 0, 0x21, e.crc,
                           len(e.compressed), e.claimed_size, len(name), 0) + name + e.compressed
        central += struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, e.method, 0, 0x21, e.crc,
                               len(e.compressed), e.claimed_size, len(name), 0, 0, 0, 0, 0o644 << 16,
                               offset) + name
    start = len(out)
    out += central
    out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), start, 0)
    return bytes(out)


def small_manifest(tflite_size: int) -> tuple[dict, dict[str, bytes]]:
    """A manifest that passes every check before the members are inflated, and the small members."""
    import numpy as np

    from models.bundle import BUNDLE_FORMAT, weight_layout
    from models.config import ModelConfig

    config = ModelConfig(vocab_size=12, embed_dim=4, units=4, seq_len=4, batch_size=2)
    words = ["<pad>", "<oov>", "<bos>", "<eos>"] + [f"w{i}" for i in range(config.vocab_size - 4)]
    vocab = json.dumps({"format": "fedboard-vocab/1", "words": words}, sort_keys=True,
                       separators=(",", ":")).encode()
    weights = np.zeros(config.param_count, "<f4").tobytes()
    members = {"vocab.json": vocab, "weights.f32": weights}
    manifest = {"format": BUNDLE_FORMAT, "model": "cifg", "config": config.to_dict(),
                "param_count": config.param_count, "layout": [s.to_dict() for s in weight_layout(config)],
                "weights_dtype": "<f4",
                "members": {"model.tflite": {"sha256": "0" * 64, "size": tflite_size},
                            **{n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                               for n, d in members.items()}}}
    return manifest, members


def bomb_bundle(kind: str, inflated: int) -> bytes:
    """A bundle that inflates to about `inflated` bytes: kind manifest, manifest-honest or member."""
    small_members = {"model.tflite": b"\0\0\0\0TFL3" + b"\0" * 54, "vocab.json": b"{}", "weights.f32": b""}
    if kind in ("manifest", "manifest-honest"):
        stream, crc = deflate_bomb(inflated)
        claimed = inflated if kind == "manifest-honest" else 1000
        entries = [ZipEntry("manifest.json", stream, crc, claimed)]
        entries += [deflated(n, d) for n, d in small_members.items()]
        return raw_zip(entries)
    if kind == "member":
        manifest, members = small_manifest(64)
        stream, crc = deflate_bomb(inflated, b"\0")
        entries = [deflated("manifest.json", json.dumps(manifest).encode()),
                   ZipEntry("model.tflite", stream, crc, 64)]
        entries += [deflated(n, d) for n, d in members.items()]
        return raw_zip(entries)
    raise ValueError(f"unknown bomb kind {kind!r}")


# -- a fleet on a generated broker ---------------------------------------------------------------------------
class FleetBroker:
    """Mosquitto running exactly the configuration `fedboard broker-config` writes, and a signing key."""

    def __init__(self, directory: Path, devices: int = 2) -> None:
        from aggregator.broker_config import BrokerSetup, device_ids, write_broker_config
        from device_sim.mosquitto import MosquittoBroker, free_port
        from protocol.signing import load_private_key, write_keypair

        self.directory = Path(directory)
        self.port = free_port()
        self.devices = device_ids(devices)
        setup = BrokerSetup(fleet=FLEET, devices=self.devices, port=self.port, bind="127.0.0.1",
                            run_as_user="root" if os.geteuid() == 0 else None)
        files = write_broker_config(self.directory / "broker", setup)
        text = files.conf.read_text()

        class Generated(MosquittoBroker):
            def config_text(self) -> str:  # exactly the generated file
                return text

        self.broker = Generated(port=self.port)
        self.credentials = files.credentials
        private, self.public_key = write_keypair(self.directory / "keys")
        self.private_key = load_private_key(private)

    def __enter__(self) -> FleetBroker:
        self.broker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.broker.stop()

    def settings(self, user: str = "aggregator"):
        from protocol.transport import MqttSettings

        return MqttSettings(host="127.0.0.1", port=self.port, username=user,
                            password=self.credentials[user].read_text().strip())

    def publish(self, topic: str, data: bytes, *, retain: bool = True, timeout_s: float = 30.0) -> None:
        """Publish (QoS 1) with the aggregator's credentials and wait for the broker's PUBACK."""
        import paho.mqtt.client as mqtt

        from protocol.transport import configure_client

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"publisher-{os.getpid()}",
                             protocol=mqtt.MQTTv5)
        configure_client(client, self.settings())
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        try:
            info = client.publish(topic, data, qos=1, retain=retain)
            info.wait_for_publish(timeout_s)
            if not info.is_published():
                raise TimeoutError(f"the broker did not acknowledge {topic} within {timeout_s} s")
        finally:
            client.disconnect()
            client.loop_stop()

    def publish_model(self, *, version: int, bundle_sha256: str, file_sha256: str, file_bytes: int,
                      weights_dim: int = 64) -> None:
        """A signed global model naming a bundle (identity, and the sha256 and size of its bytes)."""
        import numpy as np

        from aggregator.publisher import build_model_message
        from protocol.topics import FleetTopics

        message = build_model_message(
            fleet=FLEET, model_id="cifg-" + bundle_sha256[:12], version=version,
            weights=np.zeros(weights_dim, np.float32), codec_spec="f32", private_key=self.private_key,
            extra={"bundle_sha256": bundle_sha256, "bundle_file_sha256": file_sha256, "bundle_file_bytes": file_bytes})
        self.publish(FleetTopics(FLEET).model, message.envelope_bytes)

    def publish_bundle_bytes(self, data: bytes, model_id: str = "cifg-bomb") -> None:
        from aggregator.publisher import bundle_envelope
        from protocol.topics import FleetTopics

        self.publish(FleetTopics(FLEET).bundle, bundle_envelope(FLEET, data, model_id))

    def client_toml(self, directory: Path, device: str, *, extra: str = "") -> Path:
        """A client.toml for `device` (state in `directory`/state), eligible on any Linux box."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "client.toml"
        path.write_text(f"""
[device]
id = "{device}"
fleet = "{FLEET}"
state_dir = "state"
data = "state/texts.db"

[broker]
host = "127.0.0.1"
port = {self.port}
username = "{device}"
password_file = "{self.credentials[device]}"
keepalive_s = 10
bootstrap_timeout_s = 15

[trust]
aggregator_public_key = "{self.public_key}"

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


# -- the real client in its own process ---------------------------------------------------------------------
CLIENT_CODE = """\
import atexit, sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'):
            raise ImportError('TensorFlow is blocked on the device: ' + name)
sys.meta_path.insert(0, Block())
def peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            sys.stderr.write('fedboard-vmhwm-kb ' + line.split()[1] + '\\n')
atexit.register(peak)
from edge_client.commands import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class ClientRun:
    code: int
    stderr: str
    peak_rss_mb: float
    wall_s: float
    stdout: str = ""

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if not line.startswith("fedboard-vmhwm-kb")]


def client_command(args: list[str], prefix: tuple[str, ...] = ()) -> list[str]:
    """argv of `fedboard <args>` run by the device's own entry (TensorFlow blocked, VmHWM at exit)."""
    return [*prefix, sys.executable, "-c", CLIENT_CODE, *args]


def run_client(args: list[str], *, cwd: Path | None = None, timeout_s: float = 120.0,
               prefix: tuple[str, ...] = ()) -> ClientRun:
    """Run `fedboard <args>` to its end; its exit status, stderr and peak RSS."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    proc = subprocess.run(client_command(args, prefix), cwd=cwd or REPO, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    peak = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("fedboard-vmhwm-kb")]
    return ClientRun(proc.returncode, proc.stderr, peak[-1] / 1024 if peak else float("nan"),
                     time.monotonic() - started, proc.stdout)


def refuse_bomb(fleet: FleetBroker, variant: str, directory: Path, inflate_bytes: int) -> ClientRun:
    """Publish `variant`'s model and bomb retained, then bootstrap a fresh client from them."""
    kind = {"unsigned": "manifest", "signed-manifest": "manifest", "signed-honest": "manifest-honest",
            "signed-member": "member"}[variant]
    bomb = bomb_bundle(kind, inflate_bytes)
    if variant == "unsigned":  # the model names another bundle: the genuine one
        genuine = b"the genuine bundle's bytes"
        fleet.publish_model(version=1, bundle_sha256="a" * 64, file_sha256=hashlib.sha256(genuine).hexdigest(),
                            file_bytes=len(bomb))
    else:  # the signed model names the bomb itself
        fleet.publish_model(version=1, bundle_sha256="b" * 64, file_sha256=hashlib.sha256(bomb).hexdigest(),
                            file_bytes=len(bomb))
    fleet.publish_bundle_bytes(bomb)
    toml = fleet.client_toml(directory / variant, fleet.devices[0])
    return run_client(["client", "--config", str(toml)], cwd=directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inflate-mb", type=int, default=400, help="what each bomb inflates to")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedboard-bomb-") as tmp, FleetBroker(Path(tmp)) as fleet:
        for variant in VARIANTS:
            run = refuse_bomb(fleet, variant, Path(tmp), args.inflate_mb * 2**20)
            bomb_bytes = len(bomb_bundle({"unsigned": "manifest", "signed-manifest": "manifest",
                                          "signed-honest": "manifest-honest", "signed-member": "member"}[variant],
                                         args.inflate_mb * 2**20))
            results.append({"variant": variant, "bomb_bytes": bomb_bytes, "inflates_to_mb": args.inflate_mb,
                            "exit": run.code, "peak_rss_mb": round(run.peak_rss_mb, 1), "wall_s": round(run.wall_s, 2),
                            "error": (run.lines or [""])[-1][-300:]})
            print(f"{variant:<16} bomb {bomb_bytes:>9,} B -> {args.inflate_mb} MB: exit {run.code}, "
                  f"peak RSS {run.peak_rss_mb:.1f} MB, {run.wall_s:.1f} s\n    {(run.lines or [''])[-1][-200:]}")
    ok = all(r["exit"] == 2 and r["peak_rss_mb"] < MEMORY_MAX_MB for r in results)
    report = {"bench": "bundle_bomb", "memory_max_mb": MEMORY_MAX_MB, "ok": ok, "results": results,
              "command": "python bench/bundle_bomb.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
