"""The device's side of one secure-aggregation round over MQTT (aggregator/PRIVACY.md).

`DeviceClient` makes one `SecureUpdate` when it is selected for a round whose plan says
`secure_aggregation`, and feeds it what arrives on the fleet's secagg topics; every method
returns the envelope to publish on `secagg/up/<device>` (or None). The update itself leaves
the device only masked: clipped to the plan's `update_clip`, put on the announced integer
grid and hidden under pairwise and self masks, so the aggregator can unmask nothing but
the cohort's sum. No training metrics ride along (they would be per-device metadata).

Order of events: assignment -> `advertise()`; retained KeyRoster -> `on_roster()`; then the
ShareBundle (`on_bundle()`) and the trained delta (`set_update()`) arrive in either order:
whichever comes second makes `ready_to_mask()` true once, and `masked_input()` does the
masking (the expensive part: one AES-CTR expansion per peer, so it runs on a worker thread,
never on the MQTT thread); retained UnmaskRequest -> `on_unmask()`. Any `ProtocolError`
(wrong round, forged shares, a roster without this device) aborts the round on the device:
it sends nothing more, which the server treats as a dropout.
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from edge_client.local_dp import clip_to_norm
from protocol.envelope import Envelope, Kind, decode_envelope
from protocol.errors import ProtocolError
from protocol.secagg import KeyRoster, SecAggClient, ShareBundle, UnmaskRequest

log = logging.getLogger(__name__)

SECAGG_CODEC = "secagg"


class SecureUpdate:
    """One device in one secure round. Thread-safe: MQTT callbacks and the trainer both call it."""

    def __init__(self, fleet: str, device_id: str, round_id: int, dim: int, *, update_clip: float = 0.0,
                 weighted: bool = False) -> None:
        self.fleet = fleet
        self.device_id = device_id
        self.round_id = round_id
        self.update_clip = update_clip
        self.weighted = weighted
        self.client = SecAggClient(device_id, round_id, expect_dim=dim + 1 if weighted else dim)
        self.aborted = ""
        self.clip_norm: float | None = None   # the update's L2 norm before clipping, for the device's log
        self.cut_coordinates = 0              # coordinates the grid's value range clipped
        self._bundle: ShareBundle | None = None
        self._update: np.ndarray | None = None
        self._masking_claimed = False
        self._lock = threading.Lock()

    # -- phase 0 ----------------------------------------------------------------------------------
    def advertise(self) -> bytes:
        with self._lock:
            return self._envelope(self.client.advertise_keys().to_bytes())

    # -- phase 1 ----------------------------------------------------------------------------------
    def on_roster(self, data: bytes) -> bytes | None:
        """The retained KeyRoster: this device's ShareKeys, or None (another round, or aborted)."""
        payload = self._payload(data)
        if payload is None:
            return None
        with self._lock:
            if self.client.phase.value != "share":  # the retained roster again (a reconnect): answered once
                return None
            try:
                return self._envelope(self.client.share_keys(KeyRoster.from_bytes(payload)).to_bytes())
            except ProtocolError as exc:
                return self._abort(f"refused the key roster: {exc}")

    # -- phase 2 ----------------------------------------------------------------------------------
    def on_bundle(self, data: bytes) -> bool:
        """Keep this device's ShareBundle; True when the masked input can now be made."""
        payload = self._payload(data)
        if payload is None:
            return False
        with self._lock:
            try:
                bundle = ShareBundle.from_bytes(payload)
            except ProtocolError as exc:
                self._abort(f"refused the share bundle: {exc}")
                return False
            if self._bundle is None:
                self._bundle = bundle
            return self._claim()

    def set_update(self, delta: np.ndarray, weight: float = 1.0) -> bool:
        """Keep the trained delta (clipped to the plan's bound); True when masking can now start.

        Weighted rounds mask ``(weight x delta, weight)``: the server divides the summed
        updates by the summed weights, FedAvg's example-weighted mean, and sees neither alone.
        """
        update = np.asarray(delta, dtype=np.float32)
        if self.update_clip > 0:
            update, self.clip_norm, _ = clip_to_norm(update, self.update_clip)
        if self.weighted:
            if not (np.isfinite(weight) and weight > 0):
                raise ValueError(f"weight must be > 0, got {weight!r}")
            update = np.concatenate([update.astype(np.float64) * weight, [weight]])
        with self._lock:
            if self.aborted:
                return False
            self._update = update
            return self._claim()

    def masked_input(self) -> bytes | None:
        """Quantize and mask the update (call once, after `on_bundle` or `set_update` said True)."""
        with self._lock:
            bundle, update = self._bundle, self._update
            if bundle is None or update is None or self.aborted:
                return None
            self._update = None  # the clear update is not kept once masked
            params = self.client.params
            if params is not None:  # the grid cuts coordinates beyond +-value_range: worth knowing
                self.cut_coordinates = int(np.count_nonzero(np.abs(update) > params.value_range))
                if self.cut_coordinates:
                    log.info("%s: secure round %d: %d coordinates beyond the grid's range %g were clipped",
                             self.device_id, self.round_id, self.cut_coordinates, params.value_range)
            try:
                message = self.client.masked_update(bundle, update, np.random.default_rng())
            except ProtocolError as exc:
                return self._abort(f"cannot mask the update: {exc}")
            self.client.quantized = None
            return self._envelope(message.to_bytes())

    # -- phase 3 ----------------------------------------------------------------------------------
    def on_unmask(self, data: bytes) -> bytes | None:
        """The retained UnmaskRequest: this device's shares for the server, or None."""
        payload = self._payload(data)
        if payload is None:
            return None
        with self._lock:
            if self.client.phase.value == "done":  # the retained request again: answered once
                return None
            if self.client.phase.value != "unmask":
                return self._abort("the server closed the inputs before this device's masked input counted")
            try:
                return self._envelope(self.client.unmask(UnmaskRequest.from_bytes(payload)).to_bytes())
            except ProtocolError as exc:
                return self._abort(f"refused the unmask request: {exc}")

    @property
    def done(self) -> bool:
        return self.client.phase.value == "done"

    # -- helpers ------------------------------------------------------------------------------------
    def _payload(self, data: bytes) -> bytes | None:
        """The secagg message inside a SECAGG envelope of this round; None for any other round."""
        if self.aborted:
            return None
        env = decode_envelope(data, expect=Kind.SECAGG)
        if env.fleet != self.fleet or env.round != self.round_id:
            return None
        return env.payload

    def _claim(self) -> bool:
        if self._bundle is not None and self._update is not None and not self._masking_claimed:
            self._masking_claimed = True
            return True
        return False

    def _envelope(self, message: bytes) -> bytes:
        return Envelope(Kind.SECAGG, self.fleet, self.device_id, round=self.round_id, codec=SECAGG_CODEC,
                        payload=message).encode()

    def _abort(self, why: str) -> None:
        if not self.aborted:
            self.aborted = why
            self._update = None
            log.info("%s: secure round %d aborted on the device: %s", self.device_id, self.round_id, why)
        return None
