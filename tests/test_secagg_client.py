import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.errors import Reason
from protocol.secagg.client import ClientPhase, SecAggClient, pair_sign
from protocol.secagg.errors import SecAggFormatError, SecAggPhaseError, SecAggTrustError
from protocol.secagg.messages import AdvertiseKeys, KeyRoster, ShareBundle, UnmaskRequest
from protocol.secagg.params import SecAggParams
from protocol.secagg.prg import expand_mask
from protocol.secagg.quantize import to_ring

DIM = 64


def _setup(n=4, threshold=3, identities=None, require=False):
    ids = [f"d{i}" for i in range(n)]
    signers = {d: Ed25519PrivateKey.generate() for d in ids} if identities else {}
    publics = {d: k.public_key() for d, k in signers.items()}
    clients = {d: SecAggClient(d, 2, expect_dim=DIM, identity_key=signers.get(d), peer_identities=publics,
                               require_signatures=require) for d in ids}
    params = SecAggParams(2, DIM, threshold, n, bits=32, value_range=1.0)
    roster = KeyRoster(params, tuple(clients[d].advertise_keys() for d in ids))
    return clients, roster


def _bundles(clients, roster):
    shared = {d: c.share_keys(roster) for d, c in clients.items()}
    return {v: ShareBundle(2, v, {u: shared[u].ciphertexts[v] for u in shared if u != v}) for v in clients}


def test_phases_in_order_and_out_of_order_calls_change_nothing():
    clients, roster = _setup()
    c = clients["d0"]
    assert c.phase is ClientPhase.SHARE
    with pytest.raises(SecAggPhaseError):
        c.advertise_keys()
    with pytest.raises(SecAggPhaseError):
        c.unmask(UnmaskRequest(2, ("d0", "d1", "d2")))
    assert c.phase is ClientPhase.SHARE
    bundles = _bundles(clients, roster)
    assert c.phase is ClientPhase.MASK
    with pytest.raises(SecAggPhaseError):
        c.share_keys(roster)
    masked = c.masked_input(bundles["d0"], np.zeros(DIM, np.uint32))
    assert c.phase is ClientPhase.UNMASK and masked.values.shape == (DIM,)
    c.abort("test")
    with pytest.raises(SecAggPhaseError):
        c.unmask(UnmaskRequest(2, ("d0", "d1", "d2")))


def test_masked_input_is_value_plus_self_mask_plus_pairwise_masks():
    clients, roster = _setup(n=3, threshold=2)
    bundles = _bundles(clients, roster)
    x = np.arange(DIM, dtype=np.uint32)
    masked = {d: clients[d].masked_input(bundles[d], x).values for d in clients}
    # all pairwise masks cancel in the sum: sum = 3x + sum of self masks
    self_seeds = [clients[d]._self_seed for d in sorted(clients)]
    expected = (3 * x.astype(np.uint64) + sum(expand_mask(s, DIM).astype(np.uint64) for s in self_seeds)) % 2**32
    total = sum(m.astype(np.uint64) for m in masked.values()) % 2**32
    assert np.array_equal(total, expected)
    assert pair_sign("a", "b") == -pair_sign("b", "a") == 1


def test_unmask_reveals_exactly_one_share_per_peer_and_only_once():
    clients, roster = _setup(n=5, threshold=3)
    bundles = _bundles(clients, roster)
    c = clients["d1"]
    c.masked_update(bundles["d1"], np.zeros(DIM, np.float32), np.random.default_rng(0))
    response = c.unmask(UnmaskRequest(2, ("d0", "d1", "d3")))
    assert set(response.mask_shares) == {"d0", "d1", "d3"}
    assert set(response.key_shares) == {"d2", "d4"}
    assert not set(response.mask_shares) & set(response.key_shares)
    assert c.phase is ClientPhase.DONE
    with pytest.raises(SecAggPhaseError):  # a second, different request could ask for the other share
        c.unmask(UnmaskRequest(2, ("d1", "d2", "d4")))


def test_refuses_unmask_requests_that_would_leak():
    clients, roster = _setup(n=4, threshold=3)
    bundles = _bundles(clients, roster)
    c = clients["d0"]
    c.masked_input(bundles["d0"], np.zeros(DIM, np.uint32))
    for survivors, reason in ((("d1", "d2", "d3"), Reason.NOT_IN_COHORT),   # our input did not arrive
                              (("d0", "d1"), Reason.ROUND_CLOSED),           # below threshold
                              (("d0", "d1", "zz"), Reason.NOT_IN_COHORT)):   # a stranger
        with pytest.raises(SecAggPhaseError) as info:
            c.unmask(UnmaskRequest(2, survivors))
        assert info.value.reason is reason
    with pytest.raises(SecAggPhaseError) as info:
        c.unmask(UnmaskRequest(3, ("d0", "d1", "d2")))
    assert info.value.reason is Reason.WRONG_ROUND
    assert c.phase is ClientPhase.UNMASK


def test_roster_checks():
    clients, roster = _setup(n=4, threshold=3)
    c = clients["d0"]
    others = tuple(k for k in roster.keys if k.device != "d0")
    mine = next(k for k in roster.keys if k.device == "d0")
    cases = [
        (KeyRoster(roster.params, others), SecAggPhaseError),                          # we are not listed
        (KeyRoster(roster.params, others[:1] + (mine,)), SecAggPhaseError),           # below threshold
        (KeyRoster(SecAggParams(2, DIM + 1, 3, 4), roster.keys), SecAggPhaseError),   # wrong size
        (KeyRoster(SecAggParams(3, DIM, 3, 4), roster.keys), SecAggPhaseError),       # wrong round
        (KeyRoster(roster.params, others + (AdvertiseKeys(2, "d0", mine.s_pk, mine.c_pk),)), SecAggTrustError),
        (KeyRoster(roster.params, others[:2] + (mine, AdvertiseKeys(2, "d9", others[0].c_pk, others[0].s_pk))),
         SecAggTrustError),                                                            # a reused key
        (KeyRoster(SecAggParams(2, DIM, 3, 3), roster.keys), SecAggPhaseError),       # more than max_clients
    ]
    for bad, error in cases:
        with pytest.raises(error):
            c.share_keys(bad)
        assert c.phase is ClientPhase.SHARE
    c.share_keys(roster)


def test_signed_keys_are_checked_when_identities_are_known():
    clients, roster = _setup(n=3, threshold=2, identities=True, require=True)
    forged = tuple(AdvertiseKeys(k.round_id, k.device, k.c_pk, k.s_pk, bytes(64)) if k.device == "d2" else k
                   for k in roster.keys)
    with pytest.raises(SecAggTrustError):
        clients["d0"].share_keys(KeyRoster(roster.params, forged))
    clients["d0"].share_keys(roster)
    stranger = SecAggClient("d1", 2, require_signatures=True)  # knows no identity keys at all
    entries = tuple(stranger.advertise_keys() if k.device == "d1" else k for k in roster.keys)
    with pytest.raises(SecAggTrustError, match="no identity key"):
        stranger.share_keys(KeyRoster(roster.params, entries))


def test_forged_or_misdirected_share_ciphertexts_are_refused_and_state_is_kept():
    clients, roster = _setup(n=4, threshold=3)
    bundles = _bundles(clients, roster)
    good = bundles["d0"]
    blob = good.ciphertexts["d1"]
    flipped = ShareBundle(2, "d0", {**good.ciphertexts, "d1": blob[:-1] + bytes([blob[-1] ^ 1])})
    swapped = ShareBundle(2, "d0", {**good.ciphertexts, "d1": good.ciphertexts["d2"]})
    truncated = ShareBundle(2, "d0", {**good.ciphertexts, "d1": blob[:10]})
    c = clients["d0"]
    for bad, error in ((flipped, SecAggTrustError), (swapped, SecAggTrustError), (truncated, SecAggFormatError),
                       (ShareBundle(2, "d1", good.ciphertexts), SecAggPhaseError),
                       (ShareBundle(2, "d0", {**good.ciphertexts, "d0": blob}), SecAggPhaseError),
                       (ShareBundle(2, "d0", {"d1": blob}), SecAggPhaseError)):      # too few sharers
        with pytest.raises(error):
            c.masked_input(bad, np.zeros(DIM, np.uint32))
        assert c.phase is ClientPhase.MASK
    with pytest.raises(ValueError):
        c.masked_input(good, np.full(DIM, -1))
    c.masked_input(good, np.zeros(DIM, np.uint32))
    assert c.phase is ClientPhase.UNMASK


def test_quantized_values_are_kept_for_error_feedback():
    clients, roster = _setup(n=3, threshold=2)
    bundles = _bundles(clients, roster)
    update = np.linspace(-0.5, 0.5, DIM).astype(np.float32)
    c = clients["d0"]
    masked = c.masked_update(bundles["d0"], update, np.random.default_rng(0))
    assert np.abs(c.quantized * roster.params.step - update).max() < roster.params.step
    assert not np.array_equal(masked.values, to_ring(c.quantized, roster.params))
