"""Section 1: training throughput (samples/s), our trainer against the plain pipeline, in the same process.

For each model, three measurements over the same number of steps, interleaved and repeated (best kept):

* ``ours``: ``ecavg.core.training.train`` fed by ``TensorLoader`` exactly as an edge trains (model and loader from
  ``ModelFactory``), data pipeline included;
* ``plain``: the usual pipeline of :mod:`bench.plain` (ImageFolder + PIL transforms + DataLoader with 2 workers),
  same architecture, same memory format, same optimiser and schedule;
* ``compute``: our trainer on one fixed batch repeated, i.e. the model's own speed without any data pipeline;
* ``patched``: ``ours`` with ``SmallMapConv2d`` (``ecavg/models/small_map.py``), as ecavg ships it since this
  benchmark measured it; ``ours``, ``plain`` and ``compute`` use torchvision's plain ``nn.Conv2d``.

The achieved rate is also set against the machine's float32 matmul peak, measured in the same run:
``samples/s * training FLOPs per sample / sgemm FLOP/s``, with FLOPs counted by ``torch.utils.flop_counter``
(convolutions and matrix multiplies of the forward and backward pass).

The ``experiments`` section runs variants of our trainer (threads, memory format, batch size, bf16 autocast,
torch.compile) on the same models, each against the unchanged trainer in the same process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from bench.common import DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR, load_average, print_table, sgemm_peak_gflops
from bench.plain import plain_train_dataset, plain_train_steps


@dataclass(frozen=True)
class ModelCase:
    model: str
    dataset: str
    batch_size: int
    lr: float
    label_smoothing: float
    warmup: int  # untimed steps first (thread pools, allocator, oneDNN primitive caches)
    steps: int  # timed steps
    quick_warmup: int
    quick_steps: int
    options: dict[str, Any] = field(default_factory=dict)


# Batch sizes and learning rates of the paper configs (configs/paper); cnn as for CIFAR-10 MobileNetV2.
CASES: dict[str, ModelCase] = {
    c.model: c
    for c in (
        ModelCase("mlp", "mnist", 64, 0.05, 0.0, warmup=20, steps=400, quick_warmup=10, quick_steps=150),
        ModelCase("cnn", "cifar10", 128, 0.1, 0.1, warmup=5, steps=40, quick_warmup=3, quick_steps=15),
        ModelCase("resnet18", "cifar10", 128, 0.1, 0.1, warmup=4, steps=30, quick_warmup=2, quick_steps=10),
        ModelCase("mobilenet_v2", "cifar10", 128, 0.1, 0.1, warmup=4, steps=30, quick_warmup=2, quick_steps=10),
        ModelCase("resnet50", "cifar100", 128, 0.1, 0.1, warmup=3, steps=20, quick_warmup=2, quick_steps=6),
    )
}


class StepClock:
    """Hands out the first ``warmup + steps`` batches of ``loader`` and times the last ``steps`` of them.

    The clock reads before each batch is fetched, so a step's time covers fetching its batch (the data pipeline)
    and the training step that follows; the final reading comes when the trainer asks for one batch too many.
    """

    def __init__(self, loader, warmup: int, steps: int) -> None:
        if warmup + steps > len(loader):
            raise ValueError(f"{warmup + steps} steps asked for but the loader has only {len(loader)} batches")
        self.loader = loader
        self.warmup = warmup
        self.steps = steps
        self.stamps: list[float] = []
        self.samples = 0

    def __len__(self) -> int:
        return self.warmup + self.steps

    def __iter__(self) -> Iterator:
        self.stamps = []
        self.samples = 0
        iterator = iter(self.loader)
        for step in range(len(self)):
            self.stamps.append(time.perf_counter())
            x, y = next(iterator)
            if step >= self.warmup:
                self.samples += y.shape[0]
            yield x, y
        self.stamps.append(time.perf_counter())

    @property
    def seconds(self) -> float:
        return self.stamps[-1] - self.stamps[self.warmup]

    @property
    def warmup_seconds(self) -> float:
        return self.stamps[self.warmup] - self.stamps[0]


class RepeatBatch:
    """One fixed batch, ``length`` times: the model's own training speed with no data pipeline."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, length: int) -> None:
        self.x, self.y, self.length = x, y, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for _ in range(self.length):
            yield self.x, self.y


class AutocastBF16(nn.Module):
    """Runs the wrapped model under CPU bfloat16 autocast; logits come back in float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


@dataclass(frozen=True)
class Variant:
    """A change to our trainer for the experiments section; the defaults are the trainer as shipped."""

    name: str
    threads: int | None = None
    channels_last: bool | None = None  # None: as ModelFactory decides
    batch_size: int | None = None
    autocast_bf16: bool = False
    compile: bool = False
    small_map: bool = False  # SmallMapConv2d as shipped; False swaps in plain nn.Conv2d


SHIPPED = Variant("shipped")
PATCHED = Variant("small-map convs (patch)", small_map=True)
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        SHIPPED,
        PATCHED,
        Variant("small-map convs + batch 256", small_map=True, batch_size=256),
        Variant("small-map convs + torch.compile", small_map=True, compile=True),
        Variant("threads=1", threads=1),
        Variant("contiguous (no channels_last)", channels_last=False),
        Variant("batch 256", batch_size=256),
        Variant("bf16 autocast", autocast_bf16=True),
    )
}
# Environment variables that must be set before torch starts: measured in alternating fresh processes.
ENV_VARIANTS: dict[str, dict[str, str]] = {"OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Workbench:
    """Datasets, specs and plain datasets for the cases, loaded once per process."""

    def __init__(self, data_dir: Path = DEFAULT_DATA_DIR, cache_dir: Path = DEFAULT_CACHE_DIR) -> None:
        self.data_dir = Path(data_dir)
        self.cache_dir = Path(cache_dir)
        self._splits: dict[str, Any] = {}
        self._plain: dict[str, Any] = {}

    def splits(self, dataset: str):
        if dataset not in self._splits:
            from ecavg.data import load_dataset

            self._splits[dataset] = load_dataset(dataset, self.data_dir)
        return self._splits[dataset]

    def plain_dataset(self, dataset: str):
        if dataset not in self._plain:
            s = self.splits(dataset)
            self._plain[dataset] = plain_train_dataset(dataset, self.data_dir, self.cache_dir, s.mean, s.std)
        return self._plain[dataset]

    def factory(self, case: ModelCase):
        from ecavg.core.participants import DataSpec, ModelFactory

        s = self.splits(case.dataset)
        colour = s.train.images.shape[1] == 3
        size = int(s.train.images.shape[-1])
        spec = DataSpec(
            num_classes=s.train.num_classes, in_channels=int(s.train.images.shape[1]), image_size=size,
            mean=tuple(s.mean), std=tuple(s.std),
            # As ecavg.experiment.augmentation does for augment = "auto": crop+flip colour images only.
            crop_padding=max(1, size // 8) if colour else 0, flip=colour,
        )
        return ModelFactory(case.model, dict(case.options), spec, torch.device("cpu"))


def _settings(case: ModelCase, batch_size: int | None = None):
    from ecavg.core.training import TrainingSettings

    return TrainingSettings(epochs=1, batch_size=batch_size or case.batch_size, lr=case.lr,
                            label_smoothing=case.label_smoothing)


def _quiet_training_log():
    logging.getLogger("ecavg").setLevel(logging.WARNING)


def build_model(bench: Workbench, case: ModelCase, variant: Variant = SHIPPED):
    """(model to train, factory, whether inputs are channels_last) for a case and variant."""
    factory = bench.factory(case)
    model = factory.build(seed=0)
    if not variant.small_map:
        # ecavg now ships SmallMapConv2d; without it the model is what torchvision builds (the earlier "ours").
        from bench.proposals import use_plain_convs

        use_plain_convs(model)
    if variant.channels_last is False and factory.channels_last:
        model = model.to(memory_format=torch.contiguous_format)
        factory.channels_last = False
    if variant.autocast_bf16:
        model = AutocastBF16(model)
    if variant.compile:
        model = torch.compile(model)
    return model, factory


def measure_ours(bench: Workbench, case: ModelCase, warmup: int, steps: int,
                 variant: Variant = SHIPPED) -> dict[str, float]:
    from ecavg.core.training import train

    _quiet_training_log()
    batch_size = variant.batch_size or case.batch_size
    # Larger batches: the same number of samples as the shipped setting, so the comparison covers equal work.
    scale = case.batch_size / batch_size
    warmup_b, steps_b = max(1, round(warmup * scale)), max(2, round(steps * scale))
    with _threads(variant.threads):
        model, factory = build_model(bench, case, variant)
        loader = factory.loader(bench.splits(case.dataset).train, batch_size, train=True, seed=0)
        clock = StepClock(loader, warmup_b, steps_b)
        train(model, clock, _settings(case, batch_size))
    return {"samples_per_s": clock.samples / clock.seconds, "seconds": clock.seconds, "samples": clock.samples,
            "warmup_seconds": clock.warmup_seconds, "load_average": load_average()}


def measure_compute(bench: Workbench, case: ModelCase, warmup: int, steps: int) -> dict[str, float]:
    from ecavg.core.training import train

    _quiet_training_log()
    model, factory = build_model(bench, case)
    x, y = next(iter(factory.loader(bench.splits(case.dataset).train, case.batch_size, train=True, seed=0)))
    clock = StepClock(RepeatBatch(x, y, warmup + steps), warmup, steps)
    train(model, clock, _settings(case))
    return {"samples_per_s": clock.samples / clock.seconds, "seconds": clock.seconds, "samples": clock.samples,
            "load_average": load_average()}


def measure_plain(bench: Workbench, case: ModelCase, warmup: int, steps: int) -> dict[str, float]:
    model, factory = build_model(bench, case)
    run = plain_train_steps(model, bench.plain_dataset(case.dataset), batch_size=case.batch_size, lr=case.lr,
                            warmup_steps=warmup, steps=steps, channels_last=factory.channels_last,
                            label_smoothing=case.label_smoothing)
    return {"samples_per_s": run.samples_per_s, "seconds": run.seconds, "samples": run.samples,
            "load_average": load_average()}


def training_flops_per_sample(bench: Workbench, case: ModelCase, batch: int = 4) -> float:
    """FLOPs of one training step per sample: 3x the forward pass's convolution and matmul FLOPs.

    The backward pass costs two forward passes (gradients for the inputs and for the weights). The forward is
    counted with ``torch.utils.flop_counter``; its backward count is not used because in torch 2.14 it counts a
    grouped convolution's backward as if it were dense (65x too much for a 64-channel depthwise conv), which
    would inflate MobileNetV2 about 7x.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model, factory = build_model(bench, case)
    model.eval()
    loader = factory.loader(bench.splits(case.dataset).train, batch, train=False)
    x, _ = next(iter(loader))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return 3 * counter.get_total_flops() / batch


def run(models: Sequence[str] = tuple(CASES), *, quick: bool = False, repeats: int | None = None,
        bench: Workbench | None = None, with_plain: bool = True) -> dict[str, Any]:
    bench = bench or Workbench()
    repeats = repeats if repeats is not None else (1 if quick else 2)
    peak = sgemm_peak_gflops()
    rows = []
    results: dict[str, Any] = {}
    for name in models:
        case = CASES[name]
        warmup, steps = (case.quick_warmup, case.quick_steps) if quick else (case.warmup, case.steps)
        flops = training_flops_per_sample(bench, case)
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "patched": [], "plain": [], "compute": []}
        for _ in range(repeats):  # interleaved, so a burst of outside load hits every method alike
            runs["ours"].append(measure_ours(bench, case, warmup, steps))
            runs["patched"].append(measure_ours(bench, case, warmup, steps, PATCHED))
            if with_plain:
                runs["plain"].append(measure_plain(bench, case, warmup, steps))
            runs["compute"].append(measure_compute(bench, case, warmup, steps))
        best = {k: max(v, key=lambda r: r["samples_per_s"]) for k, v in runs.items() if v}
        ours = best["ours"]["samples_per_s"]
        plain = best["plain"]["samples_per_s"] if "plain" in best else None
        compute = best["compute"]["samples_per_s"]
        patched = best["patched"]["samples_per_s"]
        entry = {
            "dataset": case.dataset, "batch_size": case.batch_size, "warmup_steps": warmup, "timed_steps": steps,
            "repeats": repeats, "train_gflop_per_sample": flops / 1e9,
            "ours_samples_per_s": ours, "plain_samples_per_s": plain, "compute_only_samples_per_s": compute,
            "patched_samples_per_s": patched,
            "ours_over_plain": ours / plain if plain else None,
            "patched_over_plain": patched / plain if plain else None,
            "patched_over_ours": patched / ours,
            "patched_fraction_of_sgemm_peak": patched * flops / (peak * 1e9),
            "ours_over_compute_only": ours / compute,
            "ours_gflops": ours * flops / 1e9,
            "ours_fraction_of_sgemm_peak": ours * flops / (peak * 1e9),
            "compute_only_fraction_of_sgemm_peak": compute * flops / (peak * 1e9),
            "runs": runs,
        }
        results[name] = entry
        rows.append([name, case.dataset, case.batch_size, ours, plain, entry["ours_over_plain"], compute,
                     entry["ours_over_compute_only"], flops / 1e9 * 1e3, entry["ours_fraction_of_sgemm_peak"],
                     patched, entry["patched_over_plain"], entry["patched_fraction_of_sgemm_peak"]])
    print_table(
        f"Training throughput (samples/s, best of {repeats}, {'quick' if quick else 'full'}); "
        f"sgemm peak {peak:.0f} GFLOP/s measured in this run",
        ["model", "data", "batch", "ours", "plain", "ours/plain", "compute only", "ours/compute",
         "MFLOP/sample", "of peak", "patched", "patched/plain", "patched of peak"],
        rows,
    )
    return {"sgemm_peak_gflops": peak, "quick": quick, "models": results}


def run_experiments(models: Sequence[str] = ("mobilenet_v2", "resnet18"), variants: Sequence[str] | None = None,
                    *, quick: bool = False, bench: Workbench | None = None) -> dict[str, Any]:
    """Variants of our trainer, each as a ratio to the shipped trainer measured just before it."""
    bench = bench or Workbench()
    names = list(variants) if variants is not None else [v for v in VARIANTS if v != "shipped"]
    rows = []
    results: dict[str, Any] = {}
    for model_name in models:
        case = CASES[model_name]
        warmup, steps = (case.quick_warmup, case.quick_steps) if quick else (case.warmup, case.steps)
        results[model_name] = {}
        for variant_name in names:
            variant = VARIANTS[variant_name]
            try:
                shipped = measure_ours(bench, case, warmup, steps)
                if variant.compile:
                    # Compilation happens in the first steps: give it its own warm-up pass, reported separately.
                    started = time.perf_counter()
                    tried = measure_ours(bench, case, max(warmup, 3), steps, variant)
                    tried["compile_and_warmup_seconds"] = time.perf_counter() - started - tried["seconds"]
                else:
                    tried = measure_ours(bench, case, warmup, steps, variant)
            except Exception as error:  # a variant that cannot run here is a result, not a crash
                results[model_name][variant_name] = {"error": f"{type(error).__name__}: {error}"[:500]}
                rows.append([model_name, variant_name, None, None, None, f"failed: {type(error).__name__}"])
                continue
            ratio = tried["samples_per_s"] / shipped["samples_per_s"]
            results[model_name][variant_name] = {"shipped": shipped, "variant": tried, "ratio": ratio}
            rows.append([model_name, variant_name, shipped["samples_per_s"], tried["samples_per_s"], ratio, ""])
    for model_name in models:
        for env_name, env in ENV_VARIANTS.items():
            outcome = env_experiment(model_name, env, quick=quick, data_dir=bench.data_dir)
            results[model_name][env_name] = outcome
            rows.append([model_name, env_name, outcome["shipped_median"], outcome["variant_median"], outcome["ratio"],
                         "fresh processes, alternating, medians"])
    print_table("Trainer variants (samples/s; each variant right after the shipped trainer, same process)",
                ["model", "variant", "shipped", "variant", "ratio", "note"], rows)
    return {"quick": quick, "models": results}


def env_experiment(model: str, env: dict[str, str], *, quick: bool, data_dir: Path, rounds: int = 3) -> dict[str, Any]:
    """Our trainer in fresh processes, alternately without and with ``env``; medians of each."""
    import json
    import os
    import statistics
    import subprocess
    import sys

    from bench.common import REPO_ROOT

    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    base_env = {**os.environ, "PYTHONPATH": python_path}
    args = json.dumps({"model": model, "quick": quick, "data_dir": str(data_dir)})
    rates: dict[str, list[float]] = {"shipped": [], "variant": []}
    for _ in range(rounds):
        for key, extra in (("shipped", {}), ("variant", env)):
            proc = subprocess.run([sys.executable, "-m", "bench.training", "--worker", args], cwd=REPO_ROOT,
                                  env={**base_env, **extra}, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"trainer worker ({extra or 'default env'}) failed:\n{proc.stderr[-3000:]}")
            rates[key].append(json.loads(proc.stdout.strip().splitlines()[-1])["samples_per_s"])
    shipped, variant = statistics.median(rates["shipped"]), statistics.median(rates["variant"])
    return {"env": env, "rates": rates, "shipped_median": shipped, "variant_median": variant,
            "ratio": variant / shipped}


def _worker(model: str, quick: bool, data_dir: str) -> dict[str, Any]:
    case = CASES[model]
    warmup, steps = (case.quick_warmup, case.quick_steps) if quick else (case.warmup, case.steps)
    return measure_ours(Workbench(Path(data_dir)), case, warmup, steps)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="one measurement of our trainer (used by env_experiment)")
    parser.add_argument("--worker", required=True, help="JSON: model, quick, data_dir")
    print(json.dumps(_worker(**json.loads(parser.parse_args().worker))))
