"""The errors a user can cause (bad config, data, weights): the CLI prints them without a traceback."""

from ecavg.config import ConfigError
from ecavg.core.averaging import AggregationError
from ecavg.core.serialization import WeightsError
from ecavg.core.training import NonFiniteLossError
from ecavg.data import DataError
from ecavg.models import ModelError

USER_ERRORS = (ConfigError, DataError, ModelError, AggregationError, WeightsError, NonFiniteLossError)

__all__ = ["USER_ERRORS", "ConfigError", "DataError", "ModelError", "AggregationError", "WeightsError",
           "NonFiniteLossError"]
