"""Section 3: what crosses the wire, how fast it is (de)serialised, and what compressing it costs in accuracy.

* bytes per edge and round, per model and codec: ECAvg sends each edge the shared init (or only its seed) and the
  final weights, and receives the edge's trained weights once; the server also needs the edge's training data;
* safetensors encode/decode throughput (GB/s of payload) for ResNet50, with and without the validation that
  ``decode_state_dict`` does, beside ``torch.save``/``torch.load`` and a cheaper finiteness check, all in one run;
* the product's transfer settings (``[transfer]``: each codec, the delta forms, deflate; :data:`VARIANTS`): bytes
  ratio against float32 and the accuracy change on a short ECAvg run where every weight transfer goes through them
  (edges trained once from the seeded shared init, then for each setting: uplink, weighted average, server
  fine-tuning, downlink, edges evaluate). The setting is the only difference between the runs, so accuracy deltas
  are its doing (plus the small chaos of training from slightly different weights).
"""

from __future__ import annotations

import io
import logging
import math
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from bench.common import DEFAULT_DATA_DIR, best_time, load_average, print_table
from ecavg.core.codecs import CODECS
from ecavg.core.transfer import EdgeLinks, Transfer
from ecavg.formatting import transfer_label

# What the section compares: the product's own transfer settings, so the bench measures what a run sends. Each
# codec whole, the delta forms (not fp32: refused, a float32 difference is as large as the weights), and deflate.
VARIANTS: dict[str, Transfer] = {
    transfer_label(t.to_dict()): t
    for t in (*(Transfer(name) for name in CODECS), Transfer("fp16", delta=True), Transfer("int8", delta=True),
              Transfer("fp32", deflate=True), Transfer("int8", deflate=True))
}


def relative_error(original: Mapping[str, torch.Tensor], decoded: Mapping[str, torch.Tensor]) -> float:
    """||decoded - original|| / ||original|| over all floating tensors together."""
    num = den = 0.0
    for key, tensor in original.items():
        if tensor.is_floating_point():
            num += float((decoded[key].double() - tensor.double()).pow(2).sum())
            den += float(tensor.double().pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0

# (model, dataset, classes, channels, image size) as trained in section 1.
WIRE_MODELS = (
    ("mlp", "mnist", 10, 1, 28),
    ("cnn", "cifar10", 10, 3, 32),
    ("resnet18", "cifar10", 10, 3, 32),
    ("mobilenet_v2", "cifar10", 10, 3, 32),
    ("resnet50", "cifar100", 100, 3, 32),
)
DATA_SOURCES = {"cifar10": "cifar10/cifar10-jpeg.zip", "cifar100": "cifar100/cifar100-jpeg.zip"}
TRAIN_IMAGES = {"mnist": (60_000, 1, 28), "cifar10": (50_000, 3, 32), "cifar100": (50_000, 3, 32)}


def model_state(model: str, classes: int, channels: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from ecavg.models import build_model

    torch.manual_seed(seed)
    net = build_model(model, num_classes=classes, in_channels=channels, image_size=size)
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def jpeg_train_bytes(dataset: str, data_dir: Path) -> int | None:
    """Bytes of the training JPEGs in the shared zip (what an edge would upload as files), or None."""
    if dataset not in DATA_SOURCES:
        return None
    path = Path(data_dir) / DATA_SOURCES[dataset]
    if not path.is_file():
        return None
    with zipfile.ZipFile(path) as archive:
        return sum(i.compress_size for i in archive.infolist() if "train/" in i.filename and not i.is_dir())


def wire_bytes(models: Sequence[tuple] = WIRE_MODELS, codecs: Sequence[str] = tuple(VARIANTS), *,
               num_edges: int = 2, data_dir: Path = DEFAULT_DATA_DIR) -> dict[str, Any]:
    rows = []
    out: dict[str, Any] = {}
    for model, dataset, classes, channels, size in models:
        init = model_state(model, classes, channels, size, seed=0)
        trained = model_state(model, classes, channels, size, seed=1)  # stands in for trained weights
        per_codec = {}
        for name in codecs:
            per_codec[name] = EdgeLinks(VARIANTS[name]).upload("edge", trained, received=init)[1]
        fp32 = per_codec["fp32"]
        n, c, s = TRAIN_IMAGES[dataset]
        edge_raw = n // num_edges * c * s * s
        jpeg = jpeg_train_bytes(dataset, data_dir)
        out[model] = {
            "dataset": dataset,
            "parameters": sum(t.numel() for t in init.values() if t.is_floating_point()),
            "payload_bytes": per_codec,
            "ratio_to_fp32": {k: v / fp32 for k, v in per_codec.items()},
            # ECAvg per edge: down = shared init (as bytes, or 0 when sent as a seed) + final weights; up = weights.
            "per_edge_round": {"up": fp32, "down_with_init": 2 * fp32, "down_seeded_init": fp32},
            "edge_training_data_bytes_uint8": edge_raw,
            "edge_training_data_bytes_jpeg": jpeg // num_edges if jpeg else None,
        }
        rows.append([model, fp32 / 1e6, *[fp32 / per_codec[k] for k in codecs if k != "fp32"], edge_raw / 1e6,
                     (jpeg / num_edges / 1e6) if jpeg else None])
    print_table(
        f"Transfer: payload per message (MB, fp32 safetensors) and compression factor per codec; an edge sends its "
        f"weights up once and gets the final weights down once per round (plus the init, unless sent as a seed); "
        f"edge data shown for {num_edges} IID edges",
        ["model", "fp32 MB", *[f"x {k}" for k in codecs if k != "fp32"], "data MB u8", "data MB jpeg"], rows,
    )
    return out


def _aminmax_check(tensors: Mapping[str, torch.Tensor]) -> bool:
    """All-finite check with one bandwidth-bound reduction per tensor and no tensor-sized mask."""
    values = [t for t in tensors.values() if t.is_floating_point() and t.numel() > 0]
    extremes = [x for t in values for x in torch.aminmax(t)]
    return bool(torch.isfinite(torch.stack(extremes)).all())


def _isfinite_check(tensors: Mapping[str, torch.Tensor]) -> bool:
    """The check decode_state_dict runs: a bool mask per tensor, then all()."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def serialization_speed(model: str = "resnet50", classes: int = 100, repeats: int = 3) -> dict[str, Any]:
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from bench.proposals import encode_direct
    from ecavg.core.serialization import decode_state_dict, encode_state_dict, load_state_dict, save_state_dict

    state = model_state(model, classes, 3, 32)
    payload = encode_state_dict(state)
    size = len(payload)
    direct = st_load(encode_direct(state))
    if set(direct) != set(state) or not all(torch.equal(direct[k], state[k]) for k in state):
        raise AssertionError("encode_direct does not round-trip through safetensors.torch.load")
    pickled = io.BytesIO()
    torch.save(state, pickled)
    pickled_bytes = pickled.getvalue()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        cases = {
            "encode_state_dict": lambda: encode_state_dict(state),
            "decode_state_dict (validated)": lambda: decode_state_dict(payload, name="edge"),
            "decode_state_dict + reference": lambda: decode_state_dict(payload, name="edge", reference=state),
            "safetensors save (raw)": lambda: st_save(state),
            "encode_direct (tried)": lambda: encode_direct(state),
            "safetensors load (raw)": lambda: st_load(payload),
            "load + aminmax check (patched decode)": lambda: _aminmax_check(st_load(payload)),
            "finite check: isfinite().all() (current)": lambda: _isfinite_check(state),
            "finite check: aminmax (proposed)": lambda: _aminmax_check(state),
            "save_state_dict (file, fsync)": lambda: save_state_dict(path, state),
            "load_state_dict (file, validated)": lambda: load_state_dict(path),
            "torch.save (pickle, reference)": lambda: torch.save(state, io.BytesIO()),
            "torch.load (pickle, reference)": lambda: torch.load(io.BytesIO(pickled_bytes), weights_only=True),
        }
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(repeats):  # interleaved rounds, best kept
            for name, fn in cases.items():
                timings[name] = min(timings.get(name, math.inf), best_time(fn, 1))
    rows = [[name, seconds * 1000, size / seconds / 1e9] for name, seconds in timings.items()]
    print_table(f"Serialization of {model} ({size / 1e6:.1f} MB safetensors payload), best of {repeats}",
                ["operation", "ms", "GB/s"], rows)
    raw_load = timings["safetensors load (raw)"]
    return {
        "model": model, "payload_bytes": size, "seconds": timings,
        "gb_per_s": {k: size / v / 1e9 for k, v in timings.items()},
        "validated_decode_over_raw_load": timings["decode_state_dict (validated)"] / raw_load,
        "decode_over_patched_decode": (timings["decode_state_dict (validated)"]
                                       / timings["load + aminmax check (patched decode)"]),
        "encode_over_encode_direct": timings["encode_state_dict"] / timings["encode_direct (tried)"],
        "isfinite_over_aminmax_check": (timings["finite check: isfinite().all() (current)"]
                                        / timings["finite check: aminmax (proposed)"]),
        "load_average": load_average(),
    }


# -------------------------------------------------------------------------------------------------
# Accuracy change caused by each codec on a short ECAvg run
# -------------------------------------------------------------------------------------------------

QUICK_ACCURACY_CONFIG: dict[str, Any] = {
    "strategy": "ecavg", "seed": 0, "init": "random", "shared_init": True, "eval_each_epoch": False,
    "data": {"dataset": "cifar10", "partition": "iid", "num_edges": 2, "train_fraction": 0.1},
    "model": {"name": "cnn"},
    "edge": {"epochs": 2, "batch_size": 128, "lr": 0.1, "label_smoothing": 0.1},
    "server": {"epochs": 1, "batch_size": 128, "lr": 0.1, "label_smoothing": 0.1},
}
FULL_ACCURACY_CONFIG: dict[str, Any] = {
    **QUICK_ACCURACY_CONFIG,
    # MobileNetV2: depthwise filters are the usual victims of coarse (per-tensor) quantisation.
    "data": {"dataset": "cifar10", "partition": "iid", "num_edges": 2, "train_fraction": 0.2},
    "model": {"name": "mobilenet_v2"},
    "edge": {"epochs": 3, "batch_size": 128, "lr": 0.1, "label_smoothing": 0.1},
    "server": {"epochs": 1, "batch_size": 128, "lr": 0.1, "label_smoothing": 0.1},
}


def _test_subset(splits, size: int | None):
    """``splits`` with the first ``size`` test images of a seeded permutation (all of them when None)."""
    import dataclasses

    if size is None or size >= len(splits.test):
        return splits
    keep = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(0))[:size].sort().values
    return dataclasses.replace(splits, test=splits.test.subset(keep))


def codec_accuracy(config: Mapping[str, Any], codecs: Sequence[str] = tuple(VARIANTS), *,
                   data_dir: Path = DEFAULT_DATA_DIR, test_size: int | None = None) -> dict[str, Any]:
    from ecavg.config import resolve_config
    from ecavg.core.averaging import StreamingAverager
    from ecavg.data import load_dataset
    from ecavg.runtime.setup import build_participants

    logging.getLogger("ecavg").setLevel(logging.WARNING)
    cfg = resolve_config(dict(config))
    splits = _test_subset(load_dataset(cfg["data"]["dataset"], data_dir), test_size)
    p = build_participants(cfg, splits, torch.device("cpu"))
    edges, union, server = p.edges, p.union, p.server
    started = time.perf_counter()
    # The shared init is derived from the seed on every side, so it never crosses the wire.
    init = {k: v.detach().cpu().clone() for k, v in server.new_model().state_dict().items()}
    trained = [edge.fit(init, phase="pretrain") for edge in edges]
    pretrain_s = time.perf_counter() - started
    results: dict[str, Any] = {}
    rows = []
    for name in codecs:
        transfer = VARIANTS[name]
        links = EdgeLinks(transfer)  # as the runtimes do: with delta, each download's base is the edge's upload
        started = time.perf_counter()
        averager = StreamingAverager()
        up_bytes = 0
        up_error = 0.0
        for edge, out in zip(edges, trained):
            received, nbytes = links.upload(edge.name, out.weights, received=init)
            up_bytes += nbytes
            up_error = max(up_error, relative_error(out.weights, received))
            averager.add(received, out.num_samples, name=edge.name)
        averaged = averager.result()
        accuracy_averaged = server.evaluate(averaged)
        finetuned, history = server.train(averaged, union, phase="finetune", epochs=cfg["server"]["epochs"])
        accuracy_server = history[-1]["test_accuracy"]  # the server evaluates after its last epoch
        download = links.download(finetuned)
        sent = {edge.name: download.received(edge.name) for edge in edges}
        down_bytes = sum(len(download.payload(edge.name)) for edge in edges) // len(edges)
        down_error = max(relative_error(finetuned, w) for w in sent.values())
        evaluations = [edge.evaluate(sent[edge.name]) for edge in edges]
        after = sum(e.accuracy * e.test_samples for e in evaluations) / sum(e.test_samples for e in evaluations)
        results[name] = {
            "uplink_bytes_per_edge": up_bytes // len(edges), "downlink_bytes_per_edge": down_bytes,
            "uplink_relative_error": up_error, "downlink_relative_error": down_error,
            "accuracy_averaged": accuracy_averaged, "accuracy_server_finetuned": accuracy_server,
            "accuracy_edges_after_update": after, "seconds": time.perf_counter() - started,
        }
    reference = results.get("fp32")
    for name, r in results.items():
        if reference is not None:
            r["bytes_ratio_to_fp32"] = r["uplink_bytes_per_edge"] / reference["uplink_bytes_per_edge"]
            r["delta_accuracy_after_update"] = (r["accuracy_edges_after_update"]
                                                - reference["accuracy_edges_after_update"])
            r["delta_accuracy_averaged"] = r["accuracy_averaged"] - reference["accuracy_averaged"]
        rows.append([name, r.get("bytes_ratio_to_fp32"), r["uplink_relative_error"], r["accuracy_averaged"],
                     r.get("delta_accuracy_averaged"), r["accuracy_edges_after_update"],
                     r.get("delta_accuracy_after_update")])
    before = sum(o.accuracy * o.test_samples for o in trained) / sum(o.test_samples for o in trained)
    print_table(
        f"Codecs on a short ECAvg run ({cfg['model']['name']}, {cfg['data']['dataset']} "
        f"x{cfg['data']['train_fraction']}, "
        f"edges {cfg['edge']['epochs']} ep, server {cfg['server']['epochs']} ep, {len(splits.test)} test images; "
        f"edges before update {before:.4f})",
        ["codec", "bytes/fp32", "rel. error", "avg acc", "d avg acc", "after-update acc", "d after"], rows,
    )
    return {"config": cfg, "test_size": len(splits.test), "edge_accuracy_before": before,
            "pretrain_seconds": pretrain_s, "codecs": results,
            "load_average": load_average()}


def run(*, quick: bool = False, data_dir: Path = DEFAULT_DATA_DIR, with_accuracy: bool = True,
        models: Sequence[tuple] = WIRE_MODELS, serialization_model: tuple[str, int] = ("resnet50", 100),
        accuracy_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "wire": wire_bytes(models, data_dir=data_dir),
        "serialization": serialization_speed(*serialization_model, repeats=2 if quick else 3),
    }
    if with_accuracy:
        config = accuracy_config or (QUICK_ACCURACY_CONFIG if quick else FULL_ACCURACY_CONFIG)
        out["accuracy"] = codec_accuracy(config, data_dir=data_dir, test_size=2000 if quick else 5000)
    return out
