import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.errors import Reason
from protocol.secagg.client import SecAggClient
from protocol.secagg.errors import SecAggAbortedError, SecAggFormatError, SecAggPhaseError, SecAggTrustError
from protocol.secagg.messages import (
    AdvertiseKeys, KeyRoster, MaskedInput, ShareBundle, ShareKeys, UnmaskRequest, UnmaskResponse,
)
from protocol.secagg.params import SecAggParams
from protocol.secagg.quantize import to_ring
from protocol.secagg.server import SecAggServer, ServerPhase
from protocol.secagg.shamir import PRIME, Share

DIM = 50


class Round:
    """A round driven by hand, one phase at a time, messages as bytes."""

    def __init__(self, n=5, threshold=3, bits=32, cohort=True):
        self.ids = [f"d{i}" for i in range(n)]
        self.params = SecAggParams(9, DIM, threshold, n, bits=bits, value_range=1.0)
        self.server = SecAggServer(self.params, cohort=self.ids if cohort else None)
        self.clients = {d: SecAggClient(d, 9, expect_dim=DIM) for d in self.ids}
        self.values = {d: np.random.default_rng(i).integers(-1000, 1000, DIM) for i, d in enumerate(self.ids)}

    def keys(self):
        for d in self.ids:
            assert self.server.receive(d, self.clients[d].advertise_keys().to_bytes())
        self.roster = KeyRoster.from_bytes(self.server.close_keys().to_bytes())

    def shares(self, who=None):
        self.share_msgs = {d: self.clients[d].share_keys(self.roster).to_bytes() for d in (who or self.ids)}
        for d, data in self.share_msgs.items():
            self.server.receive(d, data)
        self.bundles = {d: ShareBundle.from_bytes(b.to_bytes()) for d, b in self.server.close_shares().items()}

    def inputs(self, who=None):
        self.masked = {d: self.clients[d].masked_input(self.bundles[d], to_ring(self.values[d], self.params))
                       for d in (who or self.bundles)}
        for d, m in self.masked.items():
            self.server.receive(d, m.to_bytes())
        self.request = UnmaskRequest.from_bytes(self.server.close_inputs().to_bytes())

    def unmask(self, who=None):
        self.responses = {d: self.clients[d].unmask(self.request) for d in (who or self.request.survivors)}
        for d, r in self.responses.items():
            self.server.receive(d, r.to_bytes())

    def expected(self, survivors):
        return np.sum([self.values[d] for d in survivors], axis=0)


def test_full_round_gives_the_exact_sum_and_the_server_keeps_only_a_running_sum():
    r = Round()
    r.keys(); r.shares(); r.inputs(); r.unmask()
    result = r.server.finish()
    assert r.server.phase is ServerPhase.DONE
    assert np.array_equal(result.int_sum, r.expected(r.ids))
    assert result.survivors == tuple(r.ids) and result.dropped == ()


def test_devices_that_drop_at_every_phase_are_handled():
    r = Round(n=7, threshold=4)
    r.keys()
    r.shares(who=r.ids[:-1])              # d6 never shares: not in U2, nobody masks with it
    r.inputs(who=r.ids[:-2])              # d5 shared, then vanished: its pairwise masks must go
    r.unmask(who=r.request.survivors[1:])  # d0 sent its input, then vanished: its self mask is rebuilt
    result = r.server.finish()
    assert result.dropped == ("d5",)
    assert result.survivors == tuple(r.ids[:5])
    assert np.array_equal(result.int_sum, r.expected(r.ids[:5]))


def test_too_few_devices_abort_the_round_at_any_phase():
    r = Round(n=4, threshold=3)
    for d in r.ids[:2]:
        r.server.receive(d, r.clients[d].advertise_keys().to_bytes())
    with pytest.raises(SecAggAbortedError):
        r.server.close_keys()
    assert r.server.phase is ServerPhase.FAILED
    with pytest.raises(SecAggPhaseError, match="failed"):
        r.server.close_keys()
    r = Round(n=4, threshold=3)
    r.keys(); r.shares(); r.inputs()
    r.unmask(who=r.ids[:2])
    with pytest.raises(SecAggAbortedError):
        r.server.finish()


def test_out_of_order_messages_are_refused():
    r = Round()
    adv = r.clients["d0"].advertise_keys()
    with pytest.raises(SecAggPhaseError) as info:
        r.server.receive("d0", UnmaskResponse(9, "d0").to_bytes())
    assert info.value.reason is Reason.BAD_KIND
    with pytest.raises(SecAggPhaseError):
        r.server.close_inputs()
    with pytest.raises(SecAggPhaseError):
        r.server.finish()
    r.server.receive("d0", adv.to_bytes())
    for d in r.ids[1:]:
        r.server.receive(d, r.clients[d].advertise_keys().to_bytes())
    r.roster = r.server.close_keys()
    with pytest.raises(SecAggPhaseError):  # keys after the roster went out
        r.server.receive("d0", adv.to_bytes())
    with pytest.raises(SecAggPhaseError):
        r.server.receive_masked_input("d0", MaskedInput(9, "d0", 32, np.zeros(DIM, np.uint32)))


def test_sender_round_cohort_and_duplicates():
    r = Round(n=4, threshold=3)
    adv = r.clients["d0"].advertise_keys()
    with pytest.raises(SecAggTrustError):  # the topic says d1, the message says d0
        r.server.receive("d1", adv.to_bytes())
    with pytest.raises(SecAggPhaseError) as info:
        r.server.receive("d0", AdvertiseKeys(8, "d0", adv.c_pk, adv.s_pk).to_bytes())
    assert info.value.reason is Reason.WRONG_ROUND
    stranger = SecAggClient("zz", 9).advertise_keys()
    with pytest.raises(SecAggPhaseError) as info:
        r.server.receive("zz", stranger.to_bytes())
    assert info.value.reason is Reason.NOT_IN_COHORT
    assert r.server.receive("d0", adv.to_bytes()) is True
    assert r.server.receive("d0", adv.to_bytes()) is False  # QoS 1 redelivery: ignored
    other = r.clients["d1"].advertise_keys()
    with pytest.raises(SecAggPhaseError) as info:
        r.server.receive("d0", AdvertiseKeys(9, "d0", other.c_pk, other.s_pk).to_bytes())
    assert info.value.reason is Reason.DUPLICATE
    with pytest.raises(SecAggTrustError):  # d1 cannot reuse d0's keys
        r.server.receive("d1", AdvertiseKeys(9, "d1", adv.c_pk, adv.s_pk).to_bytes())


def test_open_cohort_still_caps_the_number_of_devices():
    r = Round(n=3, threshold=2, cohort=False)
    for d in r.ids:
        r.server.receive(d, r.clients[d].advertise_keys().to_bytes())
    with pytest.raises(SecAggPhaseError) as info:
        r.server.receive("d9", SecAggClient("d9", 9).advertise_keys().to_bytes())
    assert info.value.reason is Reason.TOO_LARGE


def test_share_messages_must_address_every_other_roster_device():
    r = Round(n=4, threshold=3)
    r.keys()
    msg = r.clients["d0"].share_keys(r.roster)
    partial = ShareKeys(9, "d0", {k: v for k, v in msg.ciphertexts.items() if k != "d3"})
    with pytest.raises(SecAggPhaseError) as info:
        r.server.receive("d0", partial.to_bytes())
    assert info.value.reason is Reason.BAD_FIELD
    with pytest.raises(SecAggPhaseError):
        r.server.receive("d0", ShareKeys(9, "d0", {**msg.ciphertexts, "d0": b"x" * 40}).to_bytes())
    assert r.server.receive("d0", msg.to_bytes())


def test_truncated_and_wrong_size_inputs_are_refused():
    r = Round(n=3, threshold=2, bits=16)
    r.keys(); r.shares()
    good = r.clients["d0"].masked_input(r.bundles["d0"], to_ring(r.values["d0"], r.params)).to_bytes()
    with pytest.raises(SecAggFormatError):
        r.server.receive("d0", good[:-1])
    with pytest.raises(SecAggFormatError):
        r.server.receive("d0", MaskedInput(9, "d0", 16, np.zeros(DIM - 1, np.uint32)).to_bytes())
    with pytest.raises(SecAggPhaseError) as info:
        r.server.receive("d0", MaskedInput(9, "d0", 32, np.zeros(DIM, np.uint32)).to_bytes())
    assert info.value.reason is Reason.WRONG_SIZE
    assert r.server.receive("d0", good)


def test_forged_shares_are_detected():
    # a wrong self-mask share is caught when more than threshold devices answer
    r = Round(n=5, threshold=3)
    r.keys(); r.shares(); r.inputs()
    responses = {d: r.clients[d].unmask(r.request) for d in r.ids}
    liar = responses["d4"]
    s = Share.from_bytes(liar.mask_shares["d0"])
    forged = dict(liar.mask_shares, d0=Share(s.x, ((s.values[0] + 1) % PRIME,) + s.values[1:]).to_bytes())
    for d in r.ids[:4]:
        r.server.receive(d, responses[d].to_bytes())
    r.server.receive("d4", UnmaskResponse(9, "d4", forged, liar.key_shares).to_bytes())
    with pytest.raises(SecAggTrustError):
        r.server.finish()
    # a wrong key share of a dropped device is caught even with exactly threshold answers
    r = Round(n=5, threshold=3)
    r.keys(); r.shares(); r.inputs(who=r.ids[:3])
    responses = {d: r.clients[d].unmask(r.request) for d in r.ids[:3]}
    liar = responses["d2"]
    s = Share.from_bytes(liar.key_shares["d3"])
    forged = dict(liar.key_shares, d3=Share(s.x, ((s.values[0] + 12345) % PRIME,) + s.values[1:]).to_bytes())
    for d in r.ids[:2]:
        r.server.receive(d, responses[d].to_bytes())
    r.server.receive("d2", UnmaskResponse(9, "d2", liar.mask_shares, forged).to_bytes())
    with pytest.raises(SecAggTrustError):
        r.server.finish()


def test_unmask_responses_must_match_the_request_exactly():
    r = Round(n=5, threshold=3)
    r.keys(); r.shares(); r.inputs(who=r.ids[:4])
    response = r.clients["d0"].unmask(r.request)
    both = UnmaskResponse(9, "d0", response.mask_shares, {**response.key_shares, "d1": response.mask_shares["d1"]})
    with pytest.raises(SecAggPhaseError):  # asking for both shares of d1 is refused at the server too
        r.server.receive("d0", both.to_bytes())
    with pytest.raises(SecAggPhaseError) as info:
        r.server.receive("d4", UnmaskResponse(9, "d4").to_bytes())  # d4 dropped: not a survivor
    assert info.value.reason is Reason.NOT_IN_COHORT
    moved = {k: Share(7, Share.from_bytes(v).values).to_bytes() for k, v in response.mask_shares.items()}
    with pytest.raises(SecAggTrustError):  # a share at another device's point
        r.server.receive("d0", UnmaskResponse(9, "d0", moved, response.key_shares).to_bytes())
    assert r.server.receive("d0", response.to_bytes())


def test_signed_rounds_refuse_unsigned_or_forged_keys():
    ids = ["a", "b", "c"]
    keys = {d: Ed25519PrivateKey.generate() for d in ids}
    params = SecAggParams(1, DIM, 2, 3)
    server = SecAggServer(params, identities={d: k.public_key() for d, k in keys.items()}, require_signatures=True)
    assert server.receive("a", SecAggClient("a", 1, identity_key=keys["a"]).advertise_keys().to_bytes())
    with pytest.raises(SecAggTrustError):
        server.receive("b", SecAggClient("b", 1).advertise_keys().to_bytes())
    with pytest.raises(SecAggTrustError):
        server.receive("b", SecAggClient("b", 1, identity_key=keys["c"]).advertise_keys().to_bytes())
    with pytest.raises(SecAggTrustError):
        server.receive("zz", SecAggClient("zz", 1).advertise_keys().to_bytes())
