"""The device's side of secure aggregation: an explicit four-phase state machine.

    client = SecAggClient("dev-1", round_id=7, expect_dim=dim)
    send(client.advertise_keys())                    # phase 0
    send(client.share_keys(roster))                  # phase 1, on the server's KeyRoster
    send(client.masked_update(bundle, update, rng))  # phase 2, on this device's ShareBundle
    send(client.unmask(request))                     # phase 3, on the UnmaskRequest

Each method is allowed in exactly one phase; any other call raises `SecAggPhaseError` and
changes nothing. Every check on what the server sent runs BEFORE the state advances, so a
refused message (wrong round, forged ciphertext, substituted keys) leaves the client where
it was. The client answers one UnmaskRequest per round: it never reveals both the self-mask
share and the key share of the same peer, which is what keeps a single device's update
hidden (Bonawitz et al. 2017, section 4).
"""
from __future__ import annotations

import enum
import logging
import os
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import Reason
from protocol.secagg import keys as K
from protocol.secagg.errors import phase_error, trust_error
from protocol.secagg.messages import (
    AdvertiseKeys, KeyRoster, MaskedInput, ShareBundle, ShareKeys, UnmaskRequest, UnmaskResponse,
    decode_share_plaintext, encode_share_plaintext,
)
from protocol.secagg.params import SecAggParams
from protocol.secagg.prg import SEED_BYTES, MaskExpander
from protocol.secagg.quantize import quantize, to_ring
from protocol.secagg.shamir import Share, chunk_count, split_secret
from protocol.topics import check_id

log = logging.getLogger(__name__)
SECRET_BYTES = 32
SHARE_CHUNKS = chunk_count(SECRET_BYTES)


class ClientPhase(str, enum.Enum):
    """What the client waits for next."""

    ADVERTISE = "advertise"  # advertise_keys()
    SHARE = "share"          # the KeyRoster
    MASK = "mask"            # its ShareBundle and the update
    UNMASK = "unmask"        # the UnmaskRequest
    DONE = "done"
    ABORTED = "aborted"


def pair_sign(me: str, peer: str) -> int:
    """+1 if ``me`` adds PRG(s_{me,peer}), -1 if it subtracts it: the two ends cancel."""
    return 1 if me < peer else -1


class SecAggClient:
    """One device in one round. Fresh keys and self-mask seed are made at construction.

    ``identity_key`` signs the advertised keys; ``peer_identities`` maps device ids to their
    Ed25519 public keys for checking the roster's signatures; with ``require_signatures``
    every roster entry must carry a valid one (the defence against a server that substitutes
    keys; needs a provisioned identity key per device).
    """

    def __init__(self, device_id: str, round_id: int, *, expect_dim: int | None = None,
                 identity_key: Ed25519PrivateKey | None = None,
                 peer_identities: Mapping[str, Ed25519PublicKey] | None = None,
                 require_signatures: bool = False) -> None:
        self.device_id = check_id("device", device_id)
        self.round_id = int(round_id)
        self.expect_dim = expect_dim
        self._identity = identity_key
        self._peer_identities = dict(peer_identities or {})
        self._require_signatures = require_signatures
        self._c = K.KeyPair.generate()
        self._s = K.KeyPair.generate()
        self._self_seed = os.urandom(SEED_BYTES)
        self.phase = ClientPhase.ADVERTISE
        self.params: SecAggParams | None = None
        self._roster: dict[str, AdvertiseKeys] = {}
        self._x_of: dict[str, int] = {}
        self._u2: tuple[str, ...] = ()
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (key share, self-mask share) we hold
        self.quantized: np.ndarray | None = None  # our integers, for error feedback

    # -- phase 0 --------------------------------------------------------------------------------
    def advertise_keys(self) -> AdvertiseKeys:
        self._expect(ClientPhase.ADVERTISE, "advertise_keys")
        signature = b""
        if self._identity is not None:
            signature = K.sign_advertisement(self._identity, self.round_id, self.device_id, self._c.public,
                                             self._s.public)
        self.phase = ClientPhase.SHARE
        return AdvertiseKeys(self.round_id, self.device_id, self._c.public, self._s.public, signature)

    # -- phase 1 --------------------------------------------------------------------------------
    def share_keys(self, roster: KeyRoster) -> ShareKeys:
        """Check the roster, then Shamir-share s_sk and the self-mask seed to every listed device."""
        self._expect(ClientPhase.SHARE, "share_keys")
        params = roster.params
        self._check_round(params.round_id, "key roster")
        if self.expect_dim is not None and params.dim != self.expect_dim:
            raise phase_error(f"the round aggregates {params.dim} values, this device's update has "
                              f"{self.expect_dim}", Reason.WRONG_SIZE)
        entries = {k.device: k for k in roster.keys}
        mine = entries.get(self.device_id)
        if mine is None:
            raise phase_error(f"the key roster does not list {self.device_id!r}", Reason.NOT_IN_COHORT)
        if (mine.c_pk, mine.s_pk) != (self._c.public, self._s.public):
            raise trust_error(f"the key roster lists other keys for {self.device_id!r} than it advertised: "
                              "the server or the broker substituted them")
        if len(entries) < params.threshold:
            raise phase_error(f"the roster lists {len(entries)} devices, fewer than the threshold "
                              f"{params.threshold}", Reason.ROUND_CLOSED)
        if len(entries) > params.max_clients:
            raise phase_error(f"the roster lists {len(entries)} devices, more than max_clients "
                              f"{params.max_clients}: the sum could wrap", Reason.TOO_LARGE)
        all_keys = [k.c_pk for k in entries.values()] + [k.s_pk for k in entries.values()]
        if len(set(all_keys)) != len(all_keys):
            raise trust_error("two roster entries share a public key: refusing the round")
        for device, entry in entries.items():
            self._check_signature(entry)
        devices = sorted(entries)
        x_of = {d: i + 1 for i, d in enumerate(devices)}
        xs = [x_of[d] for d in devices]
        key_shares = split_secret(self._s.private_bytes(), params.threshold, xs)
        mask_shares = split_secret(self._self_seed, params.threshold, xs)
        ciphertexts: dict[str, bytes] = {}
        held: dict[str, tuple[bytes, bytes]] = {}
        for device, ks, ms in zip(devices, key_shares, mask_shares):
            if device == self.device_id:
                held[device] = (ks.to_bytes(), ms.to_bytes())
                continue
            key = K.agree(self._c.private, entries[device].c_pk, purpose=K.PURPOSE_ENCRYPT, round_id=self.round_id,
                          a=self.device_id, b=device)
            plaintext = encode_share_plaintext(self.device_id, device, ks.to_bytes(), ms.to_bytes())
            ciphertexts[device] = K.encrypt(key, plaintext, K.share_aad(self.round_id, self.device_id, device))
        self.params, self._roster, self._x_of, self._held = params, entries, x_of, held
        self.phase = ClientPhase.MASK
        return ShareKeys(self.round_id, self.device_id, ciphertexts)

    # -- phase 2 --------------------------------------------------------------------------------
    def masked_update(self, bundle: ShareBundle, update: np.ndarray, rng: np.random.Generator) -> MaskedInput:
        """Quantize a float update onto the announced grid, then mask it (see `masked_input`)."""
        self._expect(ClientPhase.MASK, "masked_update")
        assert self.params is not None
        ints = quantize(update, self.params, rng)
        out = self.masked_input(bundle, to_ring(ints, self.params))
        self.quantized = ints
        return out

    def masked_input(self, bundle: ShareBundle, ring_values: np.ndarray) -> MaskedInput:
        """Open the shares peers sent us (U2 = they and we), then mask already-quantized values.

        ``ring_values``: integers in [0, 2^bits), ``dim`` of them (see quantize.to_ring).
        """
        self._expect(ClientPhase.MASK, "masked_input")
        params = self.params
        assert params is not None
        self._check_round(bundle.round_id, "share bundle")
        if bundle.recipient != self.device_id:
            raise phase_error(f"share bundle is for {bundle.recipient!r}, this is {self.device_id!r}",
                              Reason.NOT_IN_COHORT)
        values = np.asarray(ring_values)
        if values.shape != (params.dim,) or values.dtype.kind not in "iu":
            raise ValueError(f"ring values must be {params.dim} integers, got {values.dtype}{values.shape}")
        if values.size and (int(values.min()) < 0 or int(values.max()) > params.mask):
            raise ValueError(f"ring values must lie in [0, 2^{params.bits}); quantize with quantize.to_ring")
        held = dict(self._held)
        for sender, blob in bundle.ciphertexts.items():
            if sender == self.device_id or sender not in self._roster:
                raise phase_error(f"share bundle holds a ciphertext from {sender!r}, not a peer in the roster",
                                  Reason.NOT_IN_COHORT)
            key = K.agree(self._c.private, self._roster[sender].c_pk, purpose=K.PURPOSE_ENCRYPT,
                          round_id=self.round_id, a=self.device_id, b=sender)
            plain = K.decrypt(key, blob, K.share_aad(self.round_id, sender, self.device_id),
                              what=f"the shares from {sender!r}")
            inner_sender, inner_recipient, key_share, mask_share = decode_share_plaintext(plain)
            if (inner_sender, inner_recipient) != (sender, self.device_id):
                raise trust_error(f"the shares relayed from {sender!r} name {inner_sender!r} -> {inner_recipient!r}")
            for raw in (key_share, mask_share):
                share = Share.from_bytes(raw, chunks=SHARE_CHUNKS)
                if share.x != self._x_of[self.device_id]:
                    raise trust_error(f"{sender!r} sent a share at x={share.x}, this device's point is "
                                      f"{self._x_of[self.device_id]}")
            held[sender] = (key_share, mask_share)
        u2 = tuple(sorted(held))
        if len(u2) < params.threshold:
            raise phase_error(f"only {len(u2)} devices shared keys, fewer than the threshold {params.threshold}",
                              Reason.ROUND_CLOSED)
        masked = values.astype(np.uint32, copy=True)
        expander = MaskExpander(params.dim)
        expander.add(masked, self._self_seed, 1)
        for peer in u2:
            if peer != self.device_id:
                seed = K.agree(self._s.private, self._roster[peer].s_pk, purpose=K.PURPOSE_MASK,
                               round_id=self.round_id, a=self.device_id, b=peer)
                expander.add(masked, seed, pair_sign(self.device_id, peer))
        if params.bits < 32:
            masked &= np.uint32(params.mask)
        self._held, self._u2 = held, u2
        self.phase = ClientPhase.UNMASK
        return MaskedInput(self.round_id, self.device_id, params.bits, masked)

    # -- phase 3 --------------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Self-mask shares of the survivors, key shares of the devices that dropped after sharing."""
        self._expect(ClientPhase.UNMASK, "unmask")
        params = self.params
        assert params is not None
        self._check_round(request.round_id, "unmask request")
        survivors = set(request.survivors)
        if self.device_id not in survivors:
            raise phase_error(f"the server did not receive the masked input of {self.device_id!r}: "
                              "it must not help unmask this round", Reason.NOT_IN_COHORT)
        strangers = survivors - set(self._u2)
        if strangers:
            raise phase_error(f"unmask request names devices that never shared keys: {sorted(strangers)}",
                              Reason.NOT_IN_COHORT)
        if len(survivors) < params.threshold:
            raise phase_error(f"{len(survivors)} survivors are fewer than the threshold {params.threshold}",
                              Reason.ROUND_CLOSED)
        mask_shares = {v: self._held[v][1] for v in self._u2 if v in survivors}
        key_shares = {v: self._held[v][0] for v in self._u2 if v not in survivors}
        self.phase = ClientPhase.DONE
        self._held = {}
        return UnmaskResponse(self.round_id, self.device_id, mask_shares, key_shares)

    def abort(self, reason: str) -> None:
        """Give up on the round (deadline, server gone); later calls raise."""
        log.info("secagg client %s: round %d aborted: %s", self.device_id, self.round_id, reason)
        self.phase = ClientPhase.ABORTED
        self._held = {}

    # -- helpers --------------------------------------------------------------------------------
    def _expect(self, phase: ClientPhase, call: str) -> None:
        if self.phase is not phase:
            raise phase_error(f"{call}() is not allowed now: device {self.device_id!r} is in phase "
                              f"{self.phase.value!r}, {call} belongs to phase {phase.value!r}")

    def _check_round(self, round_id: int, what: str) -> None:
        if round_id != self.round_id:
            raise phase_error(f"{what} is for round {round_id}, this client is in round {self.round_id}",
                              Reason.WRONG_ROUND)

    def _check_signature(self, entry: AdvertiseKeys) -> None:
        identity = self._peer_identities.get(entry.device)
        if identity is None:
            if self._require_signatures:
                raise trust_error(f"no identity key known for {entry.device!r}: cannot check its keys")
            return
        K.verify_advertisement(identity, self.round_id, entry.device, entry.c_pk, entry.s_pk, entry.signature)
