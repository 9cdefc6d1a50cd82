"""Every error a user can cause, in one leaf module (it imports nothing from ecavg, so any layer can use it).

Each is an ``EcavgError``: the CLI prints its message as one line, without a traceback. The second base class
(``ValueError`` for bad input, ``RuntimeError`` for a failure while running) keeps ``except ValueError`` working.
"""


class EcavgError(Exception):
    """An error the user can fix from its message alone."""


class ConfigError(EcavgError, ValueError):
    """A config key or value is wrong; the message names it."""


class DataError(EcavgError, ValueError):
    """A dataset could not be found or read; the message names the path involved."""


class ModelError(EcavgError, ValueError):
    """A model cannot be built or weights cannot be loaded; the message names the model, option, key or path."""


class WeightsError(EcavgError, ValueError):
    """Weights that cannot be encoded, decoded or loaded; the message names the source and the tensor."""


class AggregationError(EcavgError, ValueError):
    """A state dict (or weight) that cannot be averaged; the message names the edge and the tensor."""


class NonFiniteLossError(EcavgError, RuntimeError):
    """Training diverged: the loss became NaN or infinite (usually a learning rate that is too high)."""


class CertificateError(EcavgError, ValueError):
    """Credentials cannot be written (existing files, bad host names); the message names the path or host."""


class DeployError(EcavgError, RuntimeError):
    """The deployment could not run the experiment; the message says what failed and where the logs are."""


class DeploymentError(EcavgError, RuntimeError):
    """The federation does not fit the run (duplicate partition ids, ...)."""


class EdgeQuorumError(EcavgError, RuntimeError):
    """Fewer edges than ``deploy.min_edges`` took part in a phase; the run cannot go on."""


class EdgeSetupError(EcavgError, ValueError):
    """This SuperNode cannot act as an edge of the run (node config, data or spec mismatch)."""


# Kept for callers that catch a tuple; every member is an EcavgError.
USER_ERRORS = (EcavgError,)
