"""Section 4 (long): ECAvg end to end on CIFAR-10 with MobileNetV2, two IID edges.

Parts, all in one process so their times compare:

* ``plain``: ECAvg written the usual way (:mod:`bench.plain` pipeline; same model, optimiser, epochs, shared
  init and label smoothing as ours), 5 edge epochs then 5 server epochs;
* ``ours``: ``run_experiment`` with the same 5 + 5 configuration;
* ``fast``: ``run_experiment`` with ``configs/paper/cifar10_mobilenetv2.toml``, tuned to reach the paper's
  81.16% after-update edge accuracy quickly;
* ``ours``/``fast`` run with plain ``nn.Conv2d``; ``ours+smallmap``, ``fast+smallmap`` with ``SmallMapConv2d``,
  which ecavg ships since this benchmark measured it (``ecavg/models/small_map.py``).

Edges and server evaluate only at the end of their phases in all three (no per-epoch evaluation), as ECAvg needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bench.common import DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR, REPO_ROOT, load_average, print_table

PAPER_AFTER_UPDATE = 0.8116
FAST_CONFIG = REPO_ROOT / "configs" / "paper" / "cifar10_mobilenetv2.toml"

# The 5 + 5 configuration of the plain baseline in the issue; the paper config otherwise (configs/paper).
BASELINE_CONFIG: dict[str, Any] = {
    "strategy": "ecavg", "seed": 0, "init": "random", "shared_init": True, "eval_each_epoch": False,
    "data": {"dataset": "cifar10", "partition": "iid", "num_edges": 2},
    "model": {"name": "mobilenet_v2"},
    "edge": {"epochs": 5, "batch_size": 128, "lr": 0.1, "label_smoothing": 0.1},
    "server": {"epochs": 5, "batch_size": 128, "lr": 0.1, "label_smoothing": 0.1},
}

log = logging.getLogger("bench.e2e")


# -------------------------------------------------------------------------------------------------
# The plain ECAvg
# -------------------------------------------------------------------------------------------------


def _plain_loader(dataset, *, batch_size: int, shuffle: bool, seed: int):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=2,
                      generator=torch.Generator().manual_seed(seed))


def _plain_train(model: nn.Module, dataset, *, epochs: int, batch_size: int, lr: float, label_smoothing: float,
                 channels_last: bool, seed: int) -> None:
    loader = _plain_loader(dataset, batch_size=batch_size, shuffle=True, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def _plain_accuracy(model: nn.Module, dataset, *, channels_last: bool) -> float:
    model.eval()
    correct = total = 0
    for x, y in _plain_loader(dataset, batch_size=1024, shuffle=False, seed=0):
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    return correct / total


def plain_ecavg(config: Mapping[str, Any] = BASELINE_CONFIG, *, data_dir: Path = DEFAULT_DATA_DIR,
                cache_dir: Path = DEFAULT_CACHE_DIR) -> dict[str, Any]:
    """ECAvg the usual way: ImageFolder + PIL transforms + DataLoader(2 workers), state dicts averaged by key."""
    import torchvision
    from torch.utils.data import Subset
    from torchvision import transforms as T

    from bench.plain import extract_imagefolder
    from bench.proposals import use_plain_convs
    from ecavg.models import build_model, uses_channels_last

    cfg = config
    seed = cfg["seed"]
    tree = extract_imagefolder(cfg["data"]["dataset"], data_dir, cache_dir)
    from ecavg.data import load_dataset

    splits = load_dataset(cfg["data"]["dataset"], data_dir)  # only for the same mean/std as ours
    normalize = [T.ToTensor(), T.Normalize(splits.mean, splits.std)]
    train_set = torchvision.datasets.ImageFolder(
        str(tree / "train"), transform=T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalize]))
    test_set = torchvision.datasets.ImageFolder(str(tree / "test"), transform=T.Compose(normalize))
    num_edges = cfg["data"]["num_edges"]
    g = torch.Generator().manual_seed(seed)
    fraction = cfg["data"].get("train_fraction", 1.0)  # < 1 only for smoke runs
    train_order = torch.randperm(len(train_set), generator=g)[: max(num_edges, int(len(train_set) * fraction))]
    train_parts = train_order.chunk(num_edges)
    test_parts = torch.randperm(len(test_set), generator=g).chunk(num_edges)

    def new_model(model_seed: int) -> tuple[nn.Module, bool]:
        torch.manual_seed(model_seed)
        model = build_model(cfg["model"]["name"], num_classes=len(train_set.classes), in_channels=3, image_size=32)
        use_plain_convs(model)  # the usual way: torchvision's convolutions
        channels_last = uses_channels_last(model)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model, channels_last

    timing: dict[str, float] = {}
    started = time.perf_counter()
    init_model, _ = new_model(seed)
    init = {k: v.clone() for k, v in init_model.state_dict().items()}
    edge_states, edge_sizes, before = [], [], []
    phase = time.perf_counter()
    for k in range(num_edges):
        model, channels_last = new_model(seed + 1 + k)
        if cfg["shared_init"]:
            model.load_state_dict(init)
        _plain_train(model, Subset(train_set, train_parts[k].tolist()), epochs=cfg["edge"]["epochs"],
                     batch_size=cfg["edge"]["batch_size"], lr=cfg["edge"]["lr"],
                     label_smoothing=cfg["edge"]["label_smoothing"], channels_last=channels_last, seed=seed + k)
        before.append(_plain_accuracy(model, Subset(test_set, test_parts[k].tolist()), channels_last=channels_last))
        edge_states.append({k2: v.detach().clone() for k2, v in model.state_dict().items()})
        edge_sizes.append(len(train_parts[k]))
    timing["pretrain"] = time.perf_counter() - phase
    phase = time.perf_counter()
    total = float(sum(edge_sizes))
    averaged = {}
    for key in edge_states[0]:
        s = sum(sd[key].double() * n for sd, n in zip(edge_states, edge_sizes)) / total
        averaged[key] = (s.round() if not edge_states[0][key].is_floating_point() else s).to(edge_states[0][key].dtype)
    server, channels_last = new_model(seed)
    server.load_state_dict(averaged)
    accuracy_averaged = _plain_accuracy(server, test_set, channels_last=channels_last)
    timing["aggregate"] = time.perf_counter() - phase
    phase = time.perf_counter()
    _plain_train(server, Subset(train_set, train_order.tolist()), epochs=cfg["server"]["epochs"],
                 batch_size=cfg["server"]["batch_size"],
                 lr=cfg["server"]["lr"], label_smoothing=cfg["server"]["label_smoothing"],
                 channels_last=channels_last, seed=seed + 100)
    accuracy_server = _plain_accuracy(server, test_set, channels_last=channels_last)
    timing["finetune"] = time.perf_counter() - phase
    phase = time.perf_counter()
    after = [_plain_accuracy(server, Subset(test_set, p.tolist()), channels_last=channels_last) for p in test_parts]
    timing["update"] = time.perf_counter() - phase
    timing["total"] = time.perf_counter() - started
    return {
        "edges_accuracy_before": before, "edges_accuracy_after": after,
        "accuracy_averaged": accuracy_averaged, "accuracy_server_finetuned": accuracy_server,
        "timing_s": timing, "load_average": load_average(),
    }


# -------------------------------------------------------------------------------------------------
# Ours
# -------------------------------------------------------------------------------------------------


def ours_ecavg(config: Mapping[str, Any], *, data_dir: Path = DEFAULT_DATA_DIR) -> dict[str, Any]:
    from ecavg.experiment import run_experiment

    with tempfile.TemporaryDirectory(prefix="ecavg-bench-e2e-") as tmp:
        started = time.perf_counter()
        results = run_experiment(dict(config), data_dir=data_dir, output_dir=Path(tmp) / "run")
        wall = time.perf_counter() - started
        metrics = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    edges = results["edges"]
    return {
        "edges_accuracy_before": [e["accuracy_before"] for e in edges],
        "edges_accuracy_after": [e["accuracy_after"] for e in edges],
        "accuracy_averaged": results["server"]["accuracy_averaged"],
        "accuracy_server_finetuned": results["server"]["accuracy_finetuned"],
        "timing_s": {**results["timing_s"], "data_load": results.get("data_load_s"), "wall": wall},
        "metrics": [json.loads(line) for line in metrics],
        "config": results["config"], "load_average": load_average(),
    }


@contextlib.contextmanager
def small_map_convs(enabled: bool):
    """Within the block, every model ModelFactory builds uses SmallMapConv2d (as ecavg now ships) or, when not
    ``enabled``, plain nn.Conv2d (as before it shipped), so that both can be timed in one process."""
    from bench.proposals import use_plain_convs, use_small_map_convs
    from ecavg.core.participants import ModelFactory

    shipped = ModelFactory.build

    def build(self, *args: Any, **kwargs: Any):
        model = shipped(self, *args, **kwargs)
        (use_small_map_convs if enabled else use_plain_convs)(model)
        return model

    ModelFactory.build = build
    try:
        yield
    finally:
        ModelFactory.build = shipped


def load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as f:
        return tomllib.load(f)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


PARTS = ("plain", "ours", "ours+smallmap", "fast", "fast+smallmap")
DEFAULT_PARTS = ("fast+smallmap", "plain", "ours", "ours+smallmap")


def run(parts: Sequence[str] = DEFAULT_PARTS, *, data_dir: Path = DEFAULT_DATA_DIR,
        cache_dir: Path = DEFAULT_CACHE_DIR, fast_config: Path = FAST_CONFIG,
        baseline_config: Mapping[str, Any] = BASELINE_CONFIG, on_part: Any = None) -> dict[str, Any]:
    """Run the parts in order; ``on_part(results_so_far)`` is called after each, so a long run saves as it goes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out: dict[str, Any] = {"paper_after_update": PAPER_AFTER_UPDATE, "baseline_config": dict(baseline_config)}
    for part in parts:
        log.info("e2e part %s starting (load average %.2f)", part, load_average())
        if part == "plain":
            out["plain"] = plain_ecavg(baseline_config, data_dir=data_dir, cache_dir=cache_dir)
        elif part in ("ours", "ours+smallmap"):
            with small_map_convs(part.endswith("+smallmap")):
                out[part] = ours_ecavg(baseline_config, data_dir=data_dir)
        elif part in ("fast", "fast+smallmap"):
            config = load_toml(fast_config)
            with small_map_convs(part.endswith("+smallmap")):
                fast = ours_ecavg(config, data_dir=data_dir)
            fast["config_file"] = str(fast_config.relative_to(REPO_ROOT))
            after = _mean(fast["edges_accuracy_after"])
            fast["reached_paper_after_update"] = after >= PAPER_AFTER_UPDATE
            # After-update accuracy exists only once the run ends, so the time to reach it is the run's total.
            fast["seconds_to_after_update"] = fast["timing_s"]["total"]
            out[part] = fast
        else:
            raise ValueError(f"unknown e2e part {part!r}; parts are {', '.join(PARTS)}")
        log.info("e2e part %s done: %s", part, json.dumps({k: v for k, v in out[part].items() if k != "metrics"})[:800])
        if on_part is not None:
            on_part(out)
    rows = []
    for part in PARTS:
        if part in out:
            r = out[part]
            rows.append([part, r["timing_s"]["total"], _mean(r["edges_accuracy_before"]), r["accuracy_averaged"],
                         r["accuracy_server_finetuned"], _mean(r["edges_accuracy_after"])])
    for part in ("ours", "ours+smallmap"):
        if "plain" in out and part in out:
            out[f"{part}_speedup_over_plain"] = out["plain"]["timing_s"]["total"] / out[part]["timing_s"]["total"]
            out[f"{part}_minus_plain_after_update"] = (_mean(out[part]["edges_accuracy_after"])
                                                       - _mean(out["plain"]["edges_accuracy_after"]))
    print_table("End to end: ECAvg CIFAR-10 MobileNetV2, 2 IID edges (seconds; accuracies as fractions)",
                ["run", "seconds", "edges before", "averaged", "server", "edges after"], rows)
    for part in ("ours", "ours+smallmap"):
        if f"{part}_speedup_over_plain" in out:
            print(f"5+5: {part} {out[f'{part}_speedup_over_plain']:.2f}x faster than plain, after-update accuracy "
                  f"{out[f'{part}_minus_plain_after_update']:+.4f}")
    return out
