"""Section 2: averaging K state dicts of ResNet50 size.

For each K, a fresh subprocess (so that its peak resident memory belongs to this measurement alone):

* builds one base state dict and derives the K edges' state dicts from it on the fly, by perturbing it in place
  (edge i holds base + (i mod 2)), so K = 100 never holds 100 models;
* measures a large tensor copy's bandwidth, which sets the floor: the bytes averaging must read and write
  (K models read, one written) over that bandwidth;
* times ``StreamingAverager`` (validation included) and two references on the same stream: a naive per-key
  Python sum (``sums[k] = sums[k] + v.float() * w``, new tensors every time) and a bare in-place ``add_`` loop
  with no validation (what the arithmetic alone costs);
* records each method's peak resident memory above the base, as a multiple of one model's bytes, resetting the
  kernel's high-water mark before each method;
* checks the average against the exact expected value.

Run alone: ``python -m bench.aggregation --worker '{"k": 10}'`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Iterator, Sequence

import torch

from bench.common import (
    REPO_ROOT,
    copy_bandwidth_gbs,
    load_average,
    peak_rss_bytes,
    print_table,
    reset_peak_rss,
    rss_bytes,
)

DEFAULT_KS = (2, 10, 100)
EVICT_BYTES = 96 * 2**20  # three times this CPU's 32 MiB L3
DEFAULT_MODEL = "resnet50"
DEFAULT_NUM_CLASSES = 100  # ResNet50 on CIFAR-100, the paper's second task


TINY_MODEL = "tiny"


def base_state_dict(model: str, num_classes: int) -> dict[str, torch.Tensor]:
    """A model's initial state dict; ``tiny`` is a synthetic conv + BatchNorm + linear one (for smoke tests,
    which then need not import torchvision)."""
    torch.manual_seed(0)
    if model == TINY_MODEL:
        return {"conv.weight": torch.randn(32, 16, 3, 3), "bn.weight": torch.ones(32), "bn.bias": torch.zeros(32),
                "bn.running_mean": torch.zeros(32), "bn.running_var": torch.ones(32),
                "bn.num_batches_tracked": torch.tensor(0), "fc.weight": torch.randn(num_classes, 32),
                "fc.bias": torch.zeros(num_classes)}
    from ecavg.models import build_model

    net = build_model(model, num_classes=num_classes, in_channels=3, image_size=32)
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def edge_weight(i: int) -> float:
    """Sample count of edge i: unequal, so the weighting is exercised."""
    return float(1000 + 7 * i)


def perturbed_stream(base: dict[str, torch.Tensor], k: int, evict: torch.Tensor | None = None,
                     ) -> Iterator[tuple[dict[str, torch.Tensor], float, str]]:
    """Yield base + (i mod 2) for i < k, changing ``base`` in place (restored to its start when k is even).

    With ``evict`` (a buffer larger than the last-level cache), it is rewritten after each perturbation, so the
    averager reads every state dict from memory, as it would one freshly received, not from the cache the
    perturbation just warmed (which made averaging look faster than the bandwidth floor).
    """
    for i in range(k):
        if i > 0:
            step = 1 if i % 2 == 1 else -1
            with torch.no_grad():
                for tensor in base.values():
                    tensor.add_(step)
        if evict is not None:
            evict.add_(1)
        yield base, edge_weight(i), f"edge-{i}"
    if k % 2 == 0 and k > 0:
        with torch.no_grad():
            for tensor in base.values():
                tensor.add_(-1)


def expected_offset(k: int) -> float:
    weights = [edge_weight(i) for i in range(k)]
    return sum(w * (i % 2) for i, w in enumerate(weights)) / sum(weights)


def max_error(result: dict[str, torch.Tensor], base: dict[str, torch.Tensor], k: int) -> float:
    offset = expected_offset(k)
    worst = 0.0
    for key, tensor in base.items():
        if tensor.is_floating_point():
            worst = max(worst, float((result[key].double() - (tensor.double() + offset)).abs().max()))
    return worst


def average_streaming(stream) -> tuple[dict[str, torch.Tensor], float]:
    from ecavg.core.averaging import StreamingAverager

    averager = StreamingAverager()
    seconds = 0.0
    for state_dict, weight, name in stream:
        start = time.perf_counter()
        averager.add(state_dict, weight, name=name)
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    result = averager.result()
    seconds += time.perf_counter() - start
    return result, seconds


def average_naive(stream) -> tuple[dict[str, torch.Tensor], float]:
    """The usual first attempt: a per-key Python sum that allocates a new tensor for every term and partial sum."""
    sums: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    total = 0.0
    seconds = 0.0
    for state_dict, weight, _ in stream:
        start = time.perf_counter()
        for key, value in state_dict.items():
            term = value.double() * weight if not value.is_floating_point() else value.float() * weight
            sums[key] = term if key not in sums else sums[key] + term
            dtypes[key] = value.dtype
        total += weight
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    result = {}
    for key, s in sums.items():
        mean = s / total
        result[key] = (mean.round() if not dtypes[key].is_floating_point else mean).to(dtypes[key])
    seconds += time.perf_counter() - start
    return result, seconds


def average_inplace_unchecked(stream) -> tuple[dict[str, torch.Tensor], float]:
    """Arithmetic only: in-place weighted adds into float32 sums, no validation (the lower reference)."""
    sums: dict[str, torch.Tensor] = {}
    total = 0.0
    seconds = 0.0
    with torch.no_grad():
        for state_dict, weight, _ in stream:
            start = time.perf_counter()
            for key, value in state_dict.items():
                acc = sums.get(key)
                if acc is None:
                    dtype = torch.float64 if not value.is_floating_point() else torch.float32
                    sums[key] = value.to(dtype, copy=True).mul_(weight)
                else:
                    acc.add_(value, alpha=weight)
            total += weight
            seconds += time.perf_counter() - start
        start = time.perf_counter()
        result = {k: (s / total) for k, s in sums.items()}
        seconds += time.perf_counter() - start
    return result, seconds


METHODS = {
    "streaming_averager": average_streaming,
    "naive_python_sum": average_naive,
    "inplace_unchecked": average_inplace_unchecked,
}


def _repeats_for(k: int, min_adds: int = 20, max_repeats: int = 5) -> int:
    """Enough repeats that even K = 2 times at least ``min_adds`` additions (best repeat is kept)."""
    return max(1, min(max_repeats, -(-min_adds // k)))


def worker(k: int, model: str = DEFAULT_MODEL, num_classes: int = DEFAULT_NUM_CLASSES,
           methods: Sequence[str] = tuple(METHODS), bandwidth_bytes: int = 256 * 2**20,
           mode: str = "time") -> dict[str, Any]:
    """One K, measured in this (fresh) process.

    ``mode="time"``: copy bandwidth, then each method warmed up and timed (best of a few repeats), result checked.
    ``mode="memory"``: each method once, its peak resident memory above the state before it. Run this in a process
    started with a static ``MALLOC_MMAP_THRESHOLD_`` (see :func:`run_worker_subprocess`), so every tensor-sized block
    is returned to the kernel when freed and resident memory follows the live tensors instead of the allocator's
    retained heap.
    """
    base = base_state_dict(model, num_classes)
    reference = {key: t.clone() for key, t in base.items()}
    model_bytes = sum(t.numel() * t.element_size() for t in base.values())
    out: dict[str, Any] = {"k": k, "model": model, "model_bytes": model_bytes, "tensors": len(base),
                           "mode": mode, "load_average": load_average(), "methods": {}}
    if mode == "memory":
        del reference
        for name in methods:
            rss_before = rss_bytes()
            if not reset_peak_rss():
                out["methods"][name] = {"peak_extra_bytes": None, "peak_models": None}
                continue
            result, _ = METHODS[name](perturbed_stream(base, k))
            peak_extra = peak_rss_bytes() - rss_before
            del result
            out["methods"][name] = {"peak_extra_bytes": peak_extra, "peak_models": peak_extra / model_bytes}
        return out

    bandwidth = copy_bandwidth_gbs(bandwidth_bytes)
    # Averaging must read K models and write one; nothing else is unavoidable.
    floor_bytes = (k + 1) * model_bytes
    # Holding one model at a time, a running sum that does not fit in cache is read and written on every add:
    # first add read 1 + write 1, each later add read 2 + write 1, the result read 1 + write 1 (float32 sums).
    streaming_floor_bytes = (3 * k + 1) * model_bytes
    out.update({"copy_bandwidth_gbs": round(bandwidth, 2), "floor_bytes": floor_bytes,
                "floor_s": floor_bytes / (bandwidth * 1e9), "streaming_floor_bytes": streaming_floor_bytes,
                "streaming_floor_s": streaming_floor_bytes / (bandwidth * 1e9), "repeats": _repeats_for(k)})
    evict = torch.zeros(EVICT_BYTES // 4)
    # Warm the code paths (first-call dispatch costs) on a two-edge stream before any timing.
    for name in methods:
        METHODS[name](perturbed_stream(base, 2, evict))
    for name in methods:
        best = float("inf")
        error = 0.0
        for _ in range(out["repeats"]):
            result, seconds = METHODS[name](perturbed_stream(base, k, evict))
            best = min(best, seconds)
            error = max(error, max_error(result, reference, k))
            del result
        out["methods"][name] = {
            "seconds": best,
            "per_model_ms": 1000 * best / k,
            "effective_gbs": floor_bytes / best / 1e9,
            "fraction_of_floor": out["floor_s"] / best,
            "fraction_of_streaming_floor": out["streaming_floor_s"] / best,
            "max_abs_error": error,
        }
    streaming = out["methods"].get("streaming_averager")
    if streaming is not None:
        for m in out["methods"].values():
            m["time_over_streaming"] = m["seconds"] / streaming["seconds"]
    return out


def run_worker_subprocess(args: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    if args.get("mode") == "memory":
        # A static threshold turns off glibc's adaptive one: blocks >= 64 KiB are mmap'ed and unmapped on free.
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.aggregation", "--worker", json.dumps(args)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"aggregation worker {args} failed with exit code {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(ks: Sequence[int] = DEFAULT_KS, *, model: str = DEFAULT_MODEL, num_classes: int = DEFAULT_NUM_CLASSES,
        bandwidth_bytes: int = 256 * 2**20) -> dict[str, Any]:
    """Each K in two fresh processes: one timing every method, one measuring every method's peak memory."""
    rows = []
    per_k = []
    for k in ks:
        common_args = {"k": k, "model": model, "num_classes": num_classes}
        timed = run_worker_subprocess({**common_args, "mode": "time", "bandwidth_bytes": bandwidth_bytes})
        memory = run_worker_subprocess({**common_args, "mode": "memory"})
        for name, m in timed["methods"].items():
            m.update(memory["methods"][name])
        timed["memory_load_average"] = memory["load_average"]
        per_k.append(timed)
        for name, m in timed["methods"].items():
            rows.append([k, name, m["seconds"], m["per_model_ms"], m["fraction_of_floor"],
                         m["fraction_of_streaming_floor"], m["peak_models"], m["time_over_streaming"],
                         m["max_abs_error"]])
    print_table(
        f"Aggregation: {model} state dicts ({per_k[0]['model_bytes'] / 1e6:.1f} MB, {per_k[0]['tensors']} tensors); "
        f"floor = (K+1) models read+written at the copy bandwidth measured in the same process "
        f"(~{per_k[0]['copy_bandwidth_gbs']:.1f} GB/s); streaming floor = (3K+1) models",
        ["K", "method", "seconds", "ms/model", "of floor", "of stream floor", "peak/model", "time/ours", "max err"],
        rows,
    )
    peaks = [r["methods"]["streaming_averager"]["peak_models"] for r in per_k]
    summary = {
        "streaming_fraction_of_floor": {str(r["k"]): r["methods"]["streaming_averager"]["fraction_of_floor"]
                                        for r in per_k},
        "streaming_fraction_of_streaming_floor": {
            str(r["k"]): r["methods"]["streaming_averager"]["fraction_of_streaming_floor"] for r in per_k},
        "streaming_peak_models": {str(r["k"]): p for r, p in zip(per_k, peaks)},
        "naive_time_over_streaming": {str(r["k"]): r["methods"]["naive_python_sum"]["time_over_streaming"]
                                      for r in per_k if "naive_python_sum" in r["methods"]},
        "peak_models_spread": (max(peaks) - min(peaks)) if all(p is not None for p in peaks) else None,
    }
    return {"model": model, "per_k": per_k, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help="JSON arguments of one measurement (internal: run by `run`)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
    else:
        run()


if __name__ == "__main__":
    main()
