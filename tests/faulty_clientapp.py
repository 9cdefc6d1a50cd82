"""A ClientApp for the fault-injection tests (tests/test_faults.py): the real edge (``ecavg.runtime.flower.client``),
except that a SuperNode whose node config holds ``fault = "<kind>"`` answers the pre-training message with a
malformed reply of that kind, as a buggy or hostile edge would:

* ``wrong-shape``: a well-formed safetensors payload whose first weight matrix has one row too many;
* ``not-safetensors``: a payload of bytes that are not safetensors at all.

Flower loads it by name (``tests.faulty_clientapp:client_app``) in the ClientApp processes, which find it through
the PYTHONPATH that ``ecavg deploy`` gives them (the repository root).
"""

from __future__ import annotations

import json

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ecavg.core.serialization import decode_state_dict, encode_state_dict
from ecavg.runtime.flower import client as real
from ecavg.runtime.flower import wire

FAULTS = ("wrong-shape", "not-safetensors")

client_app = ClientApp()


def _garbage_payload(fault: str, message: Message) -> bytes:
    if fault == "not-safetensors":
        return b"\x00\xffthis is not a safetensors payload\x00" * 64
    received = decode_state_dict(wire.payload_bytes(message.content, wire.WEIGHTS, source="server", max_bytes=None),
                                 name="server")
    name = next(k for k, v in received.items() if v.is_floating_point() and v.dim() == 2)
    rows, cols = received[name].shape
    received[name] = torch.zeros(rows + 1, cols, dtype=received[name].dtype)
    return encode_state_dict(received)


def _malformed_reply(fault: str, message: Message) -> Message:
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r} in the node config (known: {', '.join(FAULTS)})")
    content = RecordDict({
        wire.WEIGHTS: wire.payload_record(_garbage_payload(fault, message)),
        wire.METRICS: MetricRecord({"num-samples": 100, "accuracy": 0.5, "test-samples": 10}),
        wire.REPORT: wire.config_record(history=json.dumps([])),
    })
    return Message(content, reply_to=message)


@client_app.query("hello")
def hello(message: Message, context: Context) -> Message:
    return real.hello(message, context)


@client_app.query("data")
def data(message: Message, context: Context) -> Message:
    return real.data(message, context)


@client_app.train("pretrain")
def pretrain(message: Message, context: Context) -> Message:
    fault = context.node_config.get("fault")
    if fault:
        return _malformed_reply(str(fault), message)
    return real.pretrain(message, context)


@client_app.train("fedavg")
def fedavg_round(message: Message, context: Context) -> Message:
    return real.fedavg_round(message, context)


@client_app.evaluate("update")
def update(message: Message, context: Context) -> Message:
    return real.update(message, context)
