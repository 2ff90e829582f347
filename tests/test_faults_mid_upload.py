"""Fault: 30 % of the cohort lose their connection in the middle of the update's PUBLISH.

Real Mosquitto, the real `fedboard aggregator` process, real DeviceClients with outboxes; a
proxy in front of the broker forwards half of the PUBLISH and closes both sides. The round's
goal (8 of a cohort of 10, 3 cut) cannot be met without re-sent updates, so this also shows
that a device re-sends after reconnecting and the aggregator counts it once.
"""

import pytest

from benchkit import load_bench



def _soak():
    return load_bench("soak_faults")


@pytest.mark.mosquitto
@pytest.mark.slow
def test_thirty_percent_cut_mid_upload_lose_nothing_and_every_round_commits(tmp_path, cache_dir):
    soak = _soak()
    inv, faults, wall_s, notes = soak.scenario_mid_upload(soak.SoakSettings(rounds=3, workdir=tmp_path, keep=True))
    assert inv.ok, inv.problems
    assert inv.last_round == 3 and inv.final_version == 3 and inv.committed_rounds == 3
    assert inv.updates_lost == 0 and inv.duplicates == 0 and inv.version_gaps == 0
    assert len(faults) == 3 * 3  # ceil(30 % of a cohort of 10) cut in each of the 3 rounds
    per_round = {}
    for f in faults:
        per_round.setdefault(f.round, set()).add(f.detail)
    assert sorted(per_round) == [1, 2, 3] and all(len(v) == 3 for v in per_round.values())
    # goal 8 > 7 uncut devices: each round took at least one re-sent update, accepted once
    ledger = soak.read_ledger(tmp_path / "mid-upload-seed0" / "state" / soak.LEDGER_FILE)
    for round_id, cut in per_round.items():
        assert cut & {d for r, d in ledger.accepted if r == round_id}, f"round {round_id} took no re-sent update"
    assert any("of the cut updates were accepted" in n for n in notes)


def test_the_proxy_cuts_only_large_chunks_and_only_when_told(tmp_path):
    """The fault itself: half a large chunk goes through, then both sides are closed."""
    import socket
    import threading

    soak = _soak()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    received = bytearray()
    done = threading.Event()

    def sink():
        conn, _ = server.accept()
        while chunk := conn.recv(65536):
            received.extend(chunk)
        done.set()

    threading.Thread(target=sink, daemon=True).start()
    decisions = []
    proxy = soak.CuttingProxy("dev", server.getsockname()[1], lambda d: decisions.append(d) or True)
    client = socket.create_connection(("127.0.0.1", proxy.port))
    client.sendall(b"x" * 100)  # small: a check-in, passed through
    import time

    time.sleep(0.2)
    client.sendall(b"y" * 4000)  # large: an update, cut in half
    assert done.wait(5)
    assert bytes(received) == b"x" * 100 + b"y" * 2000 and proxy.cuts == 1 and decisions == ["dev"]
    client.settimeout(5)
    assert client.recv(10) == b""  # the device sees its connection closed
    proxy.close()
    server.close()
