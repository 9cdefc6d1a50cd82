"""Bytes and encode/decode time of each transfer codec (ecavg.core.codecs) for the paper's three models.

    python bench/codec_speed.py [--repeats 5] [--threads N]

For each model (mlp on MNIST, mobilenet_v2 on CIFAR-10, resnet50 on CIFAR-100, at their datasets' shapes) and each
codec, with and without deltas and ``transfer.deflate``: payload bytes, their share of fp32's, and the best of
``--repeats`` encode and decode times (decode includes every validation). Timings are CPU, on whatever else shares
the machine: the 1-minute load average is printed before and after. Weights are a fresh initialisation; the delta
base is a second one, so the delta is as large as the weights. Without deflate bytes and time do not depend on the
values; deflated bytes do (a fresh initialisation deflates less than trained weights: for trained ones see the
runs in docs/findings.md), its time hardly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a script (`python bench/codec_speed.py`): make the repository root importable for `bench` and `ecavg`.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import best_time, load_average, print_table
from ecavg.core.codecs import CODECS, codec
from ecavg.core.transfer import Transfer
from ecavg.formatting import transfer_label
from ecavg.host import host_info
from ecavg.models import build_model

# (model, dataset, classes, input channels, image size)
MODELS = (
    ("mlp", "mnist", 10, 1, 28),
    ("mobilenet_v2", "cifar10", 10, 3, 32),
    ("resnet50", "cifar100", 100, 3, 32),
)


def model_state(model: str, classes: int, channels: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = build_model(model, num_classes=classes, in_channels=channels, image_size=size)
    return {key: value.detach().clone().contiguous() for key, value in net.state_dict().items()}


def measure(repeats: int) -> list[list[object]]:
    rows: list[list[object]] = []
    for model, dataset, classes, channels, size in MODELS:
        state = model_state(model, classes, channels, size, seed=0)
        base = model_state(model, classes, channels, size, seed=1)
        fp32_bytes = len(codec("fp32").encode(state))
        for name in CODECS:
            for delta, deflate in itertools.product((False, True), (False, True)):
                if name == "fp32" and delta:
                    continue  # refused by the config: a float32 delta is as large as the weights
                chosen = Transfer(name, delta, deflate)
                shared = base if delta else None
                payload = chosen.encode(state, base=shared)
                encode_s = best_time(partial(chosen.encode, state, base=shared), repeats)
                decode_s = best_time(
                    partial(chosen.decode, payload, reference=state, base=shared, name="bench"), repeats
                )
                rows.append([
                    f"{model} ({dataset})", transfer_label(chosen.to_dict()), len(payload),
                    f"{len(payload) / fp32_bytes:.1%}", f"{encode_s * 1e3:.1f}", f"{decode_s * 1e3:.1f}",
                ])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{json.dumps(host_info())}, load average before: {load_average():.2f}")
    rows = measure(args.repeats)
    print_table(
        f"Transfer codecs: payload and time per state dict (best of {args.repeats})",
        ["model", "codec", "bytes", "of fp32", "encode ms", "decode ms"],
        rows,
    )
    print(f"\nload average after: {load_average():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
