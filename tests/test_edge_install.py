"""The device runs with only `fedboard[edge]` installed: no TensorFlow, no simulator packages.

A virtual environment WITHOUT the system site-packages receives exactly the files of the edge
extra's dependency closure (each distribution's RECORD, resolved from pyproject.toml by
bench/edge_install_size.py and linked from this machine's installation: offline, about a
second, where a pip install would need the network), and the project on PYTHONPATH, as an
installed wheel would put it. Nothing else is importable there: TensorFlow is not hidden by a
hook, it is absent. In it the real `fedboard client` trains a round against Mosquitto and an
aggregator run by this test, and `fedboard predict` answers from the model the client saved.
Every module either process imported must come from the edge closure, the standard library
or the project.
"""
import json
import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
import venv
from pathlib import Path

import pytest

from benchkit import load_bench

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_EDGE = ("tensorflow", "keras", "tf_keras", "amqtt", "matplotlib", "prometheus_client", "h5py", "scipy")
# The wheel's packages (`fedboard[edge]` installs all of them; only their dependencies differ).
PROJECT_PACKAGES = {"edge_client", "protocol", "models", "aggregator", "device_sim"}
KEYBOARD = ["i am going to the park", "see you at the station at six", "we are at home now",
            "can you call me later", "the cat is on the sofa", "thanks for the lovely dinner"]


sizes = load_bench("edge_install_size")


def build_edge_venv(directory: Path) -> tuple[Path, Path, set[str]]:
    """A venv holding the edge closure's installed files only: its python, its site-packages, the import names."""
    venv.EnvBuilder(system_site_packages=False, with_pip=False, symlinks=True, clear=True).create(directory)
    python = directory / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    closure = sizes.dependency_closure("edge")
    assert not closure.missing, f"edge dependencies not installed here: {closure.missing}"
    for dist in closure.distributions.values():
        for item in dist.files or []:
            parts = Path(str(item)).parts
            if not parts or parts[0] == "..":
                continue  # console scripts and data outside site-packages
            source = Path(dist.locate_file(item))
            if not source.is_file():
                continue
            target = purelib.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(source)
    return python, purelib, sizes.closure_import_names(closure)


def venv_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(ROOT), PYTHONNOUSERSITE="1", TF_CPP_MIN_LOG_LEVEL="2")
    return env


# Registered in sys.modules by extension modules of closure packages under names of their own:
# cryptography's Rust binding, and the shared runtime every Cython-compiled extension (numpy) adds.
EXTENSION_SUBMODULES = {"_openssl": "cryptography", "cython_runtime": "numpy"}
CYTHON_SHARED_ABI = "_cython_"


def foreign_modules(loaded: dict[str, str | None], purelib: Path, closure_names: set[str]) -> dict[str, str | None]:
    """The modules (name -> file) that came from neither the edge closure, the stdlib nor the project.

    A module with a file must have been loaded from the venv's site-packages (which holds the
    closure only), the standard library or the repository; one without a file must be built in,
    part of the stdlib, or one of the closure's own (e.g. registered by its extension).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    foreign = {}
    for name, file in loaded.items():
        top = name.split(".")[0]
        if file is not None:
            path = Path(file)
            if not any(path.is_relative_to(base) for base in (purelib, stdlib, ROOT)):
                foreign[name] = file
            elif path.is_relative_to(ROOT) and top not in PROJECT_PACKAGES:
                foreign[name] = file
        elif not (top in sys.builtin_module_names or top in sys.stdlib_module_names or top in closure_names
                  or EXTENSION_SUBMODULES.get(top) in closure_names or top == "__main__"
                  or (top.startswith(CYTHON_SHARED_ABI) and "numpy" in closure_names)):
            foreign[name] = None
    return foreign


# A device program run in the venv: `argv` through the real `fedboard` entry point; at exit
# (also after SIGTERM) every imported module and the file it came from is written to `out`.
RUNNER = textwrap.dedent("""
    import atexit, json, sys
    out, argv = sys.argv[1], sys.argv[2:]
    def dump():
        with open(out, "w") as fh:
            json.dump({n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}, fh)
    atexit.register(dump)
    from device_sim.cli import main
    sys.exit(main(argv))
""")


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory):
    started = time.monotonic()
    built = build_edge_venv(tmp_path_factory.mktemp("edge-venv") / "venv")
    print(f"edge venv built in {time.monotonic() - started:.1f} s")
    return built


def test_the_edge_venv_holds_the_closure_and_nothing_else(edge_venv):
    python, purelib, names = edge_venv
    assert {"numpy", "paho", "ai_edge_litert", "zstandard", "cryptography", "psutil"} <= names
    assert not names & set(OUTSIDE_EDGE)
    code = ("import importlib.util, json, sys\n"
            f"print(json.dumps({{n: importlib.util.find_spec(n) is not None for n in {sorted(OUTSIDE_EDGE + ('numpy', 'paho', 'ai_edge_litert'))!r}}}))\n")
    proc = subprocess.run([str(python), "-c", code], env=venv_env(), cwd="/", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout)
    assert found.pop("numpy") and found.pop("paho") and found.pop("ai_edge_litert")
    assert not any(found.values()), f"importable in the edge venv although outside the edge extra: {found}"


def test_every_device_module_imports_in_the_edge_venv(edge_venv):
    python, purelib, names = edge_venv
    modules = ["device_sim.cli", "edge_client.commands"]
    for package in ("edge_client", "protocol"):
        modules.append(package)
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            if rel.name != "__init__":
                modules.append(".".join(rel.parts))
    modules += ["models.bundle", "models.runtime", "models.evaluate", "models.tokenizer", "models.partition",
                "models.corpus", "models.synthetic", "models.task", "models.config", "models.bundle_cache"]
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps({n: getattr(m, '__file__', None) for n, m in list(sys.modules.items())}))\n")
    proc = subprocess.run([str(python), "-c", code], env=venv_env(), cwd="/", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout)
    assert "edge_client.device" in loaded and "ai_edge_litert.interpreter" in loaded
    assert not foreign_modules(loaded, purelib, names)


@pytest.mark.slow
@pytest.mark.mosquitto
def test_fedboard_client_trains_a_round_and_predicts_with_only_the_edge_extra(edge_venv, tmp_path, cache_dir):
    from aggregator.server import Aggregator, AggregatorConfig
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from device_sim.mosquitto import MosquittoBroker, find_mosquitto
    from edge_client.linux_platform import LinuxPlatform
    from models.bundle_cache import get_or_export_bundle
    from models.config import ModelConfig
    from models.tokenizer import build_vocabulary
    from protocol.signing import write_keypair
    from protocol.transport import MqttSettings

    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the README's test command (bash .ci/run), which installs it")
    if not LinuxPlatform(idle_after_s=0).read().link_up:
        pytest.skip("no network link on this machine: the real client's Linux platform would never be eligible")
    python, purelib, names = edge_venv
    vocab = build_vocabulary(KEYBOARD, size=100)
    config = ModelConfig(vocab_size=vocab.size, embed_dim=8, units=16, seq_len=20, batch_size=16)
    bundle = get_or_export_bundle(config, vocab.to_json(), seed=0, cache_dir=cache_dir / "bundles")
    private_path, public_path = write_keypair(tmp_path / "keys")
    private_key = load_pem_private_key(private_path.read_bytes(), None)

    with MosquittoBroker() as broker:
        toml = tmp_path / "client.toml"
        toml.write_text(textwrap.dedent(f"""
            [device]
            id = "pi-edge"
            fleet = "edge"
            state_dir = "state"
            data = "state/texts.db"
            [broker]
            host = "127.0.0.1"
            port = {broker.port}
            keepalive_s = 10
            bootstrap_timeout_s = 20
            [trust]
            aggregator_public_key = "{public_path}"
            [policy]
            require_idle = false
            require_unmetered = false
            max_cpu_temp_c = 200
            min_free_memory_mb = 0
            [training]
            threads = 1
        """))

        def fedboard(*argv: str, modules: Path, wait: bool = True):
            cmd = [str(python), "-c", RUNNER, str(modules), *argv]
            if wait:
                return subprocess.run(cmd, env=venv_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
            return subprocess.Popen(cmd, env=venv_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)

        added = fedboard("client", "add-text", "--config", str(toml), *(KEYBOARD * 5), modules=tmp_path / "m-add.json")
        assert added.returncode == 0 and "added 30 text(s)" in added.stdout, added.stdout + added.stderr

        settings = MqttSettings(host="127.0.0.1", port=broker.port, keepalive_s=10)
        agg = Aggregator(AggregatorConfig(fleet="edge", clients_per_round=1, expected_checkins=1, checkin_window_s=60.0,
                                          report_deadline_s=60.0, codec="q8", local_epochs=2),
                         bundle, settings, private_key, client_id="aggregator-edge")
        agg.start()
        client = fedboard("client", "--config", str(toml), modules=tmp_path / "m-client.json", wait=False)
        try:
            result = agg.run_round()
        finally:
            client.send_signal(signal.SIGTERM)
            try:
                output, _ = client.communicate(timeout=30)
            finally:
                if client.poll() is None:
                    client.kill()
                agg.stop()
        assert result.committed and result.participants == 1 and not result.rejected, (result, output[-3000:])
        assert client.returncode == 0, output[-3000:]
        assert "ack" in output and "accepted=True" in output, output[-3000:]

    # `fedboard predict` runs from the state the client saved (bundle, signed model), broker gone.
    predicted = fedboard("predict", "i am going to", "--config", str(toml), modules=tmp_path / "m-predict.json")
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    line = predicted.stdout.splitlines()[0]
    words = line.split("->", 1)[1].split(",")
    assert len(words) == 3 and all(w.strip() in vocab.words for w in words), line
    assert "device's latest global model" in predicted.stdout

    for dump in ("m-add.json", "m-client.json", "m-predict.json"):
        loaded = json.loads((tmp_path / dump).read_text())
        assert not foreign_modules(loaded, purelib, names), dump
        assert "ai_edge_litert.interpreter" in loaded or dump == "m-add.json"
