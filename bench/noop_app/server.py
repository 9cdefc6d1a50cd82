"""The no-op ServerApp: ``rounds`` rounds of one empty message to each of ``nodes`` SuperNodes, each round timed from
the push to the last reply, polled as often as ecavg's own server polls; the times go to the JSON file ``output``
(run config keys ``rounds``, ``nodes``, ``output``, ``timeout-s``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

# The same polling interval as ecavg's ServerApp (ecavg.runtime.flower.server.POLL_INTERVAL_S), so that the floor
# includes the same polling delay; not imported from there, which would import torch into this process.
POLL_INTERVAL_S = 0.2

server_app = ServerApp()


def wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= count or time.monotonic() > deadline:
            return node_ids
        time.sleep(0.5)


def one_round(grid: Grid, node_ids: list[int], round_index: int, timeout_s: float) -> dict:
    started = time.monotonic()
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query.noop", ttl=timeout_s + 60.0,
                        group_id=f"noop-{round_index}") for n in node_ids]
    pending = {message_id: n for message_id, n in zip(grid.push_messages(messages), node_ids) if message_id}
    reply_s: dict[str, float] = {}
    errors: dict[str, str] = {}
    while pending and time.monotonic() - started < timeout_s:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            reply_s[str(node)] = round(time.monotonic() - started, 3)
            if reply.has_error():
                errors[str(node)] = reply.error.reason
        if pending:
            time.sleep(POLL_INTERVAL_S)
    errors.update({str(n): "no reply" for n in pending.values()})
    return {"round": round_index, "seconds": round(time.monotonic() - started, 3), "reply_s": reply_s,
            "errors": errors}


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    output = Path(str(config["output"]))
    timeout_s = float(config.get("timeout-s", 300.0))
    node_ids = wait_for_nodes(grid, int(config["nodes"]), timeout_s)
    rounds = [one_round(grid, node_ids, r, timeout_s) for r in range(int(config["rounds"]))]
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(json.dumps({"nodes": node_ids, "rounds": rounds}, indent=1) + "\n")
    temporary.rename(output)  # the launcher waits for this file: it must appear whole
