"""Model construction and pretrained-weight loading (plain PyTorch, no runtime knowledge)."""

from ecavg.models.registry import (
    ModelError,
    available_models,
    build_model,
    load_pretrained,
    uses_channels_last,
)

__all__ = ["ModelError", "available_models", "build_model", "load_pretrained", "uses_channels_last"]
