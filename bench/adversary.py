"""The attacks of issue 14 against a live fleet, and what each did (README, Reliability).

Every attack runs against Mosquitto started with the `fedboard broker-config` output, real
`fedboard aggregator` processes (and a scale-out worker where it applies) and devices that log in
with their own passwords (device_sim/adversary.py). Per attack it prints: the outcome, how far the
committed model moved against the honest devices' mean update (cosine, and the norm ratio: 1.0 / 1.0
is exactly the honest step), and the updates the broker confirmed to honest devices that are
missing from the committed model ("lost").

    python bench/adversary.py [--only takeover,lease,...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_sim.adversary import (ROOT, LiveBroker, ScriptedDevice, cosine, stand_in_bundle,  # noqa: E402
                                  start_aggregator, wait_until)
from protocol.signing import write_keypair  # noqa: E402
from protocol.topics import FleetTopics  # noqa: E402

HONEST = 3
ROUND = ["--clients-per-round", str(HONEST), "--over-selection", "1.0", "--expected-checkins", str(HONEST),
         "--checkin-window-s", "60", "--report-deadline-s", "60", "--codec", "f32", "--lease-interval-s", "1",
         "--server-optimizer", "fedavg", "--server-lr", "1.0", "--rounds", "1"]  # step = the weighted mean


@dataclass
class Row:
    attack: str
    outcome: str
    cosine: float = float("nan")   # committed step vs the honest devices' mean update
    norm_ratio: float = float("nan")
    lost: int | str = 0            # honest updates the broker confirmed that the committed model lacks
    detail: str = ""


class Stage:
    """One attack's fleet: a fresh broker, the bundle and key, and everything to stop afterwards."""

    def __init__(self, root: Path, name: str, devices: int = 5, workers: int = 0) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.bundle = stand_in_bundle()
        self.bundle_path = self.bundle.write(self.dir / "model.fbz")
        self.key, _ = write_keypair(self.dir / "keys")
        self.broker = LiveBroker(self.dir, name.replace("_", "-"), devices, workers=workers)
        self.things: list = []
        self.dim = self.bundle.param_count
        self.direction = np.random.default_rng(7).normal(0, 1, self.dim)
        self.direction /= np.linalg.norm(self.direction)

    def aggregator(self, name: str, *flags: str, user: str = "aggregator", key: bool = True):
        proc = start_aggregator(self.broker, self.dir, name, self.bundle_path, self.key if key else None, *flags,
                                user=user)
        self.things.append(proc)
        return proc

    def worker(self):
        return self.aggregator("worker", "--worker", "w1", "--share-group", self.broker.share_group,
                               user=self.broker.workers[0], key=False)

    def devices(self, users: list[str], **kw) -> list[ScriptedDevice]:
        devices = [ScriptedDevice(self.broker, u, **kw) for u in users]
        self.things.extend(devices)
        return devices

    def honest_update(self, i: int) -> np.ndarray:
        noise = np.random.default_rng(100 + i).normal(0, 1, self.dim) / np.sqrt(self.dim)
        return (0.01 * (self.direction + 0.3 * noise)).astype(np.float32)

    def play_round(self, devices: list[ScriptedDevice], round_id: int = 1, base: int = 0) -> list[np.ndarray]:
        for d in devices:
            wait_until(lambda d=d: d.selected(round_id), 90, f"{d.user} selected for round {round_id}")
        updates = [self.honest_update(i) for i in range(len(devices))]
        for d, u in zip(devices, updates):
            d.send_update(round_id, base, u)
        return updates

    def moved(self, observer: ScriptedDevice, honest: list[np.ndarray], version: int = 1,
              before: np.ndarray | None = None) -> tuple[float, float]:
        """Cosine and norm ratio of the committed step against the honest mean (nan: nothing committed)."""
        try:
            wait_until(lambda: (observer.weights(self.dim) or (-1,))[0] >= version, 30, f"model v{version}")
        except TimeoutError:
            return float("nan"), float("nan")
        w = observer.weights(self.dim)[1]
        step = w - (self.bundle.initial_weights if before is None else before)
        target = np.mean(honest, axis=0)
        return round(cosine(step, target), 4), round(float(np.linalg.norm(step) / np.linalg.norm(target)), 4)

    def lost(self, honest_devices: list[ScriptedDevice], committed: int, attackers_counted: int = 0) -> int:
        confirmed = sum(1 for d in honest_devices if d.confirmed)
        return max(0, confirmed - (committed - attackers_counted))

    def close(self) -> None:
        for thing in reversed(self.things):
            try:
                (thing.stop if hasattr(thing, "stop") else thing.close)()
            except Exception:  # noqa: BLE001 - best effort teardown of a bench
                pass
        self.broker.stop()


def _committed(log: str, round_id: int = 1) -> int:
    """Reports of a committed round from `fedboard aggregator`'s output (0: not committed)."""
    for line in log.splitlines():
        if line.startswith(f"round {round_id}: committed"):
            return int(line.split()[4].split("/")[0])
    return 0


# -- the attacks ------------------------------------------------------------------------------------------
def takeover(stage: Stage) -> Row:
    agg = stage.aggregator("agg", "--checkpoint-dir", str(stage.dir / "state"), *ROUND)
    agg.wait_for("running")
    honest = stage.devices(stage.broker.devices[:HONEST])
    wait_until(lambda: all(d.selected(1) for d in honest), 60, "cohort")
    start = time.monotonic()
    for i in range(8):  # the 8 takeovers in 11 s, clean start and resume alternating
        thief = ScriptedDevice(stage.broker, stage.broker.devices[HONEST], client_id=f"aggregator-{stage.broker.fleet}",
                               subscribe=False, clean_start=i % 2 == 0)
        time.sleep(1.2)
        thief.close()
    updates = stage.play_round(honest)
    agg.proc.wait(90)
    log = agg.text()
    cos, ratio = stage.moved(honest[0], updates)
    drops = log.count("disconnected from the broker")
    return Row("2 session takeover: a device connects 8x with client id aggregator-<fleet>",
               f"aggregator {'kept' if drops == 0 else 'LOST'} its session ({drops} disconnects in "
               f"{time.monotonic() - start:.0f} s); "
               f"round {'committed' if _committed(log) else 'NOT committed'}", cos, ratio,
               stage.lost(honest, _committed(log)))


def second_aggregator(stage: Stage) -> Row:
    first = stage.aggregator("first", "--checkpoint-dir", str(stage.dir / "a"), *ROUND)
    first.wait_for("running")
    second = stage.aggregator("second", "--checkpoint-dir", str(stage.dir / "b"), *ROUND)
    code = second.proc.wait(90)
    honest = stage.devices(stage.broker.devices[:HONEST])
    updates = stage.play_round(honest)
    first.proc.wait(90)
    cos, ratio = stage.moved(honest[0], updates)
    said = next((line for line in second.text().splitlines() if "STOPPED" in line), "")[:90]
    return Row("2 second aggregator on the fleet (own state directory)",
               f"second exits {code} ({said}...); first commits {_committed(first.text())}/{HONEST}", cos, ratio,
               stage.lost(honest, _committed(first.text())))


def shared_group(stage: Stage, leaked: bool) -> Row:
    coordinator = stage.aggregator("coord", "--checkpoint-dir", str(stage.dir / "s"), "--workers", "1", *ROUND)
    worker = stage.worker()
    worker.wait_for("intake worker w1")
    coordinator.wait_for("running")
    root = FleetTopics(stage.broker.fleet).root
    group = stage.broker.share_group if leaked else "fedboard-agg"
    thieves = stage.devices(stage.broker.devices[HONEST:HONEST + 2], checkin=False, subscribe=False)
    for t in thieves:
        t.client.subscribe([(f"$share/{group}/{root}/update/+", 1)])
    time.sleep(0.5)
    honest = stage.devices(stage.broker.devices[:HONEST], resend_after_s=2.0)
    updates = stage.play_round(honest)
    coordinator.proc.wait(120)
    cos, ratio = stage.moved(honest[0], updates)
    resends = sum(d.resends for d in honest)
    committed = _committed(coordinator.text())
    name = ("3 shared-subscription hijack, group name leaked: 2 devices join the workers' group" if leaked else
            "3 shared-subscription hijack: 2 devices subscribe $share/fedboard-agg/.../update/+")
    return Row(name, f"round {'committed' if committed else 'NOT committed'} {committed}/{HONEST}; "
               f"{resends} re-sends by devices without an Ack", cos, ratio, stage.lost(honest, committed))


def role_switch(stage: Stage) -> Row:
    state = ["--checkpoint-dir", str(stage.dir / "s")]
    honest = stage.devices(stage.broker.devices[:HONEST])
    single = stage.aggregator("single", *state, *ROUND)
    first = stage.play_round(honest)
    single.proc.wait(90)
    w1 = stage.moved(honest[0], first)
    before = honest[0].weights(stage.dim)[1]
    coordinator = stage.aggregator("coord", *state, "--workers", "1", *ROUND)
    stage.worker().wait_for("intake worker w1")
    updates = stage.play_round(honest, 2, 1)
    coordinator.proc.wait(120)
    cos, ratio = stage.moved(honest[0], updates, 2, before)
    committed = _committed(coordinator.text(), 2)
    return Row("4 role switch: restarted with --workers 1 after a single-process run",
               f"round 2 {'committed' if committed else 'ABANDONED'} {committed}/{HONEST} (round 1 cos {w1[0]})",
               cos, ratio, stage.lost(honest, committed))


def ids(stage: Stage) -> Row:
    out = subprocess.run([sys.executable, "-m", "aggregator.commands", "broker-config", "--out",
                          str(stage.dir / "nl"), "--devices", "2", "--fleet", "demo\n"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    said = "is not allowed" in out.stderr and "Traceback" not in out.stderr
    return Row("8 fleet id 'demo\\n' (trailing newline)", f"refused, exit {out.returncode}"
               f"{' (fleet id ... is not allowed: use 1-64 of A-Z a-z 0-9 _ . -)' if said else ''}; "
               f"{'no ACL written' if not (stage.dir / 'nl' / 'acl').exists() else 'ACL WRITTEN'}", lost="-")


def retained_junk(stage: Stage) -> Row:
    import paho.mqtt.client as mqtt

    agg = stage.aggregator("agg", "--checkpoint-dir", str(stage.dir / "s"), *ROUND[:-2])
    agg.wait_for("running")
    thief = stage.devices([stage.broker.devices[HONEST]], checkin=False, subscribe=False)[0]
    topics, me = FleetTopics(stage.broker.fleet), stage.broker.devices[HONEST]
    for topic in (topics.update(me), topics.checkin(me), topics.status(me)):
        thief._publish(topic, b"J" * (20 * 2**20), retain=True)
    wait_until(lambda: agg.text().count("retained on") >= 3, 60, "deletions")
    agg.stop()
    seen: dict[str, int] = {}
    probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv5)
    probe.username_pw_set("aggregator", stage.broker.password("aggregator"))
    probe.on_message = lambda c, u, m: seen.__setitem__(m.topic, len(m.payload))
    probe.connect("127.0.0.1", stage.broker.port)
    probe.loop_start()
    probe.subscribe([(f"{topics.root}/+/{me}", 1), (f"{topics.root}/marker", 1)])
    time.sleep(0.5)
    probe.publish(f"{topics.root}/marker", b"end", qos=1)
    wait_until(lambda: f"{topics.root}/marker" in seen, 30, "marker")
    probe.disconnect()
    probe.loop_stop()
    left = sum(n for t, n in seen.items() if not t.endswith("marker"))
    return Row("8 device retains 3 x 20 MB on its own update/checkin/status topics",
               f"all 3 deleted by the aggregator; {left} B of it retained afterwards; never read at subscribe",
               lost="-")


def inflation(stage: Stage) -> Row:
    agg = stage.aggregator("agg", "--checkpoint-dir", str(stage.dir / "s"), *ROUND[:1], str(HONEST + 1),
                           *ROUND[2:5], str(HONEST + 1), *ROUND[6:])
    agg.wait_for("running")
    honest = stage.devices(stage.broker.devices[:HONEST], examples=10)
    attacker = stage.devices([stage.broker.devices[HONEST]], examples=10)[0]
    updates = stage.play_round(honest)
    wait_until(lambda: attacker.selected(1), 60, "attacker selected")
    attacker.send_update(1, 0, -np.mean(updates, axis=0), examples=10_000_000)
    agg.proc.wait(90)
    cos, ratio = stage.moved(honest[0], updates)
    committed = _committed(agg.text())
    capped = "weighs" in agg.text()
    # weighed like an honest device, its opposite update leaves (3 - 1) / 4 = 0.5 of the honest step
    return Row("1 weight inflation: a device checks in with 10 examples, claims 10,000,000, sends minus the honest mean",
               f"committed {committed}/{HONEST + 1}; claim {'cut to its check-in (10)' if capped else 'NOT cut'}; "
               f"an honest device of 10 examples would give cosine 1.0, norm 0.5",
               cos, ratio, stage.lost(honest, committed, 1))


def eval_counts(stage: Stage) -> Row:
    metrics = stage.dir / "rounds.jsonl"
    agg = stage.aggregator("agg", "--checkpoint-dir", str(stage.dir / "s"), "--metrics-jsonl", str(metrics),
                           *ROUND[:1], str(HONEST + 1), *ROUND[2:5], str(HONEST + 1), *ROUND[6:])
    agg.wait_for("running")
    honest = stage.devices(stage.broker.devices[:HONEST])
    attacker = stage.devices([stage.broker.devices[HONEST]])[0]
    for d in honest + [attacker]:
        wait_until(lambda d=d: d.selected(1), 60, "cohort")
    for i, d in enumerate(honest):  # honest: 10 windows x seq_len 4 = 40 positions, a quarter right
        d.send_update(1, 0, stage.honest_update(i), meta={"train_loss": 1.0,
                                                          "eval": {"correct1": 10, "correct3": 10, "scored": 40}})
    big = 2**40 - 1
    attacker.send_update(1, 0, stage.honest_update(9), meta={"train_loss": 1.0,
                                                             "eval": {"correct1": big, "correct3": big, "scored": big}})
    agg.proc.wait(90)
    ignored = "evaluation counts of" in agg.text()
    fed = json.loads(metrics.read_text().splitlines()[-1]).get("fed_eval", {}) if metrics.exists() else {}
    cos, ratio = stage.moved(honest[0], [stage.honest_update(i) for i in (0, 1, 2, 9)])
    return Row("8 federated evaluation: one device reports 2^40-1 of 2^40-1 positions right (10 windows declared)",
               f"{'ignored and logged' if ignored else 'COUNTED'}: the round's federated top-1 "
               f"{fed.get('top1', float('nan')):.3f} over {fed.get('devices', 0):.0f} devices (honest: 0.250)",
               cos, ratio, stage.lost(honest, _committed(agg.text()), 1))


def underfilled(stage: Stage) -> Row:
    agg = stage.aggregator("agg", "--checkpoint-dir", str(stage.dir / "s"), *ROUND[:8], "--report-deadline-s",
                           "8", *ROUND[10:])
    honest = stage.devices(stage.broker.devices[:HONEST])
    for d in honest:
        wait_until(lambda d=d: d.selected(1), 60, "cohort")
    honest[0].send_update(1, 0, stage.honest_update(0))  # one of the three reports
    agg.proc.wait(90)
    log = agg.text()
    line = next((x for x in log.splitlines() if "round 1:" in x and ("committed" in x or "abandon" in x.lower())), "")
    return Row("7 under-filled round: 1 of a cohort of 3 reports", line[line.find("round 1:"):][:60] or "no round end",
               lost=0 if "ABANDONED" in log or "abandoned" in log else "-")


def state_damage(stage: Stage, how: str) -> Row:
    state = stage.dir / "s"
    honest = stage.devices(stage.broker.devices[:HONEST])
    agg = stage.aggregator("agg", "--checkpoint-dir", str(state), *ROUND)
    stage.play_round(honest)
    agg.proc.wait(90)
    model = state / "model.npz"
    if how == "lost":
        model.unlink()
    else:
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
    again = stage.aggregator("again", "--checkpoint-dir", str(state), *ROUND)
    code = again.proc.wait(90)
    said = next((x for x in again.text().splitlines() if "fedboard aggregator" in x), again.text()[-120:])
    said = said.replace(str(state), "STATE").split("checkpoint error: ")[-1]
    name = ("5 state loss: model.npz deleted (round file and ledger kept), restarted" if how == "lost" else
            "6 corrupt state: one byte of model.npz flipped, restarted")
    return Row(name, f"exit {code}: {said.strip()[:110]}", lost="-")


ATTACKS = {
    "takeover": lambda s: takeover(s), "lease": second_aggregator,
    "share": lambda s: shared_group(s, False), "share-leaked": lambda s: shared_group(s, True),
    "role": role_switch, "ids": ids, "eval": eval_counts, "retain": retained_junk, "inflation": inflation, "underfilled": underfilled,
    "state-lost": lambda s: state_damage(s, "lost"), "state-corrupt": lambda s: state_damage(s, "corrupt"),
}
NEEDS_WORKERS = {"share", "share-leaked", "role"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated attacks: " + ",".join(ATTACKS))
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(ATTACKS)
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        p.error(f"unknown attack(s) {unknown}; known: {', '.join(ATTACKS)}")
    root = Path(tempfile.mkdtemp(prefix="fedboard-adversary-"))
    rows: list[Row] = []
    try:
        for name in names:
            stage = Stage(root, name.replace("-", "_"), workers=1 if name in NEEDS_WORKERS else 0)
            try:
                rows.append(ATTACKS[name](stage))
            except Exception as exc:  # noqa: BLE001 - a bench reports what broke and goes on
                rows.append(Row(name, f"bench error: {type(exc).__name__}: {exc}"[:200], lost="?"))
            finally:
                stage.close()
            print(f"{rows[-1].attack}: {rows[-1].outcome}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| attack | outcome | cosine vs honest | norm vs honest | accepted updates lost |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.attack} | {r.outcome} | {'-' if r.cosine != r.cosine else r.cosine} | "
              f"{'-' if r.norm_ratio != r.norm_ratio else r.norm_ratio} | {r.lost} |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
