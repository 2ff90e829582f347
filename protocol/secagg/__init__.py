"""Secure aggregation (Bonawitz et al. 2017): the server learns the sum of the devices'
updates and nothing else about any one of them, even when some devices drop out.

Transport-independent (numpy + cryptography; imports nothing outside `protocol`):
- `params`    SecAggParams: the round's grid (bits, value range, cohort bound, threshold)
- `quantize`  float update <-> integers modulo 2^bits; shared random coordinates
- `shamir`    t-of-n secret sharing over GF(2^127 - 1)
- `keys`      X25519 key agreement, HKDF, AES-GCM share encryption, optional signatures
- `prg`       AES-256-CTR mask expansion
- `messages`  the seven messages of the four phases, strict binary form
- `client`    SecAggClient, the device's state machine
- `server`    SecAggServer, the server's state machine
- `driver`    run_secagg_round / simulate_secagg_round, an in-process round
- `errors`    typed errors (all ProtocolError)
"""
from protocol.secagg.client import ClientPhase, SecAggClient
from protocol.secagg.driver import SecAggTranscript, run_secagg_round, simulate_secagg_round
from protocol.secagg.errors import (
    SecAggAbortedError, SecAggError, SecAggFormatError, SecAggPhaseError, SecAggTrustError,
)
from protocol.secagg.messages import (
    AdvertiseKeys, KeyRoster, MaskedInput, MessageType, ShareBundle, ShareKeys, UnmaskRequest, UnmaskResponse,
    decode_message, message_type,
)
from protocol.secagg.params import SecAggParams
from protocol.secagg.quantize import (
    dequantize, from_ring, quantize, shared_coordinates, split_indicator, sum_error_bound, to_ring, with_indicator,
)
from protocol.secagg.server import SecAggResult, SecAggServer, ServerPhase

__all__ = [
    "AdvertiseKeys", "ClientPhase", "KeyRoster", "MaskedInput", "MessageType", "SecAggAbortedError",
    "SecAggClient", "SecAggError", "SecAggFormatError", "SecAggParams", "SecAggPhaseError", "SecAggResult",
    "SecAggServer", "SecAggTranscript", "SecAggTrustError", "ServerPhase", "ShareBundle", "ShareKeys",
    "UnmaskRequest", "UnmaskResponse", "decode_message", "dequantize", "from_ring", "message_type", "quantize",
    "run_secagg_round", "shared_coordinates", "simulate_secagg_round", "split_indicator", "sum_error_bound",
    "to_ring", "with_indicator",
]
