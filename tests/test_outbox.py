"""Outbox: updates survive a restart until acknowledged; corrupt files never crash the client."""
import logging
import os
import time

import pytest

from edge_client.outbox import Outbox, OutboxCorrupt, decode_item


def test_pending_item_survives_a_restart(tmp_path):
    box = Outbox(tmp_path / "outbox")
    deadline = time.time() + 300
    item_id = box.put("fedboard/home/update/pi-1", 7, deadline, b"\x00update-bytes\xff")
    del box  # the process dies before the PUBACK

    again = Outbox(tmp_path / "outbox")
    [item] = again.pending()
    assert item.id == item_id
    assert (item.topic, item.round_id, item.data) == ("fedboard/home/update/pi-1", 7, b"\x00update-bytes\xff")
    assert item.deadline_unix == deadline and abs(item.created_unix - time.time()) < 60
    assert not item.expired() and item.expired(deadline + 1)
    again.mark_sent(item_id)
    assert again.pending() == [] and len(Outbox(tmp_path / "outbox")) == 0
    again.mark_sent(item_id)  # a second PUBACK callback is harmless


def test_files_are_private_and_written_atomically(tmp_path):
    box = Outbox(tmp_path / "o")
    box.put("t/u", 1, time.time() + 10, b"x" * 1000)
    files = list((tmp_path / "o").iterdir())
    assert len(files) == 1 and files[0].suffix == ".fbo"  # no temp file left behind
    assert files[0].stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o700


def test_pending_is_oldest_first(tmp_path):
    box = Outbox(tmp_path)
    ids = [box.put("t", r, time.time() + 60, bytes([r])) for r in range(5)]
    assert [item.id for item in box.pending()] == ids
    assert [item.round_id for item in box.pending()] == list(range(5))


def test_corrupt_files_are_logged_and_removed(tmp_path, caplog):
    box = Outbox(tmp_path)
    good = box.put("t/good", 1, time.time() + 60, b"good")
    flipped = box.put("t/flipped", 2, time.time() + 60, b"payload that will rot")
    torn = box.put("t/torn", 3, time.time() + 60, b"payload cut short")
    path = tmp_path / f"{flipped}.fbo"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40
    path.write_bytes(bytes(raw))
    (tmp_path / f"{torn}.fbo").write_bytes((tmp_path / f"{torn}.fbo").read_bytes()[:-5])
    (tmp_path / "00000000000000000001-junk.fbo").write_bytes(b"not an outbox file at all, only some junk bytes")
    (tmp_path / ".00000000000000000002-x.tmp").write_bytes(b"half written")

    with caplog.at_level(logging.WARNING, logger="edge_client.outbox"):
        restarted = Outbox(tmp_path)
        items = restarted.pending()
    assert [item.id for item in items] == [good]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{good}.fbo"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "crc32" in messages and "header announces" in messages and "magic" in messages


def test_decode_refuses_every_kind_of_damage():
    with pytest.raises(OutboxCorrupt, match="shorter"):
        decode_item("x", b"FBOX")
    with pytest.raises(OutboxCorrupt, match="magic"):
        decode_item("x", b"XXXX" + bytes(40))


def test_oldest_items_are_evicted_beyond_the_limits(tmp_path, caplog):
    box = Outbox(tmp_path, max_items=3, max_bytes=10_000)
    with caplog.at_level(logging.WARNING, logger="edge_client.outbox"):
        ids = [box.put("t", r, time.time() + 60, b"u" * 100) for r in range(5)]
    assert [item.id for item in box.pending()] == ids[2:]
    assert sum("evicting" in r.getMessage() for r in caplog.records) == 2

    box = Outbox(tmp_path / "bytes", max_items=16, max_bytes=2500)
    ids = [box.put("t", r, time.time() + 60, b"b" * 1000) for r in range(3)]
    assert [item.id for item in box.pending()] == ids[1:]  # 3 x ~1040 bytes > 2500
    assert box.total_bytes <= 2500
    with pytest.raises(ValueError, match="does not fit"):
        box.put("t", 9, time.time() + 60, b"z" * 3000)


def test_drop_logs_the_reason(tmp_path, caplog):
    box = Outbox(tmp_path)
    item_id = box.put("t", 4, time.time() - 1, b"late")
    [item] = box.pending()
    assert item.expired()
    with caplog.at_level(logging.INFO, logger="edge_client.outbox"):
        box.drop(item_id, "round 4 closed")
    assert box.pending() == []
    assert any("round 4 closed" in r.getMessage() for r in caplog.records)


def test_bad_arguments_are_refused(tmp_path):
    box = Outbox(tmp_path)
    with pytest.raises(ValueError):
        box.put("", 1, 0.0, b"")
    with pytest.raises(ValueError):
        box.put("t", -1, 0.0, b"")
    with pytest.raises(ValueError):
        box.mark_sent("../etc/passwd")
    with pytest.raises(ValueError):
        Outbox(tmp_path, max_items=0)
    assert os.listdir(tmp_path) == []
