"""The Flower runtime: message validation (fast, in-process) and real deployments on 127.0.0.1.

The integration tests start a real SuperLink and SuperNodes (separate processes, free ports, bounded
timeouts) on the shipped MNIST sample and check afterwards that every process they started is gone.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower runtime needs the flower extra (pip install 'ecavg[flower]')")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict  # noqa: E402

from ecavg.config import ConfigError, load_toml, resolve_config  # noqa: E402
from ecavg.config.deploy import check_data_policy, deploy_settings  # noqa: E402
from ecavg.core.checkpoint import PhaseStore  # noqa: E402
from ecavg.core.participants import DataSpec  # noqa: E402
from ecavg.core.serialization import encode_state_dict  # noqa: E402
from ecavg.deploy import DeployError, deploy_local  # noqa: E402
from ecavg.deploy.reaper import process_stats  # noqa: E402
from ecavg.experiment import run_experiment  # noqa: E402
from ecavg.runtime.flower import wire  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.toml"
# The round timeout of the tests where edge-1 dies. The server does not wait it out: it drops edge-1 when the
# SuperLink reports its SuperNode gone (Flower 1.42: within 2 x 30 s of its last heartbeat). It only has to be
# longer than that and than every phase of the live edge (30-60 s each on 2 heavily loaded cores), so that the
# reason is "gone", never a timeout of either edge.
DEAD_EDGE_TIMEOUT_S = float(os.environ.get("ECAVG_TEST_ROUND_TIMEOUT_S", "600"))
DEAD_EDGE_REASON = r"gone: its SuperNode \(node \d+\) (stopped or missed its heartbeats|is no longer connected)"


def _quick_config(**overrides) -> dict:
    """The quickstart experiment, single-threaded (the same float reductions in every process), shortened."""
    user = load_toml(QUICKSTART)
    user["threads"] = 1
    user["edge"] = {**user.get("edge", {}), "epochs": 2}
    user["server"] = {**user.get("server", {}), "epochs": 1}
    for key, value in overrides.items():
        user[key] = value
    return user


# ---------------------------------------------------------------------------------------------------
# Process bookkeeping: nothing a deployment started may survive it
# ---------------------------------------------------------------------------------------------------


def live_processes_in_groups(groups: set[int]) -> list[str]:
    """Processes (not zombies) whose process group is one the launcher created."""
    return [f"pid {pid} ({name})" for pid, name, fields in process_stats()
            if int(fields[2]) in groups and fields[0] != "Z"]


def _assert_all_stopped(out: Path) -> None:
    """Neither the processes the launcher started, nor their groups, nor the helpers Flower started under
    them (recorded by the launcher when it stopped them) are alive."""
    pids = json.loads((out / "logs" / "pids.json").read_text())
    helpers = pids.pop("helpers", [])
    assert pids and helpers, "the launcher recorded no processes"
    groups = set(pids.values())
    left = live_processes_in_groups(groups) + [
        f"helper pid {pid}" for pid in helpers
        if Path(f"/proc/{pid}/stat").exists() and (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                                                   != "Z")]
    assert not left, f"processes left behind: {left}"


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process checks read /proc (Linux)")
deploy = pytest.mark.deploy  # starts a real SuperLink/SuperNodes or a simulation: skipped by `make test-fast`


# ---------------------------------------------------------------------------------------------------
# Determinism: the deployment runs the same algorithm as the embedded runtime
# ---------------------------------------------------------------------------------------------------


@deploy
@needs_proc
@pytest.mark.parametrize("warm", [False, True], ids=["per-message-clientapps", "warm-clientapps"])
def test_deploy_local_reproduces_embedded_run(tmp_path, warm):
    user = _quick_config(name="determinism")
    embedded = run_experiment(resolve_config(user), output_dir=tmp_path / "embedded")
    deployed = deploy_local(user, edges=2, output_dir=tmp_path / "deployed", timeout_s=240, warm_clientapps=warm)
    out = Path(deployed["output_dir"])
    try:
        assert deployed["runtime"] == "flower" and embedded["runtime"] == "embedded"
        assert deployed["deploy"]["clientapp"] == ("warm" if warm else "per-message")
        assert deployed["missing_edges"] == {}
        for e_emb, e_dep in zip(embedded["edges"], deployed["edges"], strict=True):
            assert e_dep["name"] == e_emb["name"]
            assert e_dep["train_samples"] == e_emb["train_samples"]
            assert e_dep["test_samples"] == e_emb["test_samples"]
            assert math.isclose(e_dep["accuracy_before"], e_emb["accuracy_before"], abs_tol=1e-9)
            assert math.isclose(e_dep["accuracy_after"], e_emb["accuracy_after"], abs_tol=1e-9)
        for key in ("accuracy_averaged", "accuracy_finetuned"):
            assert math.isclose(deployed["server"][key], embedded["server"][key], abs_tol=1e-9)
        # Same data order, seeds and summation order: the final weights agree to float rounding.
        from ecavg.core.serialization import load_state_dict

        w_emb = load_state_dict(tmp_path / "embedded" / "server.safetensors")
        w_dep = load_state_dict(out / "server.safetensors")
        assert w_emb.keys() == w_dep.keys()
        for key in w_emb:
            torch.testing.assert_close(w_dep[key], w_emb[key], rtol=1e-5, atol=1e-6)
        # The same output directory as `ecavg run`, plus the logs of every process.
        for name in ("results.json", "results.md", "accuracy.png", "metrics.jsonl", "config.json",
                     "edge-0.safetensors", "edge-1.safetensors"):
            assert (out / name).exists(), name
        for name in ("superlink.log", "edge-0.log", "edge-1.log", "server.log", "serverapp.log"):
            assert (out / "logs" / name).stat().st_size > 0, name
        if warm:  # every message ran in the one runner of each SuperNode: no ClientApp process was started
            for k in range(2):
                assert "Receiving: train.pretrain" in (out / "logs" / f"edge-{k}.log").read_text(errors="replace")
                runner_log = (out / "logs" / f"edge-{k}-clientapp.log").read_text(errors="replace")
                assert f"edge-{k} pretrain: test accuracy" in runner_log and f"edge-{k} update: kept" in runner_log
        # The weights went out once (pre-training) and came back once per edge; the data once per edge.
        assert deployed["deploy"]["data_bytes_up"] > 0
        assert deployed["bytes"]["downlink"] == embedded["bytes"]["downlink"]
    finally:
        _assert_all_stopped(out)


@deploy
@needs_proc
def test_deploy_local_reproduces_embedded_ecavg_plus(tmp_path):
    """The ECAvg+ server options deployed: the MNIST preset (weight matching) on the MNIST sample, with distillation
    towards the edges' ensemble and a server holding half of each edge's data, gives the embedded run's figures."""
    user = load_toml(REPO / "configs" / "ecavg_plus" / "mnist_mlp.toml")
    user.update(threads=1, server_data_fraction=0.5, name="ecavg-plus")
    user["data"] = {**user["data"], "dataset": "mnist-sample"}
    user["model"] = {**user["model"], "hidden": 32}
    user["edge"] = {**user["edge"], "epochs": 1}
    user["server"] = {**user["server"], "epochs": 1, "objective": "distill"}
    embedded = run_experiment(resolve_config(user), output_dir=tmp_path / "embedded")
    deployed = deploy_local(user, edges=2, output_dir=tmp_path / "deployed", timeout_s=480)
    out = Path(deployed["output_dir"])
    try:
        assert deployed["missing_edges"] == {}
        for key in ("accuracy_averaged", "accuracy_ensemble", "accuracy_finetuned"):
            assert math.isclose(deployed["server"][key], embedded["server"][key], abs_tol=1e-9), key
        for e_emb, e_dep in zip(embedded["edges"], deployed["edges"], strict=True):
            assert math.isclose(e_dep["accuracy_after"], e_emb["accuracy_after"], abs_tol=1e-9)
        # Each edge uploaded its half (as `ecavg plan` counts it: half the full upload), and the server's model
        # equals the embedded one's, which trained on the same half.
        from ecavg.plan.inputs import data_upload_bytes, setup

        cfg = resolve_config(user)
        half = sum(data_upload_bytes(cfg, setup(cfg, None)))
        full = sum(data_upload_bytes({**cfg, "server_data_fraction": 1.0}, setup(cfg, None)))
        assert deployed["deploy"]["data_bytes_up"] == half and abs(half - full / 2) < 0.01 * full
    finally:
        _assert_all_stopped(out)


# ---------------------------------------------------------------------------------------------------
# Validation of what edges send (in-process: Flower messages built directly)
# ---------------------------------------------------------------------------------------------------

SPEC = DataSpec(num_classes=10, in_channels=1, image_size=4, mean=(0.5,), std=(0.25,))


def _reference() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(3, 4, generator=g), "fc.bias": torch.zeros(3),
            "bn.num_batches_tracked": torch.tensor(5)}


def _reply(content: RecordDict | None = None, *, error: Error | None = None, src: int = 7,
           reply_to: str = "m", message_type: str = wire.PRETRAIN) -> Message:
    from flwr.app import Metadata

    metadata = Metadata(run_id=1, message_id="", src_node_id=src, dst_node_id=0, reply_to_message_id=reply_to,
                        group_id="pretrain", created_at=time.time(), ttl=60.0, message_type=message_type)
    return Message(metadata=metadata, content=content) if error is None else Message(metadata=metadata, error=error)


def _fit_content(weights: dict[str, torch.Tensor] | None = None, *, num_samples=20, accuracy=0.5, test_samples=5,
                 history: str = "[]", data: bytes | None = None) -> RecordDict:
    weights = _reference() if weights is None else weights
    content = RecordDict({
        wire.WEIGHTS: wire.payload_record(encode_state_dict(weights)),
        wire.METRICS: MetricRecord({"num-samples": num_samples, "accuracy": accuracy, "test-samples": test_samples}),
        wire.REPORT: ConfigRecord({"history": history}),
    })
    if data is not None:
        content[wire.TRAIN_DATA] = wire.payload_record(data)
    return content


def _data_payload(n=20, shape=(1, 4, 4), num_classes=10, index=True, label_shift=0) -> bytes:
    tensors = {"images": torch.randint(0, 256, (n, *shape), dtype=torch.uint8),
               "labels": torch.arange(n, dtype=torch.int64) % num_classes + label_shift}
    if index:
        tensors["index"] = torch.arange(n, dtype=torch.int64)
    return encode_state_dict(tensors)


def _parse(reply: Message, **kwargs):
    options = {"source": "edge-3", "node_id": 7, "reference": _reference(), "max_bytes": 1 << 20, **kwargs}
    return wire.parse_fit_reply(reply, **options)


def test_a_valid_reply_is_accepted_bit_exact():
    weights = {k: v + 1 if v.is_floating_point() else v for k, v in _reference().items()}
    parsed, data, data_bytes = _parse(_reply(_fit_content(weights, data=_data_payload())), spec=SPEC)
    for key in weights:
        assert torch.equal(parsed.weights[key], weights[key])
    assert (parsed.num_samples, parsed.accuracy, parsed.test_samples) == (20, 0.5, 5)
    assert data is not None and len(data) == 20 and data_bytes > 0


@pytest.mark.parametrize("mutate, expected", [
    (lambda w: w.pop("fc.bias"), r"missing tensor\(s\) 'fc.bias'"),
    (lambda w: w.update(extra=torch.zeros(1)), r"unexpected tensor\(s\) 'extra'"),
    (lambda w: w.update({"fc.weight": torch.zeros(4, 3)}), r"'fc.weight' has shape \(4, 3\), expected \(3, 4\)"),
    (lambda w: w.update({"fc.weight": torch.zeros(3, 4, dtype=torch.float64)}), r"'fc.weight' has dtype torch.float64"),
    (lambda w: w.update({"fc.bias": torch.tensor([0.0, float("nan"), 0.0])}), r"'fc.bias' contains NaN or Inf"),
    (lambda w: w.update({"fc.bias": torch.tensor([0.0, float("inf"), 0.0])}), r"'fc.bias' contains NaN or Inf"),
])
def test_wrong_weights_are_rejected_naming_the_edge(mutate, expected):
    weights = _reference()
    mutate(weights)
    with pytest.raises(wire.EdgeReplyError, match=r"'edge-3'.*" + expected):
        _parse(_reply(_fit_content(weights)))


def test_an_oversized_payload_is_rejected_before_parsing():
    reply = _reply(_fit_content())
    with pytest.raises(wire.EdgeReplyError, match=r"edge-3: 'weights' payload of \d+ bytes exceeds the limit of 100"):
        _parse(reply, max_bytes=100)


def test_nothing_received_is_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    evil = pickle.dumps({"fc.weight": Exploit()})
    content = _fit_content()
    content[wire.WEIGHTS] = wire.payload_record(evil)
    with pytest.raises(wire.EdgeReplyError, match="edge-3.*not a valid safetensors payload"):
        _parse(_reply(content))
    # An array in numpy's own serialisation (what ArrayRecord(torch_state_dict) would send) is refused too.
    content[wire.WEIGHTS] = ArrayRecord({"payload": Array(torch.zeros(3).numpy())})
    with pytest.raises(wire.EdgeReplyError, match="serialisation 'numpy.ndarray'"):
        _parse(_reply(content))
    assert not marker.exists()


@pytest.mark.parametrize("metrics, expected", [
    ({"num-samples": 0}, "'num-samples' must be an integer >= 1"),
    ({"num-samples": 2.5}, "'num-samples' must be an integer >= 1"),
    ({"accuracy": 1.5}, r"'accuracy' must be a number in \[0, 1\]"),
    ({"accuracy": float("nan")}, r"'accuracy' must be a number in \[0, 1\]"),
    ({"test-samples": -1}, "'test-samples' must be an integer >= 0"),
])
def test_wrong_numbers_are_rejected(metrics, expected):
    values = {"num_samples": 20, "accuracy": 0.5, "test_samples": 5}
    values.update({k.replace("-", "_"): v for k, v in metrics.items()})
    with pytest.raises(wire.EdgeReplyError, match="edge-3.*" + expected):
        _parse(_reply(_fit_content(**values)))


def test_error_replies_replies_from_other_nodes_and_bad_history_are_rejected():
    with pytest.raises(wire.EdgeReplyError, match=r"edge-3: error reply \(code 2\): ClientApp raised"):
        _parse(_reply(error=Error(code=2, reason="ClientApp raised ValueError")))
    with pytest.raises(wire.EdgeReplyError, match="edge-3: reply came from node 8, expected node 7"):
        _parse(_reply(_fit_content(), src=8))
    with pytest.raises(wire.EdgeReplyError, match="'history' is not valid JSON"):
        _parse(_reply(_fit_content(history="[{")))
    with pytest.raises(wire.EdgeReplyError, match="'history' must be a list"):
        _parse(_reply(_fit_content(history='[{"loss": "x"}]')))
    content = _fit_content()
    del content[wire.METRICS]
    with pytest.raises(wire.EdgeReplyError, match="edge-3: the reply has no 'metrics' record"):
        _parse(_reply(content))


@pytest.mark.parametrize("payload, expected", [
    (_data_payload(shape=(3, 4, 4)), r"training images must be uint8 \[N, 1, 4, 4\]"),
    (_data_payload(label_shift=5), r"training labels span \[5, 14\] but the run has 10 classes"),
    (_data_payload(n=21), "reports 20 training samples but uploaded 21"),
    (encode_state_dict({"images": torch.zeros(2, 1, 4, 4, dtype=torch.uint8), "secrets": torch.zeros(2)}),
     "training data must hold 'images', 'labels'"),
])
def test_wrong_training_data_is_rejected(payload, expected):
    with pytest.raises(wire.EdgeReplyError, match="edge-3.*" + expected):
        _parse(_reply(_fit_content(data=payload)), spec=SPEC)


def test_deploy_settings_are_checked():
    assert deploy_settings({}).required_edges(4) == 4
    assert deploy_settings({"min_edges": 2}, num_edges=4).required_edges(4) == 2
    with pytest.raises(ConfigError, match="unknown config key 'deploy.min_edge'"):
        deploy_settings({"min_edge": 1})
    with pytest.raises(ConfigError, match="'deploy.share_data' must be one of full, none"):
        deploy_settings({"share_data": "some"})
    with pytest.raises(ConfigError, match="'deploy.min_edges' is 3 but the run has only 2 edges"):
        deploy_settings({"min_edges": 3}, num_edges=2)
    with pytest.raises(ConfigError, match="'deploy.round_timeout_s' must be a number > 0"):
        deploy_settings({"round_timeout_s": 0})
    with pytest.raises(ConfigError, match="only used with deploy.share_data = \"none\""):
        deploy_settings({"server_data": "mnist"})
    # resolve_config checks the section and keeps it, with defaults, in the resolved config.
    assert resolve_config({"deploy": {"min_edges": 1}})["deploy"]["min_edges"] == 1
    assert resolve_config({})["deploy"]["share_data"] == "full"
    with pytest.raises(ConfigError, match="deploy.min_edges"):
        resolve_config({"deploy": {"min_edges": 3}})
    none = deploy_settings({"share_data": "none"})
    assert "one-shot FedAvg" in check_data_policy(resolve_config({}), none)
    with pytest.raises(ConfigError, match='init = "warmup" uses the server\'s data'):
        check_data_policy(resolve_config({"init": "warmup"}), none)
    with pytest.raises(ConfigError, match='aggregation = "match_activations" uses the server\'s data'):
        check_data_policy(resolve_config({"aggregation": "match_activations"}), none)


# ---------------------------------------------------------------------------------------------------
# The server's pool against a scripted grid: ordering, missing edges, quorum
# ---------------------------------------------------------------------------------------------------


class ScriptedGrid:
    """A stand-in for Flower's Grid: each node answers through a Python function (None: never answers).
    Replies come back in reverse order of sending, to show that the pool restores edge order."""

    def __init__(self, nodes: dict[int, object]):
        self.nodes = nodes
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message_id = f"m{len(self.sent)}"
            self.sent.append(message)
            node = message.metadata.dst_node_id
            answer = self.nodes[node](message)
            if isinstance(answer, Error):
                self.replies[message_id] = _reply(error=answer, src=node, reply_to=message_id)
            elif answer is not None:
                self.replies[message_id] = _reply(answer, src=node, reply_to=message_id,
                                                  message_type=message.metadata.message_type)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        ready = [i for i in message_ids if i in self.replies]
        return [self.replies.pop(i) for i in reversed(ready)]


def _scripted_edge(partition_id: int, behaviour: str = "ok"):
    def answer(message: Message):
        kind = message.metadata.message_type
        if kind == wire.HELLO:
            return RecordDict({wire.METRICS: MetricRecord({"partition-id": partition_id, "train-samples": 20,
                                                           "test-samples": 5}),
                               wire.REPORT: ConfigRecord({"mode": "partition"})})
        if behaviour == "silent":
            return None
        if behaviour == "crash":
            return Error(code=2, reason="<class 'RuntimeError'>:<'out of memory'>")
        if kind == wire.UPDATE:
            return RecordDict({wire.METRICS: MetricRecord({"accuracy": 0.5, "test-samples": 5})})
        weights = {k: v + partition_id if v.is_floating_point() else v for k, v in _reference().items()}
        if behaviour == "nan":
            weights["fc.bias"] = torch.full((3,), float("nan"))
        if message.content[wire.CONFIG].get("send-data"):
            return _fit_content(weights, data=encode_state_dict({
                "images": torch.full((20, 1, 4, 4), partition_id, dtype=torch.uint8),
                "labels": torch.full((20,), partition_id, dtype=torch.int64),
                "index": torch.arange(20, dtype=torch.int64) * 4 + partition_id}))
        return _fit_content(weights)

    return answer


def _pool(grid, *, num_edges, min_edges=0, timeout=0.5):
    from ecavg.runtime.flower.server import FlowerEdgePool

    settings = deploy_settings({"min_edges": min_edges, "round_timeout_s": timeout, "connect_timeout_s": 1.0},
                               num_edges=num_edges)
    return FlowerEdgePool(grid, num_edges=num_edges, settings=settings, spec=SPEC, classes=[str(c) for c in range(10)],
                          reference=_reference(), upload_data=True, server_data=None)


@pytest.fixture
def task_identity(monkeypatch):
    # Flower stamps outgoing messages with the run id of the task; outside a run, give it one.
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_pool_keeps_edge_order_and_records_missing_edges(task_identity):
    # node ids are unrelated to partition ids; replies arrive in reverse order
    grid = ScriptedGrid({101: _scripted_edge(3), 102: _scripted_edge(0), 103: _scripted_edge(2, "nan"),
                         104: _scripted_edge(1, "silent"), 105: _scripted_edge(4, "crash")})
    pool = _pool(grid, num_edges=5, min_edges=2)
    pool.connect()
    assert pool.nodes == {"edge-0": 102, "edge-1": 104, "edge-2": 103, "edge-3": 101, "edge-4": 105}
    replies = list(pool.fit(_reference(), phase="pretrain", epochs=1, only=pool.names))
    assert [r.name for r in replies] == ["edge-0", "edge-3"]
    assert torch.equal(replies[1].weights["fc.bias"], torch.full((3,), 3.0))
    assert pool.missing["edge-1"].startswith("timeout: no reply to train.pretrain within 0.5 s")
    assert pool.missing["edge-2"] == ("rejected: weights from 'edge-2': tensor 'fc.bias' contains NaN or Inf "
                                      "values (phase pretrain)")
    assert pool.missing["edge-4"].startswith("error: edge-4: error reply (code 2)") and "out of memory" in \
        pool.missing["edge-4"]
    # The server's data: the uploads, put back in the run's order by their positions.
    union = pool.training_data()
    assert len(union) == 40 and union.labels.tolist() == [0, 3] * 20
    # Missing edges get no further messages; the others are evaluated.
    evaluations = list(pool.evaluate(_reference(), phase="update"))
    assert sorted(e.name for e in evaluations) == ["edge-0", "edge-3"]
    assert {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == wire.UPDATE} == {101, 102}


def test_pool_stops_below_min_edges_naming_the_missing(task_identity):
    from ecavg.runtime.flower.server import EdgeQuorumError

    grid = ScriptedGrid({1: _scripted_edge(0), 2: _scripted_edge(1, "silent"), 3: _scripted_edge(2)})
    pool = _pool(grid, num_edges=3, min_edges=3)
    pool.connect()
    with pytest.raises(EdgeQuorumError, match=r"pretrain: only 2 of 3 edges took part, but deploy.min_edges "
                                              r"requires 3.*edge-1: timeout"):
        list(pool.fit(None, phase="pretrain", epochs=1, only=pool.names))


def test_pool_refuses_a_federation_that_does_not_fit(task_identity):
    from ecavg.runtime.flower.server import DeploymentError, EdgeQuorumError

    grid = ScriptedGrid({1: _scripted_edge(0), 2: _scripted_edge(0)})
    with pytest.raises(DeploymentError, match="SuperNodes 1 and 2 both have partition-id 0"):
        _pool(grid, num_edges=2).connect()
    grid = ScriptedGrid({1: _scripted_edge(0), 2: _scripted_edge(5)})
    with pytest.raises(EdgeQuorumError, match=r"connect: only 1 of 2.*edge-1: not connected.*partition-id 5 is out "
                                              r"of range"):
        _pool(grid, num_edges=2).connect()


NODE_UNAVAILABLE = Error(code=5, reason="Error: Node Unavailable - The destination node failed to report a heartbeat")


class VanishingGrid(ScriptedGrid):
    """A node that the SuperLink stops listing once a message of ``message_type`` was sent to it."""

    def __init__(self, nodes, *, vanishes: int, message_type: str):
        super().__init__(nodes)
        self.vanishes, self.message_type, self.gone = vanishes, message_type, False

    def get_node_ids(self):
        return [n for n in self.nodes if not (self.gone and n == self.vanishes)]

    def push_messages(self, messages):
        messages = list(messages)
        self.gone |= any(m.metadata.dst_node_id == self.vanishes and m.metadata.message_type == self.message_type
                         for m in messages)
        return super().push_messages(messages)


def test_pool_drops_an_edge_whose_supernode_is_gone_without_waiting_for_the_timeout(task_identity):
    """Node 2 is reported unavailable by the SuperLink (its error reply), node 3 disappears from the node list
    and never answers: both are dropped within a few liveness checks, not after the 60 s round timeout."""
    from ecavg.runtime.flower.server import LIVENESS_CHECK_S

    def unavailable_after_hello(partition_id):
        edge = _scripted_edge(partition_id)
        return lambda m: edge(m) if m.metadata.message_type == wire.HELLO else NODE_UNAVAILABLE

    grid = VanishingGrid({1: _scripted_edge(0), 2: unavailable_after_hello(1), 3: _scripted_edge(2, "silent")},
                         vanishes=3, message_type=wire.PRETRAIN)
    pool = _pool(grid, num_edges=3, min_edges=1, timeout=60.0)
    pool.connect()
    started = time.monotonic()
    replies = list(pool.fit(_reference(), phase="pretrain", epochs=1, only=pool.names))
    took = time.monotonic() - started
    assert [r.name for r in replies] == ["edge-0"]
    assert took < 3 * LIVENESS_CHECK_S + 2, f"the pool waited {took:.1f} s for edges that were gone"
    assert pool.missing["edge-1"] == ("gone: its SuperNode (node 2) stopped or missed its heartbeats; the SuperLink "
                                      "reports it unavailable (phase pretrain)")
    assert pool.missing["edge-2"] == "gone: its SuperNode (node 3) is no longer connected to the SuperLink (phase " \
                                     "pretrain)"
    assert set(pool.drop_seconds["pretrain"]) == {"edge-1", "edge-2"}
    assert pool.drop_seconds["pretrain"]["edge-2"] >= LIVENESS_CHECK_S


def test_the_hello_exchange_waits_connect_timeout_not_the_round_timeout(task_identity):
    def mute_at_hello(message):
        return None

    grid = ScriptedGrid({1: _scripted_edge(0), 2: mute_at_hello})
    from ecavg.runtime.flower.server import FlowerEdgePool

    settings = deploy_settings({"min_edges": 1, "round_timeout_s": 3600.0, "connect_timeout_s": 1.5}, num_edges=2)
    pool = FlowerEdgePool(grid, num_edges=2, settings=settings, spec=SPEC, classes=[str(c) for c in range(10)],
                          reference=_reference(), upload_data=True, server_data=None)
    started = time.monotonic()
    pool.connect()
    assert 1.5 <= time.monotonic() - started < 10
    assert pool.nodes == {"edge-0": 1}
    assert pool.missing["edge-1"].startswith("not connected: no usable SuperNode with partition-id 1 within 1.5 s")
    assert "SuperNode 2 did not answer query.hello within 1.5 s" in pool.missing["edge-1"]


def test_each_edge_reports_its_host_and_a_malformed_one_keeps_it_out(task_identity):
    def with_host(partition_id, host_text):
        def answer(message):
            content = _scripted_edge(partition_id)(message)
            if message.metadata.message_type == wire.HELLO:
                content[wire.REPORT]["host"] = host_text
            return content
        return answer

    host = {"cpu": "Edge CPU", "cpu_capability": "AVX2", "torch": "2.14.1"}
    grid = ScriptedGrid({1: with_host(0, json.dumps(host)), 2: with_host(1, "[1, 2]")})
    pool = _pool(grid, num_edges=2, min_edges=1)
    pool.connect()
    assert pool.hosts == {"edge-0": host}
    assert "node 2: 'host' must be a JSON object" in pool.missing["edge-1"]


def test_a_push_the_superlink_refuses_drops_every_edge_it_carried(task_identity):
    class RefusingGrid(ScriptedGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if messages[0].metadata.message_type == wire.PRETRAIN:
                return []  # what Flower's grid returns when the SuperLink refuses the push as too large
            return super().push_messages(messages)

    pool = _pool(RefusingGrid({1: _scripted_edge(0), 2: _scripted_edge(1)}), num_edges=2, min_edges=1)
    pool.connect()
    from ecavg.runtime.flower.server import EdgeQuorumError

    with pytest.raises(EdgeQuorumError, match="only 0 of 2 edges took part"):
        list(pool.fit(_reference(), phase="pretrain", epochs=1, only=pool.names))
    assert pool.missing["edge-0"].startswith("error: the SuperLink did not accept the message")


# ---------------------------------------------------------------------------------------------------
# Real deployments with failing edges, TLS and SuperNode authentication
# ---------------------------------------------------------------------------------------------------


def _kill_when(federation, label: str, text: str, *, within_s: float = 200.0) -> threading.Thread:
    """Kill SuperNode ``label`` (its whole process group) as soon as its log shows ``text``."""
    log_path = federation.logs_dir / f"{label}.log"

    def watch() -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if log_path.exists() and text in log_path.read_text(errors="replace"):
                federation.kill(label)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@deploy
@needs_proc
def test_tls_authenticated_run_goes_on_without_a_dead_edge_and_refuses_strangers(tmp_path):
    """Over TLS with SuperNode authentication: a SuperNode without a registered key is refused; edge-1 dies
    while pre-training; with min_edges = 1 the run finishes with edge-0 and records why edge-1 is missing."""
    user = _quick_config(name="tls-dead-edge", deploy={"min_edges": 1, "round_timeout_s": DEAD_EDGE_TIMEOUT_S})
    watchers = []

    def disturb(federation) -> None:
        # Not registered, and claiming edge-0's partition: if it got in, the run would fail on the duplicate.
        federation.start_supernode("stranger", {"partition-id": 0})
        watchers.append(_kill_when(federation, "edge-1", "Receiving: train.pretrain"))

    results = deploy_local(user, edges=2, output_dir=tmp_path / "run", tls=True, node_auth=True,
                           timeout_s=600, on_started=disturb)
    out = Path(results["output_dir"])
    try:
        assert list(results["missing_edges"]) == ["edge-1"]
        assert re.match(DEAD_EDGE_REASON, results["missing_edges"]["edge-1"]), results["missing_edges"]
        edges = {e["name"]: e for e in results["edges"]}
        assert edges["edge-0"]["accuracy_before"] > 0.5 and edges["edge-0"]["accuracy_after"] > 0.5
        assert edges["edge-1"]["accuracy_before"] is None and edges["edge-1"]["accuracy_after"] is None
        assert edges["edge-1"]["missing"] == results["missing_edges"]["edge-1"]
        assert not (out / "edge-1.safetensors").exists(), "edge-1 dropped out but has weights written as if updated"
        assert results["server"]["accuracy_finetuned"] > 0.5
        stranger_log = (out / "logs" / "stranger.log").read_text(errors="replace")
        assert "SuperNode authentication is enabled" in stranger_log
        superlink_log = (out / "logs" / "superlink.log").read_text(errors="replace")
        assert "--insecure" not in json.dumps(results) and "insecure HTTP server" not in superlink_log
        assert (out / "deploy" / "credentials" / "ca.crt").exists()
    finally:
        _assert_all_stopped(out)


@deploy
@needs_proc
def test_a_run_below_min_edges_stops_with_a_clear_error_and_keeps_what_it_has(tmp_path):
    user = _quick_config(name="quorum", deploy={"round_timeout_s": DEAD_EDGE_TIMEOUT_S})  # min_edges 0: every edge

    def disturb(federation) -> None:
        _kill_when(federation, "edge-1", "Receiving: train.pretrain")

    out = tmp_path / "run"
    with pytest.raises(DeployError, match=r"the run stopped: EdgeQuorumError: pretrain: only 1 of 2 edges took "
                                          r"part, but deploy.min_edges requires 2 .*edge-1: " + DEAD_EDGE_REASON):
        deploy_local(user, edges=2, output_dir=out, timeout_s=600, on_started=disturb)
    try:
        failure = json.loads((out / "failure.json").read_text())
        assert re.match(DEAD_EDGE_REASON, failure["missing_edges"]["edge-1"]), failure["missing_edges"]
        # edge-0's pre-training reply is kept (its record, and its weights in the running sum: the default
        # aggregation streams, so no edge's weights are checkpointed on their own), as are the logs of every process.
        description, tensors = PhaseStore(out / "checkpoints").load_running("pretrain")
        assert list(description["records"]) == ["edge-0"] and description["aggregator"]["names"] == ["edge-0"]
        record = description["records"]["edge-0"]
        assert record["num_samples"] == 2000 and 0.5 < record["accuracy"] <= 1.0
        assert tensors and not (out / "checkpoints" / "pretrain__edge-0.safetensors").exists()
        assert not (out / "results.json").exists()
        for name in ("superlink.log", "edge-0.log", "edge-1.log", "server.log", "serverapp.log"):
            assert (out / "logs" / name).exists(), name
        assert "EdgeQuorumError" in (out / "logs" / "serverapp.log").read_text(errors="replace")
    finally:
        _assert_all_stopped(out)


def test_certs_make_a_ca_a_server_certificate_and_node_keys(tmp_path, capsys):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    from ecavg.certs import CertificateError, make_credentials
    from ecavg.cli import main

    assert main(["certs", "--out", str(tmp_path / "c"), "--host", "10.1.2.3", "--host", "link.example.org",
                 "--nodes", "2"]) == 0
    # Loopback is always covered (Flower's SuperExec connects to 127.0.0.1), and the output says so.
    assert "10.1.2.3, link.example.org and, always, 127.0.0.1, ::1, localhost" in capsys.readouterr().out
    root = tmp_path / "c"
    server = x509.load_pem_x509_certificate((root / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((root / "ca.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "127.0.0.1", "::1"]
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org", "localhost"]
    for private in ("ca.key", "server.key", "nodes/edge-0", "nodes/edge-1"):
        assert (root / private).stat().st_mode & 0o077 == 0, f"{private} is readable by others"
    load_ssh_private_key((root / "nodes" / "edge-1").read_bytes(), password=None)
    assert (root / "nodes" / "edge-1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    with pytest.raises(CertificateError, match="exists; pass --force"):
        make_credentials(root, hosts=["10.1.2.3"])
    with pytest.raises(CertificateError, match="neither an IP address nor a DNS name"):
        make_credentials(tmp_path / "d", hosts=["http://x"])
    with pytest.raises(CertificateError, match="0.0.0.0 is an address to listen on"):
        make_credentials(tmp_path / "e", hosts=["0.0.0.0"])


# ---------------------------------------------------------------------------------------------------
# Server and edges together, in one process: the real ServerApp logic and ClientApp handlers
# ---------------------------------------------------------------------------------------------------

_RUN_IDS = iter(range(1000, 100000))


class InProcessGrid(ScriptedGrid):
    """Delivers each message to the real ClientApp (``client_app``) in this process, with the node's own
    node config: the whole protocol of a deployment without processes or network."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict):
        from flwr.app import Context

        from ecavg.runtime.flower import client_app

        run_id = next(_RUN_IDS)  # the ClientApp caches its edge per (run, node)

        def deliver(node_id: int):
            context = Context(run_id=run_id, node_id=node_id, node_config=node_configs[node_id], state=RecordDict(),
                              run_config=run_config)

            def answer(message: Message):
                message.metadata.__dict__["_message_id"] = f"in-{next(_RUN_IDS)}"
                return client_app(message, context).content

            return answer

        super().__init__({node_id: deliver(node_id) for node_id in node_configs})


def _serve_in_process(tmp_path, user: dict, node_configs: dict[int, dict] | None = None) -> dict:
    from ecavg.deploy import prepare_config
    from ecavg.runtime.flower import run_server

    cfg, section = prepare_config(user, edges=None)
    run_config = {"ecavg-config": json.dumps(cfg), "ecavg-deploy": json.dumps(section),
                  "output-dir": str(tmp_path / "served"), "data-dir": ""}
    nodes = node_configs or {10 + k: {"partition-id": k} for k in range(cfg["data"]["num_edges"])}
    return run_server(InProcessGrid(nodes, run_config), run_config, log_to_output=False)


def _accuracies(results: dict) -> tuple:
    return (tuple((e["accuracy_before"], e["accuracy_after"]) for e in results["edges"]),
            results["server"]["accuracy_averaged"], results["server"]["accuracy_finetuned"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "centralized", "local"])
def test_every_strategy_runs_over_the_flower_pool_as_embedded(tmp_path, task_identity, strategy):
    user = _quick_config(strategy=strategy, fedavg={"rounds": 2})
    served = _serve_in_process(tmp_path, user)
    embedded = run_experiment(resolve_config(user), output_dir=tmp_path / "embedded")
    assert _accuracies(served) == _accuracies(embedded)
    # Only a run that trains on the server collects the edges' data.
    assert (served["deploy"]["data_bytes_up"] > 0) == (strategy == "centralized")


@pytest.mark.slow
def test_activation_matching_over_the_flower_pool_as_embedded(tmp_path, task_identity):
    """aggregation = "match_activations" reads the server's data in the aggregate step: a deployment collects the
    edges' data for it, and gets the embedded run's figures."""
    user = _quick_config(shared_init=False, aggregation="match_activations", matching={"samples": 300})
    served = _serve_in_process(tmp_path, user)
    embedded = run_experiment(resolve_config(user), output_dir=tmp_path / "embedded")
    assert _accuracies(served) == _accuracies(embedded)
    assert served["deploy"]["data_bytes_up"] > 0


@pytest.mark.slow
def test_share_data_none_without_server_data_is_a_one_shot_fedavg(tmp_path, task_identity):
    served = _serve_in_process(tmp_path, _quick_config(deploy={"share_data": "none"}))
    assert served["deploy"]["data_bytes_up"] == 0
    assert "one-shot FedAvg" in served["deploy"]["note"]
    assert served["server"]["accuracy_finetuned"] == served["server"]["accuracy_averaged"]
    assert all(e["accuracy_after"] is not None for e in served["edges"])


@pytest.mark.slow
def test_the_server_tracks_a_deployed_run(tmp_path, task_identity):
    pytest.importorskip("tensorboard", reason="tracking needs the tracking extra (pip install 'ecavg[tracking]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    served = _serve_in_process(tmp_path, _quick_config(tracking={"backend": "tensorboard"}))
    out = Path(served["output_dir"])
    acc = EventAccumulator(str(out / "tracking"), size_guidance={"scalars": 0})
    acc.Reload()
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        for field in ("train_loss", "test_accuracy"):
            if field in record:
                tag = f"{record['participant']}/{record['phase']}/{field}"
                expected.setdefault(tag, []).append((record.get("epoch", 0), record[field]))
    assert "edge-1/pretrain/train_loss" in expected and "edge-0/update/test_accuracy" in expected
    for tag, values in expected.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [s for s, _ in values], tag
        assert [e.value for e in events] == pytest.approx([v for _, v in values], rel=1e-6), tag
    [final] = acc.Scalars("results/server/accuracy_finetuned")
    assert final.value == pytest.approx(served["server"]["accuracy_finetuned"], rel=1e-6)


@pytest.mark.slow
def test_an_edge_lost_in_the_update_gets_no_weights_file_and_says_why(tmp_path, task_identity):
    """edge-1's SuperNode is gone when the final weights go out: the run finishes (min_edges = 1), results.json
    names it missing with accuracy_after null, and no edge-1.safetensors pretends that it was updated."""
    from ecavg.deploy import prepare_config
    from ecavg.runtime.flower import run_server

    cfg, section = prepare_config(_quick_config(deploy={"min_edges": 1}), edges=None)
    run_config = {"ecavg-config": json.dumps(cfg), "ecavg-deploy": json.dumps(section),
                  "output-dir": str(tmp_path / "served"), "data-dir": ""}
    grid = InProcessGrid({10: {"partition-id": 0}, 11: {"partition-id": 1}}, run_config)
    live = grid.nodes[11]
    grid.nodes[11] = lambda m: NODE_UNAVAILABLE if m.metadata.message_type == wire.UPDATE else live(m)
    served = run_server(grid, run_config, log_to_output=False)
    out = tmp_path / "served"
    edges = {e["name"]: e for e in served["edges"]}
    assert edges["edge-0"]["missing"] is None and edges["edge-0"]["accuracy_after"] is not None
    assert edges["edge-1"]["accuracy_before"] is not None and edges["edge-1"]["accuracy_after"] is None
    assert edges["edge-1"]["missing"].startswith("gone: its SuperNode (node 11)")
    assert edges["edge-1"]["missing"] == served["missing_edges"]["edge-1"]
    assert json.loads((out / "results.json").read_text())["edges"][1]["missing"] == edges["edge-1"]["missing"]
    assert (out / "edge-0.safetensors").exists() and not (out / "edge-1.safetensors").exists()
    assert "update" in served["deploy"]["dropped_after_s"] and "edge-0" in served["deploy"]["reply_s"]["update"]


def test_an_edge_with_its_own_image_folder(tmp_path, task_identity, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("ECAVG_CACHE_DIR", str(tmp_path / "cache"))  # the decoded folder is cached there

    from ecavg.data import load_dataset

    sample = load_dataset("mnist-sample")
    folder = tmp_path / "site1"
    for split, data, per_class in (("train", sample.train, 12), ("test", sample.test, 4)):
        for c in range(10):
            (folder / split / str(c)).mkdir(parents=True)
            rows = (data.labels == c).nonzero().flatten()[:per_class]
            for i, row in enumerate(rows.tolist()):
                Image.fromarray(data.images[row, 0].numpy(), mode="L").save(folder / split / str(c) / f"{i}.png")
    served = _serve_in_process(tmp_path, _quick_config(), node_configs={
        10: {"partition-id": 0}, 11: {"partition-id": 1, "dataset": f"imagefolder:{folder}"}})
    assert served["deploy"]["edge_data"] == {"edge-0": "partition", "edge-1": "own"}
    assert served["deploy"]["edge_hosts"]["edge-1"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    edges = {e["name"]: e for e in served["edges"]}
    assert (edges["edge-1"]["train_samples"], edges["edge-1"]["test_samples"]) == (120, 40)
    assert edges["edge-1"]["accuracy_after"] is not None
    # The server fine-tuned on the union: edge-0's partition followed by edge-1's own images.
    assert served["bytes"]["uplink"] > served["deploy"]["data_bytes_up"] > 2000 * 784


@deploy
@needs_proc
def test_simulation_runtime_reproduces_embedded_run(tmp_path):
    pytest.importorskip("ray", reason="Flower's simulation runtime needs Ray (pip install 'flwr[simulation]')")
    from ecavg.deploy import deploy_simulation

    user = _quick_config(name="simulation")
    user["data"] = {**user["data"], "num_edges": 3}
    embedded = run_experiment(resolve_config(user), output_dir=tmp_path / "embedded")
    simulated = deploy_simulation(user, output_dir=tmp_path / "simulated", timeout_s=240)
    out = Path(simulated["output_dir"])
    try:
        assert simulated["runtime"] == "flower" and simulated["missing_edges"] == {}
        assert _accuracies(simulated) == _accuracies(embedded)
    finally:
        _assert_all_stopped(out)


def test_the_data_spec_carries_test_time_flips_to_the_edges():
    """data.test_augment travels in the spec the server sends, so a deployed edge evaluates as the embedded one."""
    flipped = DataSpec(num_classes=10, in_channels=3, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                       crop_padding=4, flip=True, test_flip=True)
    spec, classes = wire.spec_from_json(wire.spec_to_json(flipped, [str(c) for c in range(10)]))
    assert spec.test_flip and wire.same_spec(spec, flipped) and classes == [str(c) for c in range(10)]
    plain = DataSpec(**{**flipped.__dict__, "test_flip": False})
    assert not wire.same_spec(plain, flipped)
