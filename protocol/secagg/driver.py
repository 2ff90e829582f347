"""An in-process round of secure aggregation: every message really serialised and parsed.

For tests and the cost benchmark; the aggregator carries the same messages over MQTT
instead (see aggregator/PRIVACY.md). Devices in ``dropouts_after_masking`` send their
masked input and then vanish (they never answer the unmask request); devices in
``dropouts_before_masking`` share their keys and vanish before sending a masked input
(the case that needs their s_sk rebuilt). Both kinds of dropout are recovered as long as
``threshold`` devices answer the unmask request.

    total = run_secagg_round(updates, threshold=7, dropouts_after_masking={"d3", "d7"},
                             value_range=0.1)
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from protocol.secagg.client import SecAggClient
from protocol.secagg.messages import KeyRoster, MaskedInput, ShareBundle, UnmaskRequest
from protocol.secagg.params import SecAggParams
from protocol.secagg.quantize import dequantize
from protocol.secagg.server import SecAggResult, SecAggServer

PHASES = ("advertise", "share", "mask", "unmask")


@dataclass
class SecAggTranscript:
    """Everything a round produced, for checking and for cost accounting.

    ``masked[d]`` is the server's view of device d's input (what the tests check for
    uniformity); ``quantized[d]`` the integers under that mask. Bytes and seconds are per
    phase: ``up_bytes[phase][device]`` device -> server, ``down_bytes[phase][device]``
    server -> device (the roster and the unmask request count once per device, as if each
    device received its own copy), ``client_s[phase][device]`` the device's compute time,
    ``server_s[phase]`` the server's (receiving every message of the phase and closing it).
    """

    params: SecAggParams
    result: SecAggResult
    quantized: dict[str, np.ndarray]
    masked: dict[str, np.ndarray]
    up_bytes: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    down_bytes: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    client_s: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    server_s: dict[str, float] = field(default_factory=dict)

    @property
    def float_sum(self) -> np.ndarray:
        return self.result.float_sum()

    def expected_int_sum(self) -> np.ndarray:
        """The plain sum of the survivors' quantized integers (no masks anywhere)."""
        return np.sum([self.quantized[d] for d in self.result.survivors], axis=0, dtype=np.int64)


def simulate_secagg_round(
    updates: Mapping[str, np.ndarray],
    threshold: int,
    dropouts_after_masking: set[str] | frozenset[str] = frozenset(),
    *,
    dropouts_before_masking: set[str] | frozenset[str] = frozenset(),
    bits: int = 32,
    value_range: float | None = None,
    max_clients: int | None = None,
    round_id: int = 1,
    seed: int = 0,
    keep_views: bool = True,
) -> SecAggTranscript:
    """Run the four phases for ``updates`` (device id -> 1-D float array, all one size).

    ``value_range`` defaults to the largest |value| of all updates (a real server announces
    it before seeing any update: a fixed bound, or the clip norm for clipped updates).
    ``keep_views=False`` keeps no per-device vectors in the transcript (``quantized`` and
    ``masked`` stay empty), for benchmarks of large cohorts.
    """
    devices = sorted(updates)
    if not devices:
        raise ValueError("no updates")
    unknown = (set(dropouts_after_masking) | set(dropouts_before_masking)) - set(devices)
    if unknown:
        raise ValueError(f"dropouts name devices without an update: {sorted(unknown)}")
    dim = int(np.asarray(updates[devices[0]]).shape[0])
    if value_range is None:
        value_range = max(float(np.max(np.abs(updates[d]))) for d in devices) or 1.0
    params = SecAggParams(round_id, dim, threshold, max_clients or len(devices), bits, value_range)
    rng = np.random.default_rng(seed)
    server = SecAggServer(params, cohort=devices)
    clients = {d: SecAggClient(d, round_id, expect_dim=dim) for d in devices}
    t = SecAggTranscript(params, None, {}, {})  # type: ignore[arg-type]

    def on_client(phase: str, device: str, fn):  # run fn, time it, return the serialised message
        start = time.perf_counter()
        data = fn().to_bytes()
        t.client_s[phase][device] = time.perf_counter() - start
        t.up_bytes[phase][device] = len(data)
        return data

    # phase 0: advertise keys
    sent = {d: on_client("advertise", d, clients[d].advertise_keys) for d in devices}
    start = time.perf_counter()
    for d, data in sent.items():
        server.receive(d, data)
    roster_bytes = server.close_keys().to_bytes()
    t.server_s["advertise"] = time.perf_counter() - start
    # phase 1: share keys
    sent = {}
    for d in devices:
        t.down_bytes["share"][d] = len(roster_bytes)
        sent[d] = on_client("share", d, lambda d=d: clients[d].share_keys(KeyRoster.from_bytes(roster_bytes)))
    start = time.perf_counter()
    for d, data in sent.items():
        server.receive(d, data)
    bundles = {d: b.to_bytes() for d, b in server.close_shares().items()}
    t.server_s["share"] = time.perf_counter() - start
    # phase 2: masked inputs (each one handed to the server at once: one 4-byte-a-value message in memory)
    server_s = 0.0
    for d in devices:
        if d in dropouts_before_masking:
            continue
        t.down_bytes["mask"][d] = len(bundles[d])
        data = on_client("mask", d, lambda d=d: clients[d].masked_update(
            ShareBundle.from_bytes(bundles[d]), np.asarray(updates[d]), rng))
        if keep_views:
            t.quantized[d] = clients[d].quantized
            t.masked[d] = MaskedInput.from_bytes(data).values
        clients[d].quantized = None
        start = time.perf_counter()
        server.receive(d, data)
        server_s += time.perf_counter() - start
    start = time.perf_counter()
    request_bytes = server.close_inputs().to_bytes()
    t.server_s["mask"] = server_s + time.perf_counter() - start
    # phase 3: unmasking
    sent = {}
    for d in server.survivors:
        if d in dropouts_after_masking:
            continue
        t.down_bytes["unmask"][d] = len(request_bytes)
        sent[d] = on_client("unmask", d, lambda d=d: clients[d].unmask(UnmaskRequest.from_bytes(request_bytes)))
    start = time.perf_counter()
    for d, data in sent.items():
        server.receive(d, data)
    t.result = server.finish()
    t.server_s["unmask"] = time.perf_counter() - start
    return t


def run_secagg_round(
    updates: Mapping[str, np.ndarray],
    threshold: int,
    dropouts_after_masking: set[str] | frozenset[str] = frozenset(),
    **options: object,
) -> np.ndarray:
    """The dequantized float64 sum of the masked inputs the server received (see `simulate_secagg_round`).

    Devices that drop after masking ARE in the sum: their masked input arrived, only their
    help with unmasking is missing.
    """
    transcript = simulate_secagg_round(updates, threshold, dropouts_after_masking, **options)  # type: ignore[arg-type]
    return dequantize(transcript.result.int_sum, transcript.params)
