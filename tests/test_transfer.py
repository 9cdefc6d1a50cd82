"""``[transfer]``: every weight transfer under a codec (fp32, fp16, bf16, int8), optionally as a delta from weights both
sides hold, in both runtimes (``ecavg.core.transfer``).

Runs are tiny (a quarter of the shipped MNIST sample, a narrow MLP, one epoch, one thread): the quickstart config
with the overrides in ``BASE``. The Flower tests compare a deployment with the embedded runtime: in process (the
real ServerApp and ClientApp, no network) and, marked ``deploy``, with a real SuperLink and SuperNodes.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from ecavg.config import ConfigError, load_toml, resolve_config
from ecavg.core.aggregation import WeightedAverage
from ecavg.core.codecs import TRANSFER_CODECS, codec
from ecavg.core.serialization import decode_metadata, encode_state_dict, load_state_dict
from ecavg.core.transfer import EdgeLinks, Transfer
from ecavg.errors import WeightsError
from ecavg.experiment import run_experiment

REPO = Path(__file__).resolve().parent.parent
# The same overrides as the command in NOTES-transfer.md (ecavg sweep --config configs/quickstart.toml --set ...).
OVERRIDES = {"threads": 1, "eval_each_epoch": False, "data": {"train_fraction": 0.25}, "model": {"hidden": 64},
             "edge": {"epochs": 1}, "server": {"epochs": 1}}
VARIANTS = {"fp16": ("fp16", False), "bf16": ("bf16", False), "int8": ("int8", False), "int8+delta": ("int8", True)}


def config(transfer: dict | None = None, **sections) -> dict:
    user = load_toml(REPO / "configs" / "quickstart.toml")
    for key, value in {**OVERRIDES, **sections}.items():
        user[key] = {**user[key], **value} if isinstance(value, dict) and isinstance(user.get(key), dict) else value
    if transfer is not None:
        user["transfer"] = transfer
    return user


def deterministic(results: dict) -> tuple:
    """Everything in a results dict that does not depend on timing."""
    return results["edges"], results["server"], results["bytes"], results["transfer"]


def same_files(a: Path, b: Path, names: tuple[str, ...]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("fp32") / "run"
    return run_experiment(config(), output_dir=out), out


# ---------------------------------------------------------------------------------------------------
# Config: the registry, the defaults, what is refused
# ---------------------------------------------------------------------------------------------------


def test_codecs_are_a_registry_the_config_validates(capsys):
    from ecavg.cli import main
    from ecavg.core.options import REGISTRIES

    assert TRANSFER_CODECS in REGISTRIES and TRANSFER_CODECS.selector == "transfer.codec"
    assert TRANSFER_CODECS.names() == ("fp32", "fp16", "bf16", "int8")
    assert resolve_config({})["transfer"] == {"codec": "fp32", "delta": False, "deflate": False}
    assert resolve_config({"transfer": {"codec": "int8", "delta": True}})["transfer"] == {
        "codec": "int8", "delta": True, "deflate": False}
    with pytest.raises(ConfigError, match=r"config key 'transfer.codec' must be one of fp32, fp16, bf16, int8, got "
                                          r"'int4'"):
        resolve_config({"transfer": {"codec": "int4"}})
    with pytest.raises(ConfigError, match=r"config key 'transfer.delta' must be true or false"):
        resolve_config({"transfer": {"delta": "yes"}})
    with pytest.raises(ConfigError, match=r"config key 'transfer.deflate' must be true or false"):
        resolve_config({"transfer": {"deflate": 1}})
    with pytest.raises(ConfigError, match=r"unknown config key 'transfer.level'"):
        resolve_config({"transfer": {"level": 3}})
    assert main(["options"]) == 0
    listed = capsys.readouterr().out
    assert "transfer.codec (default 'fp32'):" in listed and "transfer.delta = False" in listed
    assert "transfer.deflate = False" in listed


@pytest.mark.parametrize("user, needle", [
    ({"transfer": {"codec": "fp32", "delta": True}}, "gains nothing with transfer.codec = \"fp32\""),
    ({"shared_init": False, "transfer": {"codec": "int8", "delta": True}}, "with shared_init = false every edge"),
    ({"strategy": "fedavg", "shared_init": False, "transfer": {"codec": "fp16", "delta": True}}, "shared_init"),
    ({"strategy": "centralized", "transfer": {"codec": "int8", "delta": True}}, "its edges never upload"),
])
def test_delta_without_a_base_is_refused_naming_the_key(user, needle):
    with pytest.raises(ConfigError, match="config key 'transfer.delta'") as error:
        resolve_config(user)
    assert needle in str(error.value)


def test_codecs_without_delta_need_no_base():
    for user in ({"shared_init": False, "transfer": {"codec": "int8"}},
                 {"strategy": "centralized", "transfer": {"codec": "bf16"}}):
        resolve_config(user)


# ---------------------------------------------------------------------------------------------------
# The transfer rules, directly
# ---------------------------------------------------------------------------------------------------


def mlp_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc1.weight": torch.randn(16, 12, generator=g) * 0.1, "fc1.bias": torch.randn(16, generator=g),
            "fc2.weight": torch.randn(4, 16, generator=g) * 0.1, "fc2.bias": torch.randn(4, generator=g)}


def test_fp32_without_delta_is_the_plain_payload_of_before():
    weights = mlp_state(0)
    payload = Transfer().encode(weights)
    assert payload == encode_state_dict(weights) and decode_metadata(payload, name="x") == {}
    decoded = Transfer().decode(payload, reference=weights, name="edge-0")
    assert all(torch.equal(decoded[k], weights[k]) for k in weights)
    # A codec's payload records itself; the plain decoder is not fooled into reading it.
    assert decode_metadata(Transfer("fp16").encode(weights), name="x")["ecavg.codec"] == "fp16"


def test_delta_round_trips_through_the_links():
    """Upload against what the edge received, download against the edge's last upload: both ends decode the same
    bits, and the delta's error scales with the change, not with the weights."""
    transfer = Transfer("int8", True)
    links = EdgeLinks(transfer)
    start, trained = mlp_state(0), mlp_state(0)
    trained = {k: v + 1e-3 * mlp_state(1)[k] for k, v in start.items()}  # a small training step

    first = links.download(start)
    assert first.base("edge-0") is None  # nothing shared yet: sent whole
    received = first.received("edge-0")
    assert first.payload("edge-0") is first.payload("edge-1")  # one payload for every edge sent it whole
    upload = transfer.encode(trained, base=transfer.upload_base(received))
    at_server = transfer.decode(upload, reference=received, base=received, name="edge-0")
    at_edge = transfer.decode(upload, reference=received, base=received, name="edge-0")
    assert all(torch.equal(at_server[k], at_edge[k]) for k in at_server)
    whole = codec("int8").decode(codec("int8").encode(trained), reference=trained, name="edge-0")
    for key in ("fc1.weight", "fc2.weight"):
        delta_error = (at_server[key] - trained[key]).abs().max()
        assert delta_error < (whole[key] - trained[key]).abs().max() / 20, key
    for key in ("fc1.bias", "fc2.bias"):  # 1-D tensors travel exactly
        assert torch.equal(at_server[key], trained[key])

    links.remember_upload("edge-0", at_server)
    final = {k: v + 1e-3 * mlp_state(2)[k] for k, v in trained.items()}
    update = links.download(final)
    assert update.base("edge-0") is at_server and update.base("edge-1") is None
    assert update.payload("edge-0") is not update.payload("edge-1")
    assert decode_metadata(update.payload("edge-0"), name="x")["ecavg.delta"] == "true"
    assert decode_metadata(update.payload("edge-1"), name="x")["ecavg.delta"] == "false"
    got = update.received("edge-0")
    assert float((got["fc1.weight"] - final["fc1.weight"]).abs().max()) < 1e-4
    # Without delta the links keep nothing.
    plain = EdgeLinks(Transfer("int8"))
    plain.remember_upload("edge-0", at_server)
    assert plain.download(final).base("edge-0") is None


def test_deflate_is_lossless_and_shrinks_quantised_weights():
    """transfer.deflate: the receiver decodes exactly what the codec alone gives, from fewer bytes."""
    g = torch.Generator().manual_seed(0)
    # Trained weights are roughly normal; the 1-D tensors here are BatchNorm-like constants.
    weights = {"conv.weight": torch.randn(64, 32, 3, 3, generator=g), "conv.bias": torch.zeros(64),
               "bn.weight": torch.ones(64), "bn.running_var": torch.ones(64)}
    for name, delta in (("fp32", False), ("fp16", False), ("int8", False), ("int8", True)):
        base = {k: v * 0.9 for k, v in weights.items()} if delta else None
        plain, deflated = Transfer(name, delta), Transfer(name, delta, deflate=True)
        small = deflated.encode(weights, base=base)
        assert len(small) < len(plain.encode(weights, base=base)), name
        got = deflated.decode(small, reference=weights, base=base, max_bytes=1 << 20, name="edge-0")
        want = plain.decode(plain.encode(weights, base=base), reference=weights, base=base, name="edge-0")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name
    # Deflate alone, without the byte planes, gains less on float weights: what the planes are for.
    payload = Transfer("fp32").encode(weights)
    assert len(Transfer("fp32", deflate=True).encode(weights)) < 0.97 * len(zlib.compress(payload, 1))
    # fp32 with deflate is not the plain payload any more: it carries the codec's metadata inside the stream.
    assert not Transfer(deflate=True).plain() and Transfer().plain()


@pytest.mark.parametrize("tamper, needle", [
    (lambda p: p[:-7], "zlib stream is truncated"),
    (lambda p: p + b"extra", "5 bytes after the end of the zlib stream"),
    (lambda p: b"PK\x03\x04" + p, "not a valid zlib stream"),
    (lambda p: zlib.compress(bytes(4 << 20)), "inflates beyond the limit of 1048576 bytes"),  # a 4 MB bomb, 4 kB sent
    (lambda p: p + bytes(2 << 20), "bytes exceeds the limit of 1048576 bytes"),
], ids=["truncated", "trailing", "not-zlib", "bomb", "too-large"])
def test_a_bad_deflate_stream_is_refused_before_use(tamper, needle):
    weights = mlp_state(0)
    transfer = Transfer("int8", deflate=True)
    with pytest.raises(WeightsError, match="payload from 'edge-1': ") as error:
        transfer.decode(tamper(transfer.encode(weights)), reference=weights, max_bytes=1 << 20, name="edge-1")
    assert needle in str(error.value)


# ---------------------------------------------------------------------------------------------------
# Embedded: the default is today's run; each codec's bytes and accuracy cost
# ---------------------------------------------------------------------------------------------------


def test_fp32_default_is_identical_to_a_run_without_the_section(tmp_path, fp32_run):
    default, default_out = fp32_run
    explicit = run_experiment(config({"codec": "fp32", "delta": False}), output_dir=tmp_path / "explicit")
    assert deterministic(explicit) == deterministic(default)
    assert default["transfer"] == {"codec": "fp32", "delta": False, "deflate": False}
    same_files(default_out, tmp_path / "explicit", ("server.safetensors", "checkpoints/averaged.safetensors"))
    # The bytes are those of the plain safetensors payloads: two uploads, two pre-training downloads, two updates.
    weights = load_state_dict(default_out / "server.safetensors")
    size = len(encode_state_dict(weights))
    assert default["bytes"] == {"uplink": 2 * size, "downlink": 4 * size}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_codec_end_to_end_embedded(tmp_path, fp32_run, variant, monkeypatch):
    name, delta = VARIANTS[variant]
    fp32, _ = fp32_run
    # What the server averages is what it decoded (a run that streams the average checkpoints no edge's weights).
    uploads: dict[str, dict[str, torch.Tensor]] = {}
    real_add = WeightedAverage.add

    def capturing(self, edge, weights, num_samples):
        uploads.setdefault(edge, {k: v.clone() for k, v in weights.items()})
        return real_add(self, edge, weights, num_samples)

    monkeypatch.setattr(WeightedAverage, "add", capturing)
    results = run_experiment(config({"codec": name, "delta": delta}), output_dir=tmp_path / "run")
    assert results["transfer"] == {"codec": name, "delta": delta, "deflate": False}
    share = 0.25 if name == "int8" else 0.5
    for direction in ("uplink", "downlink"):
        ratio = results["bytes"][direction] / fp32["bytes"][direction]
        assert share <= ratio <= share + 0.02, (direction, ratio)
    # The accuracy cost on this tiny run: a couple of test digits in a thousand at most.
    for e_codec, e_fp32 in zip(results["edges"], fp32["edges"], strict=True):
        for key in ("accuracy_before", "accuracy_after"):
            assert abs(e_codec[key] - e_fp32[key]) <= 0.01, (e_codec["name"], key)
    for key in ("accuracy_averaged", "accuracy_finetuned"):
        assert abs(results["server"][key] - fp32["server"][key]) <= 0.01, key
    # The server holds what crossed the wire, not what the edge trained: sent whole, every decoded int8 weight is
    # an integer multiple of its row's scale (absmax / 127), every fp16 weight a float16 value.
    uploaded = uploads["edge-0"]["hidden.weight"]
    assert uploaded.dtype == torch.float32
    if variant == "int8":
        levels = uploaded / (uploaded.abs().amax(dim=1, keepdim=True) / 127)
        assert torch.allclose(levels, levels.round(), atol=1e-3) and not torch.equal(levels, torch.zeros_like(levels))
    elif variant == "fp16":
        assert torch.equal(uploaded.half().float(), uploaded)
    # Each edge ends with its decoded copy of the server's model, not the server's own: its file holds that copy and
    # its full-test accuracy is that copy's, measured as the server measures its own model.
    from ecavg.plan.inputs import setup

    server_worker = setup(resolve_config(config({"codec": name, "delta": delta})), None).server
    final = load_state_dict(tmp_path / "run" / "server.safetensors")
    for edge in results["edges"]:
        copy = load_state_dict(tmp_path / "run" / f"{edge['name']}.safetensors")
        assert not torch.equal(copy["hidden.weight"], final["hidden.weight"]), edge["name"]
        if not delta:  # sent whole: the codec's round trip of the server's weights
            transfer = Transfer(name)
            assert torch.equal(copy["hidden.weight"], transfer.decode(transfer.encode(final), reference=final,
                                                                      name="server")["hidden.weight"])
        assert edge["accuracy_after_full"] == server_worker.evaluate(copy), edge["name"]


def test_the_training_data_upload_is_deflated_and_checked():
    pytest.importorskip("flwr")
    from flwr.app import RecordDict

    from ecavg.data import ImageDataset
    from ecavg.runtime.flower import wire

    g = torch.Generator().manual_seed(0)
    images = torch.zeros(50, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 10:18, 10:18] = torch.randint(0, 255, (50, 1, 8, 8), generator=g, dtype=torch.uint8)
    data = ImageDataset(images, torch.arange(50) % 10, [str(c) for c in range(10)])
    transfer = Transfer(deflate=True)
    payload = wire.encode_train_data(data, None, transfer)
    assert len(payload) < 0.5 * len(wire.encode_train_data(data, None))

    def decode(raw: bytes, limit: int = 1 << 20):
        content = RecordDict({wire.TRAIN_DATA: wire.payload_record(raw)})
        return wire.decode_train_data(content, source="edge-0", image_shape=(1, 28, 28), num_classes=10,
                                      max_bytes=limit, transfer=transfer)

    got, size = decode(payload)
    assert size == len(payload) and torch.equal(got.images, images) and torch.equal(got.labels, data.labels)
    with pytest.raises(wire.EdgeReplyError, match="payload from 'edge-0': inflates beyond the limit"):
        decode(zlib.compress(bytes(4 << 20)))
    with pytest.raises(wire.EdgeReplyError, match="payload from 'edge-0': not a valid zlib stream"):
        decode(wire.encode_train_data(data, None))  # sent without deflate to a run that deflates


def test_deflate_changes_the_bytes_and_nothing_else(tmp_path):
    """The same run with and without transfer.deflate: identical figures and weights, fewer bytes both ways."""
    int8 = run_experiment(config({"codec": "int8"}), output_dir=tmp_path / "int8")
    deflated = run_experiment(config({"codec": "int8", "deflate": True}), output_dir=tmp_path / "deflated")
    assert deflated["transfer"] == {"codec": "int8", "delta": False, "deflate": True}
    assert (deflated["edges"], deflated["server"]) == (int8["edges"], int8["server"])
    same_files(tmp_path / "int8", tmp_path / "deflated", ("server.safetensors",))
    for direction in ("uplink", "downlink"):
        assert deflated["bytes"][direction] < int8["bytes"][direction], direction


def test_fedavg_rounds_after_the_first_download_deltas(tmp_path, monkeypatch):
    """Round 1 goes to both edges whole, in one payload; every upload is a delta from what its edge received, and
    round 2 and the update go to each edge as a delta from its last upload."""
    bases: list[bool] = []
    real_encode = Transfer.encode

    def spy(self, weights, *, base=None):
        bases.append(base is not None)
        return real_encode(self, weights, base=base)

    monkeypatch.setattr(Transfer, "encode", spy)
    results = run_experiment(config({"codec": "int8", "delta": True}, strategy="fedavg", fedavg={"rounds": 2}),
                             output_dir=tmp_path / "run")
    # round 1: the shared download, two uploads; round 2: two downloads, two uploads; the update: two downloads.
    assert bases == [False] + [True] * 8
    assert results["edges"][0]["accuracy_after"] > 0.5


def test_resume_keeps_the_delta_bases(tmp_path, monkeypatch):
    """A run interrupted during the update resumes with the edges' uploads (from the checkpoints) as the bases of
    their update downloads: the same results as an uninterrupted run."""
    from ecavg.core.participants import EdgeWorker, ServerWorker

    user = config({"codec": "int8", "delta": True})
    reference = run_experiment(user, output_dir=tmp_path / "reference")
    out = tmp_path / "run"
    real_update = EdgeWorker.update

    def interrupted(self, weights):
        if self.name == "edge-1":
            raise KeyboardInterrupt
        return real_update(self, weights)

    monkeypatch.setattr(EdgeWorker, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(user, output_dir=out)

    def must_not_train(self, *args, **kwargs):
        raise AssertionError("a finished phase was trained again on resume")

    monkeypatch.setattr(EdgeWorker, "update", real_update)
    monkeypatch.setattr(EdgeWorker, "fit", must_not_train)
    monkeypatch.setattr(ServerWorker, "train", must_not_train)
    bases = []
    real_encode = Transfer.encode

    def spy(self, weights, *, base=None):
        bases.append(base is not None)
        return real_encode(self, weights, base=base)

    monkeypatch.setattr(Transfer, "encode", spy)
    resumed = run_experiment(resume=out)
    assert bases == [True, True]  # both update downloads were deltas from the restored uploads
    assert deterministic(resumed) == deterministic(reference)


# ---------------------------------------------------------------------------------------------------
# Flower: a bad payload drops its edge; the deployment agrees with the embedded runtime bit for bit
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def task_identity(monkeypatch):
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # as test_flower's task_identity fixture
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _tampered(payload: bytes, change) -> bytes:
    """``payload`` with its tensors changed by ``change`` and its metadata kept (what a faulty edge might send)."""
    from safetensors.torch import load

    tensors = load(payload)  # safetensors: no code runs while reading
    change(tensors)
    return encode_state_dict(tensors, metadata=decode_metadata(payload, name="test"))


def _negative_scale(tensors: dict) -> None:
    tensors["fc.weight:scale"] = -tensors["fc.weight:scale"]


def _short_scale(tensors: dict) -> None:
    tensors["fc.weight:scale"] = tensors["fc.weight:scale"][:2]


@pytest.mark.parametrize("fault, needle", [
    (lambda payload, weights: _tampered(payload, _negative_scale), "tensor 'fc.weight' has an int8 scale <= 0"),
    (lambda payload, weights: _tampered(payload, _short_scale), "'fc.weight:scale'"),
    (lambda payload, weights: codec("fp16").encode(weights), "encoded with codec 'fp16', expected 'int8'"),
    (lambda payload, weights: codec("int8", delta=True).encode(weights, base=weights), "delta='true'"),
    (lambda payload, weights: payload + b" " * (2 << 20), "exceeds the limit"),
], ids=["negative-scale", "scale-shape", "other-codec", "unexpected-delta", "too-large"])
def test_a_bad_payload_from_an_edge_drops_that_edge(task_identity, fault, needle):
    from test_flower import SPEC, ScriptedGrid, _fit_content, _reference, _scripted_edge

    from ecavg.config.deploy import deploy_settings
    from ecavg.runtime.flower import wire
    from ecavg.runtime.flower.server import FlowerEdgePool

    transfer = Transfer("int8")

    def edge(partition_id: int, faulty: bool):
        hello = _scripted_edge(partition_id)

        def answer(message):
            if message.metadata.message_type == wire.HELLO:
                return hello(message)
            received = transfer.decode(wire.payload_bytes(message.content, wire.WEIGHTS, source="server",
                                                          max_bytes=None), reference=_reference(), name="server")
            trained = {k: v + partition_id if v.is_floating_point() else v for k, v in received.items()}
            payload = transfer.encode(trained)
            content = _fit_content(trained)
            content[wire.WEIGHTS] = wire.payload_record(fault(payload, trained) if faulty else payload)
            return content

        return answer

    settings = deploy_settings({"min_edges": 1, "round_timeout_s": 5.0, "connect_timeout_s": 1.0,
                                "max_message_mb": 1}, num_edges=2)
    pool = FlowerEdgePool(ScriptedGrid({11: edge(0, False), 12: edge(1, True)}), num_edges=2, settings=settings,
                          spec=SPEC, classes=[str(c) for c in range(10)], reference=_reference(), upload_data=False,
                          server_data=None, transfer=transfer)
    pool.connect()
    replies = list(pool.fit(_reference(), phase="pretrain", epochs=1))
    assert [r.name for r in replies] == ["edge-0"]
    assert replies[0].bytes_up == replies[0].bytes_down  # same shapes, same codec
    assert pool.missing["edge-1"].startswith("rejected: ") and needle in pool.missing["edge-1"]
    assert "edge-1" in pool.missing["edge-1"] and pool.missing["edge-1"].endswith("(phase pretrain)")


def _same_run(served: dict, served_out: Path, embedded: dict, embedded_out: Path) -> None:
    """Same figures, bytes and server weights (an edge that keeps its own model keeps it on the edge when deployed)."""
    assert served["runtime"] == "flower" and served["missing_edges"] == {}

    def figures(results: dict) -> tuple:
        edges, server, sent, transfer = deterministic(results)
        # A deployment's uplink also carries the edges' training data for the server (deploy.share_data).
        weights_up = sent["uplink"] - results.get("deploy", {}).get("data_bytes_up", 0)
        return ([{k: v for k, v in e.items() if k != "weights_at_edge"} for e in edges], server,
                {**sent, "uplink": weights_up}, transfer)

    assert figures(served) == figures(embedded)
    same_files(served_out, embedded_out, ("server.safetensors",))
    # An edge that kept the server's model holds its decoded copy; the server decoded the same one, bit for bit.
    kept = [e["name"] for e in served["edges"] if e["update_kept"] == "server"]
    same_files(served_out, embedded_out, tuple(f"{name}.safetensors" for name in kept))


@pytest.mark.parametrize("sections", [{}, {"strategy": "fedavg", "fedavg": {"rounds": 2}},
                                      {"update": {"mode": "personal", "epochs": 0}}, {"deflate": True}],
                         ids=["ecavg", "fedavg", "ecavg-personal", "ecavg-deflate"])
def test_flower_int8_delta_agrees_with_embedded_bit_for_bit(tmp_path, monkeypatch, task_identity, sections):
    """In process: the real ServerApp and ClientApp; the edges keep their last upload in context.state."""
    deflate = sections.pop("deflate", False)
    from test_flower import _serve_in_process

    from ecavg.core.participants import EdgeWorker

    received: dict[str, list] = {"served": [], "embedded": []}
    real_fit, real_update = EdgeWorker.fit, EdgeWorker.update

    def recording(runtime: str):
        def fit(self, weights, *, phase, epochs=None):
            received[runtime].append((self.name, phase, weights))
            return real_fit(self, weights, phase=phase, epochs=epochs)

        def update(self, weights):
            received[runtime].append((self.name, "update", weights))
            return real_update(self, weights)

        monkeypatch.setattr(EdgeWorker, "fit", fit)
        monkeypatch.setattr(EdgeWorker, "update", update)

    user = config({"codec": "int8", "delta": True, "deflate": deflate}, **sections)
    recording("served")
    served = _serve_in_process(tmp_path, user)
    recording("embedded")
    embedded = run_experiment(user, output_dir=tmp_path / "embedded")
    _same_run(served, tmp_path / "served", embedded, tmp_path / "embedded")
    # Every edge decoded exactly the same weights from every download in both runtimes.
    assert [(n, p) for n, p, _ in received["served"]] == [(n, p) for n, p, _ in received["embedded"]]
    for (name, phase, a), (_, _, b) in zip(received["served"], received["embedded"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, phase)
    if deflate:  # the training-data upload is deflated too: MNIST digits are mostly background
        pixels = sum(e["train_samples"] for e in served["edges"]) * 28 * 28
        assert 0 < served["deploy"]["data_bytes_up"] < 0.5 * pixels
    final = load_state_dict(tmp_path / "embedded" / "server.safetensors")
    update = dict((n, w) for n, p, w in received["embedded"] if p == "update")
    assert not torch.equal(update["edge-0"]["hidden.weight"], final["hidden.weight"])  # int8 lost something


@pytest.mark.deploy
def test_deployed_int8_delta_agrees_with_embedded(tmp_path):
    """A real SuperLink and SuperNodes: every message runs in a fresh ClientApp process, so the edges' delta bases
    survive only in the nodes' context.state."""
    pytest.importorskip("flwr")
    from test_flower import _assert_all_stopped

    from ecavg.deploy import deploy_local

    user = config({"codec": "int8", "delta": True})
    embedded = run_experiment(user, output_dir=tmp_path / "embedded")
    deployed = deploy_local(user, edges=2, output_dir=tmp_path / "deployed", timeout_s=300)
    out = Path(deployed["output_dir"])
    try:
        _same_run(deployed, out, embedded, tmp_path / "embedded")
        assert json.loads((out / "results.json").read_text())["transfer"] == {"codec": "int8", "delta": True,
                                                                               "deflate": False}
    finally:
        _assert_all_stopped(out)
