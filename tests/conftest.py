import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

# CI must never spend minutes shrinking a counterexample: it reports the failing example as found
# (with its reproduction blob) and moves on. Locally the default profile shrinks as usual.
settings.register_profile(
    "ci", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow],
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.explain),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture
def mosquitto():
    """A private Mosquitto on a free 127.0.0.1 port (`.ci/run` installs the binary)."""
    from device_sim.mosquitto import MosquittoBroker, find_mosquitto

    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the README's test command (bash .ci/run), which installs it")
    with MosquittoBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One bundle cache for the whole test session, so tiny models are exported once."""
    path = tmp_path_factory.mktemp("fedboard-cache")
    os.environ["FEDBOARD_CACHE"] = str(path)
    return path
