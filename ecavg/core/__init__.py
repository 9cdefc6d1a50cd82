"""The engine-agnostic core: averaging, serialisation, training, the protocol and its strategies."""

from ecavg.core.averaging import AggregationError, StreamingAverager, average_state_dicts
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
    "AggregationError",
    "StreamingAverager",
    "average_state_dicts",
    "WeightsError",
    "decode_metadata",
    "decode_state_dict",
    "encode_state_dict",
    "load_state_dict",
    "save_state_dict",
    "state_dict_nbytes",
]
