"""Training and evaluation loops shared by edges and server, whatever runtime drives them."""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ecavg.errors import NonFiniteLossError

log = logging.getLogger("ecavg")


@dataclass(frozen=True)
class TrainingSettings:
    """One participant's optimiser settings (the [edge], [server] config sections)."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, section: Mapping[str, Any], **override: Any) -> "TrainingSettings":
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in section.items() if k in names}
        values.update(override)
        return cls(**values)



def _make_optimizer(model: nn.Module, s: TrainingSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        nesterov = s.nesterov and s.momentum > 0
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, nesterov=nesterov, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}")


ONECYCLE_WARMUP = 0.25  # share of the steps that the one-cycle schedule spends raising the learning rate


def _make_schedule(opt: torch.optim.Optimizer, s: TrainingSettings, total_steps: int):
    if s.schedule == "constant" or total_steps <= 1:
        return None
    if s.schedule == "onecycle":
        if total_steps * ONECYCLE_WARMUP <= 1:
            # No step left for the warm-up: OneCycleLR divides by zero at 4 steps (a small edge, e.g. one batch
            # for one epoch of the update's fine-tuning); so few steps train at the constant learning rate.
            return None
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=s.lr, total_steps=total_steps, pct_start=ONECYCLE_WARMUP, anneal_strategy="linear",
            cycle_momentum=False,
        )
    if s.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    raise ValueError(f"unknown schedule {s.schedule!r}")


def _progress(iterable: Iterable, total: int, desc: str):
    """A progress bar on a terminal; plain iteration (log lines come from the caller) otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return iterable


def train(
    model: nn.Module,
    loader,
    settings: TrainingSettings,
    *,
    desc: str = "train",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place for ``settings.epochs`` epochs over ``loader``.

    ``loss(logits, inputs, targets)`` is the batch loss (default: cross-entropy with the settings' label
    smoothing). ``on_epoch(epoch, metrics)`` is called after each epoch (1-based) and may add to ``metrics``
    (e.g. a test accuracy); the list of per-epoch metrics is returned.
    """
    if settings.epochs == 0:
        return []
    opt = _make_optimizer(model, settings)
    sched = _make_schedule(opt, settings, settings.epochs * len(loader))
    if loss is None:
        cross_entropy = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)

        def loss(logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return cross_entropy(logits, targets)
    history: list[dict[str, float]] = []
    for epoch in range(1, settings.epochs + 1):
        model.train()
        start = time.perf_counter()
        # Sums stay on the device so the loop never waits for the accelerator.
        loss_sum = torch.zeros((), device=_device_of(model))
        correct = torch.zeros((), dtype=torch.long, device=_device_of(model))
        seen = 0
        for x, y in _progress(loader, len(loader), f"{desc} epoch {epoch}/{settings.epochs}"):
            out = model(x)
            batch_loss = loss(out, x, y)
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            loss_sum += batch_loss.detach() * y.numel()
            correct += (out.detach().argmax(1) == y).sum()
            seen += y.numel()
        mean_loss = loss_sum.item() / max(seen, 1)
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"{desc}: training loss became {mean_loss} in epoch {epoch}; lower the learning rate (lr={settings.lr})"
            )
        seconds = time.perf_counter() - start
        metrics = {
            "epoch": epoch,
            "train_loss": mean_loss,
            "train_accuracy": correct.item() / max(seen, 1),
            "seconds": seconds,
            "samples_per_s": seen / seconds if seconds > 0 else 0.0,
        }
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        log.info(
            "%s epoch %d/%d: loss %.4f, train acc %.4f%s, %.1f s",
            desc, epoch, settings.epochs, metrics["train_loss"], metrics["train_accuracy"],
            f", test acc {metrics['test_accuracy']:.4f}" if "test_accuracy" in metrics else "", seconds,
        )
        history.append(metrics)
    return history


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def eval_logits(model: nn.Module, x: torch.Tensor, *, flip: bool = False) -> torch.Tensor:
    """``model``'s logits for the batch ``x``; with ``flip``, the mean of the logits of ``x`` and of its horizontal
    mirror (test-time augmentation: the model was trained on mirrored images too)."""
    out = model(x)
    if flip:
        out = (out + model(x.flip(-1))) / 2
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, desc: str = "evaluate", flip: bool = False) -> dict[str, float]:
    """Accuracy (fraction) and mean cross-entropy loss of ``model`` over ``loader`` (``flip``: see ``eval_logits``)."""
    model.eval()
    device = _device_of(model)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for x, y in _progress(loader, len(loader), desc):
        out = eval_logits(model, x, flip=flip)
        loss_sum += nn.functional.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        seen += y.numel()
    if seen == 0:
        raise ValueError(f"{desc}: the evaluation data is empty")
    return {"accuracy": correct.item() / seen, "loss": loss_sum.item() / seen, "samples": seen}


def recalibrate_batchnorm(model: nn.Module, loader, *, max_batches: int = 200) -> bool:
    """Recompute BatchNorm running statistics on at most ``max_batches`` batches of ``loader`` (weights unchanged).

    Averaged weights come with averaged running statistics, which do not describe the activations of the averaged
    network; recomputing them on data the server holds often recovers much of the lost accuracy.
    Returns False when the model has no BatchNorm layer.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    torch.optim.swa_utils.update_bn(itertools.islice(loader, max_batches), model)
    model.eval()
    return True
