"""The engine-agnostic core: averaging, serialisation, training, the protocol and its strategies."""

from ecavg.core.averaging import AggregationError, StreamingAverager, average_state_dicts
from ecavg.core.codecs import CODECS, Codec, codec, transfer_roundtrip
from ecavg.core.serialization import (
    WeightsError,
    decode_metadata,
    decode_state_dict,
    encode_state_dict,
    load_state_dict,
    save_state_dict,
    state_dict_nbytes,
)

__all__ = [
    "CODECS",
    "AggregationError",
    "Codec",
    "StreamingAverager",
    "WeightsError",
    "average_state_dicts",
    "codec",
    "decode_metadata",
    "decode_state_dict",
    "encode_state_dict",
    "load_state_dict",
    "save_state_dict",
    "state_dict_nbytes",
    "transfer_roundtrip",
]
