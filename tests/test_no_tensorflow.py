"""The device side must run where TensorFlow is not installed (`fedboard[edge]`)."""
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE_MODELS = ["models.bundle", "models.runtime", "models.evaluate", "models.tokenizer", "models.partition",
                 "models.corpus", "models.synthetic", "models.task", "models.config", "models.bundle_cache"]


def device_modules() -> list[str]:
    names = []
    for package in ("edge_client", "protocol"):
        names.append(package)
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            names.append(info.name)
    return names + DEVICE_MODELS


def run_isolated(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_device_module_imports_without_tensorflow():
    modules = device_modules()
    assert "edge_client.device" in modules and "protocol.envelope" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
        "assert not bad, bad\n"
        "print('ok', len(sys.modules))\n"
    )
    proc = run_isolated(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_device_modules_import_with_tensorflow_made_unimportable():
    """Stronger than 'not imported': an import attempt anywhere would fail loudly."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib\n"
        f"for name in {device_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    proc = run_isolated(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
