"""The engine-agnostic core: averaging, serialisation, training, the protocol and its strategies."""

from ecavg.core.averaging import (
    AggregationError,
    StreamingAverager,
    average_state_dicts,
)
from ecavg.core.codecs import CODECS, Codec, codec
from ecavg.core.matching import (
    activation_producers,
    align_to_reference,
    match_activations,
    match_weights,
    permute_state_dict,
    reference_index,
)
from ecavg.core.permutation_specs import (
    MATCHABLE_MODELS,
    PermutationSpec,
    permutation_spec,
)
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
    "Codec",
    "codec",
    "MATCHABLE_MODELS",
    "AggregationError",
    "PermutationSpec",
    "StreamingAverager",
    "WeightsError",
    "activation_producers",
    "align_to_reference",
    "average_state_dicts",
    "decode_metadata",
    "decode_state_dict",
    "encode_state_dict",
    "load_state_dict",
    "match_activations",
    "match_weights",
    "permutation_spec",
    "permute_state_dict",
    "reference_index",
    "save_state_dict",
    "state_dict_nbytes",
]
