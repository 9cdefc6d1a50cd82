"""Loading local weight files (.safetensors, or torch.save checkpoints read with weights_only=True) into a model.

Nothing is downloaded. The model's classifier head, as the model registry identifies it, may differ in shape
(another number of classes): it is then left freshly initialised ("head replaced"); every other key must match.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecavg.errors import ModelError
from ecavg.models.registry import head_keys
from ecavg.models.torchvision_adapt import first_conv

__all__ = ["load_pretrained"]

# Prefixes added by wrappers around a model (DataParallel/DDP, torch.compile) that are not part of its keys.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrapper_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                stripped = True
    return key


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ModelError(f"cannot read safetensors weights {path}: {err}") from err
    else:
        try:
            # weights_only=True: a checkpoint must not be able to run code when it is loaded.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
            raise ModelError(
                f"cannot read weights {path} with torch.load(weights_only=True): {type(err).__name__}: {err}"
            ) from err

    if isinstance(loaded, Mapping):
        for container_key in ("state_dict", "model"):
            if isinstance(loaded.get(container_key), Mapping):
                loaded = loaded[container_key]
                break
    if not isinstance(loaded, Mapping):
        raise ModelError(f"weights file {path} holds a {type(loaded).__name__}, not a state dict")

    state: dict[str, torch.Tensor] = {}
    not_tensors: list[str] = []
    for raw_key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            not_tensors.append(str(raw_key))
            continue
        key = _strip_wrapper_prefixes(str(raw_key))
        if key in state:
            raise ModelError(f"weights file {path}: key {key!r} appears twice once wrapper prefixes are stripped")
        state[key] = value
    if not_tensors:
        raise ModelError(f"weights file {path}: entries that are not tensors: {_first_few(not_tensors)}")
    if not state:
        raise ModelError(f"weights file {path} holds no tensors")
    return state


def _first_few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def _replaceable_head_keys(model: nn.Module) -> list[str]:
    """The head's keys, or none for a model whose head the registry cannot identify (then every key must fit)."""
    try:
        return head_keys(model)
    except ModelError:
        return []


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load weights from a local `.safetensors` or torch.save file into `model` in place.

    The classifier head (the final layer the model registry names, see ``classifier_head``) is loaded when its
    shapes match and otherwise left freshly initialised ("head replaced"), whole: it never mixes loaded and
    fresh tensors. Every other key must match in name and shape. Returns the head keys that were not loaded.
    """
    path = Path(path)
    source = _read_state_dict(path)
    target = model.state_dict()

    head = _replaceable_head_keys(model)
    skipped_head = [] if all(k in source and source[k].shape == target[k].shape for k in head) else head
    skipped_set = set(skipped_head)

    # Checkpoints written before BatchNorm tracked its batch count lack num_batches_tracked; the count
    # only matters for momentum=None, so keeping the model's own value is harmless.
    missing = [
        k for k in target
        if k not in source and k not in skipped_set and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in source if k not in target]
    mismatched = [
        k for k in target
        if k in source and k not in skipped_set and source[k].shape != target[k].shape
    ]

    found_conv = first_conv(model)
    if found_conv is not None:
        conv_key = f"{found_conv[0]}.weight" if found_conv[0] else "weight"
        if conv_key in mismatched and source[conv_key].dim() == 4:
            src_in, model_in = source[conv_key].shape[1], target[conv_key].shape[1]
            if src_in != model_in and source[conv_key].shape[2:] == target[conv_key].shape[2:]:
                raise ModelError(
                    f"weights {path}: first conv {conv_key!r} was trained on {src_in}-channel input but the model "
                    f"takes {model_in} channels; build the model with in_channels={src_in} or use "
                    f"weights trained on {model_in}-channel data"
                )

    problems = []
    if mismatched:
        problems.append(
            "shape mismatch: "
            + _first_few([f"{k} (file {tuple(source[k].shape)}, model {tuple(target[k].shape)})" for k in mismatched])
        )
    if missing:
        problems.append("missing from file: " + _first_few(missing))
    if unexpected:
        problems.append("not in model: " + _first_few(unexpected))
    if problems:
        raise ModelError(
            f"weights {path} do not fit the {type(model).__name__} model; " + "; ".join(problems)
        )

    to_load = {k: v for k, v in source.items() if k not in skipped_set}
    # strict=False because skipped head keys (and old-style missing BN counters) are absent on purpose;
    # everything else was checked above.
    model.load_state_dict(to_load, strict=False)
    return skipped_head
