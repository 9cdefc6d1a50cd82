"""A long-lived ClientApp runner beside one SuperNode: PyTorch is imported and the edge's data loaded once per run.

Flower 1.42's SuperNode, by default (``--isolation subprocess``), starts a SuperExec that launches a fresh
``flwr-clientapp`` process for every message; that process imports Flower, ecavg and PyTorch and loads the edge's
data again, seconds per message on a small machine. Started with ``--isolation process``, the SuperNode launches
nothing and waits for an outside executor to take its tasks from its Runtime API. This module is such an executor
that runs every task in its own process instead of a new one:

    python -m ecavg.runtime.flower.warm_clientapp --runtime-api-address 127.0.0.1:PORT --insecure

It polls the Runtime API for a ClientApp task (``AcquireTask``), then does what ``flwr-clientapp --token`` does with
it (Flower's own ``pull_task_input``, ``push_message`` and ``push_task_output``, and a task heartbeat): pulls the
message, the node's context and the app, calls the ClientApp, pushes the reply and the updated context (whose
``state`` Flower keeps per node and run, as with fresh processes). An exception in the ClientApp becomes an error
reply, as Flower makes it. ecavg's ClientApp caches each (run, node)'s edge (``client._edges``) and keeps no model
between messages, so the numbers are those of fresh processes (the determinism tests compare them).

What it gives up: a ClientApp that crashes the process (not an exception) takes the runner with it, so whoever
starts it must watch it (``ecavg deploy local`` stops the SuperNode and tells the SuperLink the node is gone), and
every app the SuperNode runs shares one process. ``--parent-pid`` ends it when the SuperNode exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_dir
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

log = logging.getLogger("ecavg")

# How often an idle runner asks its SuperNode for a task: a local HTTP call, cheap; Flower's SuperExec asks every 1 s.
POLL_INTERVAL_S = 0.05


def runtime_client(address: str, *, insecure: bool, certificates: bytes | None, token: str | None = None,
                   ) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec" if token is None else "flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=insecure,
                                                 root_certificates=certificates, interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def run_task(address: str, token: str, *, insecure: bool, certificates: bytes | None) -> None:
    """One task, as ``flwr-clientapp --token`` runs it, in this process."""
    client = runtime_client(address, insecure=insecure, certificates=certificates, token=token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = reply = context = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        if not get_project_dir(run.fab_id, run.fab_version, fab.hash_str).exists():
            install_from_fab(fab.content, skip_prompt=True)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        client_app = load(run.fab_id, run.fab_version, fab.hash_str)  # imported once: Flower caches the module
        reply = client_app(message=message, context=context)
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as error:  # noqa: BLE001 - every failure becomes an error reply, as in flwr-clientapp
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(error, LoadClientAppError) \
            else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = f"{type(error)}:<'{error}'>"
        log.exception("the ClientApp raised an exception")
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()


def serve(address: str, *, insecure: bool, certificates: bytes | None, poll_s: float = POLL_INTERVAL_S) -> None:
    """Take the SuperNode's ClientApp tasks one at a time, for ever."""
    acquirer = runtime_client(address, insecure=insecure, certificates=certificates)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    while True:
        try:
            response = acquirer.AcquireTask(request)
        except Exception as error:  # noqa: BLE001 - the SuperNode may still be starting: try again
            log.debug("AcquireTask failed: %s", error)
            time.sleep(1.0)
            continue
        if response.HasField("task") and response.token:
            run_task(address, response.token, insecure=insecure, certificates=certificates)
        else:
            time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    parser.add_argument("--insecure", action="store_true", help="the Runtime API is plain HTTP")
    parser.add_argument("--root-certificates", default=None, help="CA certificate of a TLS Runtime API")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    args = parser.parse_args(argv)
    if args.insecure == (args.root_certificates is not None):
        parser.error("give --insecure or --root-certificates, not both or neither")
    certificates = None
    if args.root_certificates is not None:
        with open(args.root_certificates, "rb") as f:
            certificates = f.read()
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # raises SIGINT here when the SuperNode is gone
    # Import the edge's code (and PyTorch) now, while the SuperNode connects, not when the first message waits.
    import ecavg.runtime.flower.client  # noqa: F401
    try:
        serve(args.runtime_api_address, insecure=args.insecure, certificates=certificates)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
