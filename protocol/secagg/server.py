"""The server's side of secure aggregation: collects, relays, and unmasks only the sum.

    server = SecAggServer(params, cohort=selected_devices)
    for each AdvertiseKeys:  server.receive(device, data)      then  roster = server.close_keys()
    for each ShareKeys:      server.receive(device, data)      then  bundles = server.close_shares()
    for each MaskedInput:    server.receive(device, data)      then  request = server.close_inputs()
    for each UnmaskResponse: server.receive(device, data)      then  result = server.finish()

The server decides when a phase ends (all expected messages in, or its deadline); devices
missing at a close are dropped from the round. It keeps one running uint32 sum of the masked
inputs (memory O(dim), whatever the cohort), never an individual input. At `finish` it
removes the survivors' self masks (their seeds rebuilt from t shares) and the pairwise masks
between every survivor and every device that dropped after sharing keys (the dropped device's
s_sk rebuilt from t shares and checked against the key it advertised): |dropped| x |survivors|
PRG expansions, the quadratic part of the server's work.

`receive(device, data)` takes the transport's idea of the sender (the topic's device id)
and refuses a message that names another. A repeated identical message (MQTT QoS 1
redelivery) is ignored and `receive` returns False; a different one from the same device in
the same phase is a `SecAggPhaseError(DUPLICATE)`.
"""
from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.errors import Reason
from protocol.secagg import keys as K
from protocol.secagg.client import SECRET_BYTES, SHARE_CHUNKS, pair_sign
from protocol.secagg.errors import SecAggAbortedError, phase_error, trust_error
from protocol.secagg.messages import (
    AdvertiseKeys, KeyRoster, MaskedInput, MessageType, ShareBundle, ShareKeys, UnmaskRequest, UnmaskResponse,
    message_type,
)
from protocol.secagg.params import SecAggParams
from protocol.secagg.prg import MaskExpander
from protocol.secagg.quantize import dequantize, from_ring
from protocol.secagg.shamir import Reconstructor, Share

log = logging.getLogger(__name__)


class ServerPhase(str, enum.Enum):
    """Which messages the server accepts now."""

    KEYS = "keys"            # AdvertiseKeys
    SHARES = "shares"        # ShareKeys
    INPUTS = "inputs"        # MaskedInput
    UNMASKING = "unmasking"  # UnmaskResponse
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class SecAggResult:
    """What the server learns: the sum of the survivors' integers, and who they were."""

    params: SecAggParams
    ring_sum: np.ndarray     # uint32 in [0, 2^bits)
    int_sum: np.ndarray      # int64, the exact sum of the survivors' quantized integers
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]  # shared keys, then sent no masked input
    responders: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.survivors)

    def float_sum(self) -> np.ndarray:
        """The dequantized sum (float64): within count * step of the survivors' clipped sum."""
        return dequantize(self.int_sum, self.params)


_EXPECTED = {
    ServerPhase.KEYS: MessageType.ADVERTISE_KEYS, ServerPhase.SHARES: MessageType.SHARE_KEYS,
    ServerPhase.INPUTS: MessageType.MASKED_INPUT, ServerPhase.UNMASKING: MessageType.UNMASK_RESPONSE,
}


class SecAggServer:
    """One round of secure aggregation on the server. Not thread-safe: one caller at a time."""

    def __init__(self, params: SecAggParams, *, cohort: Iterable[str] | None = None,
                 identities: Mapping[str, Ed25519PublicKey] | None = None,
                 require_signatures: bool = False) -> None:
        self.params = params
        self.cohort = frozenset(cohort) if cohort is not None else None
        self._identities = dict(identities or {})
        self._require_signatures = require_signatures
        self.phase = ServerPhase.KEYS
        self.failure = ""
        self._seen: dict[tuple[ServerPhase, str], bytes] = {}
        self._keys: dict[str, AdvertiseKeys] = {}
        self._public_keys: set[bytes] = set()
        self._shares: dict[str, Mapping[str, bytes]] = {}
        self._u1: tuple[str, ...] = ()
        self._u2: tuple[str, ...] = ()
        self._u3: tuple[str, ...] = ()
        self._sum: np.ndarray | None = None
        self._inputs: set[str] = set()
        self._responses: dict[str, tuple[dict[str, Share], dict[str, Share]]] = {}

    # -- any phase ------------------------------------------------------------------------------
    def receive(self, device: str, data: bytes) -> bool:
        """Parse and accept one device message of the current phase; False for an exact repeat."""
        kind = message_type(data)
        expected = _EXPECTED.get(self.phase)
        if kind != expected:
            raise phase_error(f"got {kind.name} from {device!r} while the server is in phase {self.phase.value!r}"
                              + (f" (expects {expected.name})" if expected else ""))
        digest = _hash(data)
        if self._repeat(device, digest):
            return False
        if kind is MessageType.ADVERTISE_KEYS:
            return self.receive_keys(device, AdvertiseKeys.from_bytes(data), _digest=digest)
        if kind is MessageType.SHARE_KEYS:
            return self.receive_shares(device, ShareKeys.from_bytes(data), _digest=digest)
        if kind is MessageType.MASKED_INPUT:
            return self.receive_masked_input(device, MaskedInput.from_bytes(data, expect_dim=self.params.dim),
                                             _digest=digest)
        return self.receive_unmasking(device, UnmaskResponse.from_bytes(data), _digest=digest)

    def fail(self, reason: str) -> None:
        """Give the round up (e.g. the aggregator's deadline); every later call raises."""
        log.warning("secagg round %d failed: %s", self.params.round_id, reason)
        self.phase, self.failure, self._sum = ServerPhase.FAILED, reason, None

    @property
    def survivors(self) -> tuple[str, ...]:
        return self._u3

    @property
    def roster(self) -> tuple[str, ...]:
        return self._u1

    @property
    def sharers(self) -> tuple[str, ...]:
        return self._u2

    # -- phase 0 --------------------------------------------------------------------------------
    def receive_keys(self, device: str, msg: AdvertiseKeys, *, _digest: bytes | None = None) -> bool:
        self._expect(ServerPhase.KEYS, "AdvertiseKeys")
        digest = _digest or _hash(msg.to_bytes())
        if self._repeat(device, digest):
            return False
        self._check_sender(device, msg.device, msg.round_id)
        if self.cohort is not None and device not in self.cohort:
            raise phase_error(f"{device!r} is not in this round's cohort", Reason.NOT_IN_COHORT)
        if len(self._keys) >= self.params.max_clients:
            raise phase_error(f"already {self.params.max_clients} devices in the round (max_clients)",
                              Reason.TOO_LARGE)
        identity = self._identities.get(device)
        if identity is not None:
            K.verify_advertisement(identity, msg.round_id, device, msg.c_pk, msg.s_pk, msg.signature)
        elif self._require_signatures:
            raise trust_error(f"no identity key known for {device!r}: its keys cannot be checked")
        if msg.c_pk == msg.s_pk or {msg.c_pk, msg.s_pk} & self._public_keys:
            raise trust_error(f"{device!r} advertised a public key already in use this round")
        self._keys[device] = msg
        self._public_keys |= {msg.c_pk, msg.s_pk}
        self._seen[(self.phase, device)] = digest
        return True

    def close_keys(self) -> KeyRoster:
        """End phase 0: the roster (U1) every device needs for phase 1."""
        self._expect(ServerPhase.KEYS, "close_keys")
        self._need(len(self._keys), "devices advertised keys")
        self._u1 = tuple(sorted(self._keys))
        if 2 * self.params.threshold <= len(self._u1):
            log.warning("secagg round %d: threshold %d is not more than half of the %d devices: a server that "
                        "lies about dropouts could collect both shares of a device", self.params.round_id,
                        self.params.threshold, len(self._u1))
        self.phase = ServerPhase.SHARES
        return KeyRoster(self.params, tuple(self._keys[d] for d in self._u1))

    # -- phase 1 --------------------------------------------------------------------------------
    def receive_shares(self, device: str, msg: ShareKeys, *, _digest: bytes | None = None) -> bool:
        self._expect(ServerPhase.SHARES, "ShareKeys")
        digest = _digest or _hash(msg.to_bytes())
        if self._repeat(device, digest):
            return False
        self._check_sender(device, msg.sender, msg.round_id)
        if device not in self._keys:
            raise phase_error(f"{device!r} sent shares but is not in the key roster", Reason.NOT_IN_COHORT)
        expected = set(self._u1) - {device}
        if set(msg.ciphertexts) != expected:
            missing, extra = sorted(expected - set(msg.ciphertexts)), sorted(set(msg.ciphertexts) - expected)
            raise phase_error(f"{device!r} must send one ciphertext to every other roster device "
                              f"(missing {missing}, unexpected {extra})", Reason.BAD_FIELD)
        self._shares[device] = dict(msg.ciphertexts)
        self._seen[(self.phase, device)] = digest
        return True

    def close_shares(self) -> dict[str, ShareBundle]:
        """End phase 1: one bundle per device that shared (U2), holding what the others sent it."""
        self._expect(ServerPhase.SHARES, "close_shares")
        self._need(len(self._shares), "devices shared their keys")
        self._u2 = tuple(sorted(self._shares))
        bundles = {v: ShareBundle(self.params.round_id, v, {u: self._shares[u][v] for u in self._u2 if u != v})
                   for v in self._u2}
        self._shares = {}
        self._sum = np.zeros(self.params.dim, dtype=np.uint32)
        self.phase = ServerPhase.INPUTS
        return bundles

    # -- phase 2 --------------------------------------------------------------------------------
    def receive_masked_input(self, device: str, msg: MaskedInput, *, _digest: bytes | None = None) -> bool:
        self._expect(ServerPhase.INPUTS, "MaskedInput")
        digest = _digest or _hash(msg.to_bytes())
        if self._repeat(device, digest):
            return False
        self._check_sender(device, msg.device, msg.round_id)
        if device not in self._u2:
            raise phase_error(f"{device!r} sent a masked input but did not share keys", Reason.NOT_IN_COHORT)
        if msg.bits != self.params.bits or msg.values.shape != (self.params.dim,):
            raise phase_error(f"masked input of {device!r} is {msg.bits}-bit x {msg.values.size}, the round is "
                              f"{self.params.bits}-bit x {self.params.dim}", Reason.WRONG_SIZE)
        assert self._sum is not None
        np.add(self._sum, msg.values.astype(np.uint32, copy=False), out=self._sum)
        self._inputs.add(device)
        self._seen[(self.phase, device)] = digest
        return True

    def close_inputs(self) -> UnmaskRequest:
        """End phase 2: the survivors (U3); everyone else in U2 counts as dropped."""
        self._expect(ServerPhase.INPUTS, "close_inputs")
        self._need(len(self._inputs), "masked inputs arrived")
        self._u3 = tuple(sorted(self._inputs))
        self.phase = ServerPhase.UNMASKING
        return UnmaskRequest(self.params.round_id, self._u3)

    # -- phase 3 --------------------------------------------------------------------------------
    def receive_unmasking(self, device: str, msg: UnmaskResponse, *, _digest: bytes | None = None) -> bool:
        self._expect(ServerPhase.UNMASKING, "UnmaskResponse")
        digest = _digest or _hash(msg.to_bytes())
        if self._repeat(device, digest):
            return False
        self._check_sender(device, msg.device, msg.round_id)
        if device not in self._u3:
            raise phase_error(f"{device!r} is not a survivor and may not take part in unmasking",
                              Reason.NOT_IN_COHORT)
        dropped = set(self._u2) - set(self._u3)
        if set(msg.mask_shares) != set(self._u3) or set(msg.key_shares) != dropped:
            raise phase_error(f"{device!r} must send self-mask shares of exactly the survivors and key shares of "
                              f"exactly the dropped devices {sorted(dropped)}", Reason.BAD_FIELD)
        x = self._u1.index(device) + 1
        parsed: list[dict[str, Share]] = [{}, {}]
        for slot, entries in enumerate((msg.mask_shares, msg.key_shares)):
            for owner, raw in entries.items():
                share = Share.from_bytes(raw, chunks=SHARE_CHUNKS)
                if share.x != x:
                    raise trust_error(f"{device!r} sent a share at x={share.x}, its point is {x}")
                parsed[slot][owner] = share
        self._responses[device] = (parsed[0], parsed[1])
        self._seen[(self.phase, device)] = digest
        return True

    def finish(self) -> SecAggResult:
        """Unmask: the exact sum of the survivors' integers. Needs >= threshold responses."""
        self._expect(ServerPhase.UNMASKING, "finish")
        self._need(len(self._responses), "survivors answered the unmask request")
        params = self.params
        responders = tuple(sorted(self._responses))
        rebuild = Reconstructor([self._u1.index(d) + 1 for d in responders], params.threshold)
        acc = self._sum
        assert acc is not None
        expander = MaskExpander(params.dim)
        for u in self._u3:
            seed = rebuild.recover([self._responses[r][0][u] for r in responders], SECRET_BYTES,
                                   what=f"the self-mask seed of {u!r}")
            expander.add(acc, seed, -1)
        dropped = tuple(v for v in self._u2 if v not in self._u3)
        for v in dropped:
            raw = rebuild.recover([self._responses[r][1][v] for r in responders], SECRET_BYTES,
                                  what=f"the mask key of {v!r}")
            pair = K.KeyPair.from_private_bytes(raw)
            if pair.public != self._keys[v].s_pk:
                raise trust_error(f"the key rebuilt for dropped device {v!r} is not the one it advertised: "
                                  "wrong shares")
            for u in self._u3:
                seed = K.agree(pair.private, self._keys[u].s_pk, purpose=K.PURPOSE_MASK,
                               round_id=params.round_id, a=u, b=v)
                expander.add(acc, seed, -pair_sign(u, v))
        if params.bits < 32:
            acc &= np.uint32(params.mask)
        self.phase = ServerPhase.DONE
        self._sum = None
        log.info("secagg round %d: sum of %d inputs unmasked (%d dropped after sharing, %d responders)",
                 params.round_id, len(self._u3), len(dropped), len(responders))
        return SecAggResult(params, acc, from_ring(acc, params), self._u3, dropped, responders)

    # -- helpers --------------------------------------------------------------------------------
    def _expect(self, phase: ServerPhase, what: str) -> None:
        if self.phase is not phase:
            extra = f" ({self.failure})" if self.phase is ServerPhase.FAILED else ""
            raise phase_error(f"{what} is not allowed now: the server is in phase {self.phase.value!r}{extra}, "
                              f"{what} belongs to phase {phase.value!r}")

    def _check_sender(self, device: str, claimed: str, round_id: int) -> None:
        if claimed != device:
            raise trust_error(f"message arrived from {device!r} but claims to be from {claimed!r}", Reason.BAD_FIELD)
        if round_id != self.params.round_id:
            raise phase_error(f"message from {device!r} is for round {round_id}, this is round "
                              f"{self.params.round_id}", Reason.WRONG_ROUND)

    def _repeat(self, device: str, digest: bytes) -> bool:
        """True for an exact repeat of what ``device`` sent in this phase; DUPLICATE for a different one."""
        seen = self._seen.get((self.phase, device))
        if seen is None:
            return False
        if seen == digest:
            return True
        raise phase_error(f"{device!r} already sent a different message in phase {self.phase.value!r}",
                          Reason.DUPLICATE)

    def _need(self, have: int, what: str) -> None:
        if have < self.params.threshold:
            detail = f"only {have} {what}, the threshold is {self.params.threshold}"
            self.fail(detail)
            raise SecAggAbortedError(detail)


def _hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
