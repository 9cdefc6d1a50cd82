"""The Flower runtime: the ECAvg protocol between a real server and real edge agents.

``server_app`` (a Flower ``ServerApp``) runs the same strategy code as the embedded runtime against a
:class:`~ecavg.runtime.flower.server.FlowerEdgePool`; ``client_app`` (a ``ClientApp``) runs the same
:class:`~ecavg.core.participants.EdgeWorker` on each SuperNode. ``ecavg deploy`` (see ``ecavg.deploy``)
starts and submits them; docs/deploy.md describes a multi-host deployment.

Needs the ``flower`` extra: ``pip install 'ecavg[flower]'``.
"""

try:
    import flwr  # noqa: F401
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "the Flower runtime needs the flwr package: pip install 'ecavg[flower]' (flwr >= 1.42)"
    ) from error

from ecavg.runtime.flower.client import client_app
from ecavg.runtime.flower.server import EdgeQuorumError, FlowerEdgePool, run_server, server_app

SERVER_APP = "ecavg.runtime.flower:server_app"
CLIENT_APP = "ecavg.runtime.flower:client_app"

__all__ = ["CLIENT_APP", "SERVER_APP", "EdgeQuorumError", "FlowerEdgePool", "client_app", "run_server", "server_app"]
