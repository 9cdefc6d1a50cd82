"""What an edge and the server do with weights and data, independent of how weights travel between them.

The embedded runtime calls these objects directly; the Flower runtime calls the same objects from its
ClientApp and ServerApp. Seeds are derived from (experiment seed, participant, phase) so that both runtimes
make the same random choices and produce the same numbers.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from ecavg.core.records import EdgeEvaluation, EdgeReply, StateDict
from ecavg.core.training import TrainingSettings, eval_logits, evaluate, recalibrate_batchnorm, train
from ecavg.data import ImageDataset, TensorLoader
from ecavg.errors import ConfigError
from ecavg.models import build_model, load_pretrained, uses_channels_last

if TYPE_CHECKING:
    from ecavg.core.update import UpdateMode

EVAL_BATCH_SIZE = 1024


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed for one participant and phase (stable across processes, unlike hash())."""
    text = "/".join([str(seed), *map(str, parts)])
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device = {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} was asked for but CUDA is not available here; "
                          "use device = \"cpu\" or \"auto\"")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device = {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device = {name!r} was asked for but MPS is not available here; use device = \"auto\"")
    return device


def cpu_state_dict(model: nn.Module) -> StateDict:
    """A detached, contiguous CPU copy of the model's weights (what is sent or stored)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class DataSpec:
    """The shape of the task, needed to build a model and normalise inputs."""

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0
    flip: bool = False
    test_flip: bool = False  # data.test_augment = "flip": every evaluation averages an image's and its mirror's logits


@dataclass
class ModelFactory:
    name: str
    options: dict[str, Any]
    spec: DataSpec
    device: torch.device
    pretrained: str = ""
    channels_last: bool = False  # set by build(): conv nets run in channels_last, inputs must match

    def build(self, seed: int, *, with_pretrained: bool = False) -> nn.Module:
        """A fresh model; ``with_pretrained`` loads the pretrained file (only the server's shared start needs it:
        everyone else receives weights)."""
        torch.manual_seed(seed)
        model = build_model(
            self.name, num_classes=self.spec.num_classes, in_channels=self.spec.in_channels,
            image_size=self.spec.image_size, options=dict(self.options),
        )
        if with_pretrained and self.pretrained:
            load_pretrained(model, self.pretrained)
        model = model.to(self.device)
        self.channels_last = uses_channels_last(model)
        if self.channels_last:
            # MobileNetV2 trained 2.0x faster on a 2-core CPU than in the default layout (bench/README.md).
            model = model.to(memory_format=torch.channels_last)
        return model

    def loader(self, data: ImageDataset, batch_size: int, *, train: bool, seed: int = 0) -> TensorLoader:
        return TensorLoader(
            data, batch_size, mean=self.spec.mean, std=self.spec.std, shuffle=train,
            crop_padding=self.spec.crop_padding if train else 0, flip=self.spec.flip and train,
            drop_last=train and len(data) > batch_size, device=self.device,
            channels_last=self.channels_last, seed=seed,
        )

    def eval_loader(self, data: ImageDataset) -> TensorLoader:
        """``data`` in evaluation batches: in order, no augmentation (test-time flips are the evaluation's)."""
        return self.loader(data, EVAL_BATCH_SIZE, train=False)

    def evaluate(self, model: nn.Module, data: ImageDataset, *, desc: str = "evaluate") -> dict[str, Any]:
        """``model``'s accuracy, loss and sample count on ``data``, with the task's test-time augmentation."""
        return evaluate(model, self.eval_loader(data), desc=desc, flip=self.spec.test_flip)


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Load weights into a model in place (strict: every key must match)."""
    model.load_state_dict(weights, strict=True)


@dataclass
class EdgeWorker:
    """One edge: its own training and test partitions; it holds no model between calls.

    ``validation_data`` is the slice of its training data that ``update.mode = "guarded"`` holds out (never
    trained on, by the edge or the server); ``full_test_data`` the run's whole test set where the edge has a
    copy (for ``accuracy_after_full``); ``update_mode`` what the edge does with the server's final model
    (``ecavg.core.update``; None: the paper's replace). When the mode needs them, the runtime hands the edge its
    own pre-trained weights (``pretrained_weights``) for the update only: the embedded pool reads them from the
    run's checkpoints, a Flower edge from its node's state (or the server's message, on ``--resume``).
    """

    name: str
    index: int
    train_data: ImageDataset
    test_data: ImageDataset
    factory: ModelFactory
    settings: TrainingSettings
    seed: int
    eval_each_epoch: bool = True
    validation_data: ImageDataset | None = field(default=None, repr=False)
    full_test_data: ImageDataset | None = field(default=None, repr=False)
    update_mode: UpdateMode | None = field(default=None, repr=False)
    pretrained_weights: StateDict | None = field(default=None, repr=False)

    def new_model(self, weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """A model of this edge holding ``weights`` (None: the edge's own random init)."""
        model = self.factory.build(derive_seed(self.seed, "init", self.name))
        if weights is not None:
            load_weights(model, weights)
        return model

    def train_model(self, weights: Mapping[str, torch.Tensor] | None, *, phase: str,
                    settings: TrainingSettings) -> tuple[nn.Module, list[dict[str, float]]]:
        """Train from ``weights`` (None: this edge's own random init) on the edge's training data; seeds are
        derived from (experiment seed, phase, edge), so every runtime makes the same random choices."""
        model = self.new_model(weights)
        torch.manual_seed(derive_seed(self.seed, phase, self.name, "train"))
        loader = self.factory.loader(self.train_data, settings.batch_size, train=True,
                                     seed=derive_seed(self.seed, phase, self.name, "shuffle"))

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            if self.eval_each_epoch and epoch < settings.epochs:
                metrics["test_accuracy"] = self.factory.evaluate(model, self.test_data)["accuracy"]

        history = train(model, loader, settings, desc=f"{self.name} {phase}", on_epoch=on_epoch)
        return model, history

    def fit(self, weights: Mapping[str, torch.Tensor] | None, *, phase: str, epochs: int | None = None) -> EdgeReply:
        """Train from ``weights`` (None: this edge's own random init) and evaluate on the edge's test partition
        (the reply's byte counts are left to the runtime that moves it)."""
        settings = self.settings if epochs is None else TrainingSettings(**{**self.settings.__dict__, "epochs": epochs})
        model, history = self.train_model(weights, phase=phase, settings=settings)
        result = self.evaluate_model(model, self.test_data)
        if history:
            history[-1]["test_accuracy"] = result["accuracy"]
        # Nothing model-sized stays on the edge after it replies (1,000 edges would hold 1,000 models): the
        # runtime keeps the reply where the update needs it (the run's checkpoints, or a Flower node's state).
        return EdgeReply(name=self.name, weights=cpu_state_dict(model), num_samples=len(self.train_data),
                         accuracy=result["accuracy"], test_samples=result["samples"], history=history)

    def evaluate_model(self, model: nn.Module, data: ImageDataset) -> dict[str, Any]:
        """``model``'s accuracy, loss and sample count on ``data`` (one of this edge's datasets)."""
        return self.factory.evaluate(model, data, desc=f"{self.name} evaluate")

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> EdgeEvaluation:
        """Evaluate ``weights`` on the edge's test partition (the edge's final model, when the update keeps them)."""
        result = self.evaluate_model(self.new_model(weights), self.test_data)
        return EdgeEvaluation(name=self.name, accuracy=result["accuracy"], test_samples=result["samples"])

    def update(self, weights: Mapping[str, torch.Tensor]) -> EdgeEvaluation:
        """Step 5: what this edge makes of the server's final ``weights`` (its ``update_mode``), evaluated."""
        if self.update_mode is None:
            return self.evaluate(weights)
        return self.update_mode.apply(self, dict(weights))


@dataclass
class ServerWorker:
    """The server: builds the shared start, evaluates on the full test set, fine-tunes on the edges' data."""

    factory: ModelFactory
    settings: TrainingSettings
    test_data: ImageDataset
    seed: int
    eval_each_epoch: bool = True

    def new_model(self, weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """A model holding ``weights``; None gives the server's own start (seeded random or the pretrained file)."""
        model = self.factory.build(derive_seed(self.seed, "init", "server"), with_pretrained=weights is None)
        if weights is not None:
            load_weights(model, weights)
        return model

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> float:
        return self.factory.evaluate(self.new_model(weights), self.test_data, desc="server evaluate")["accuracy"]

    def evaluate_ensemble(self, models: list[nn.Module]) -> float:
        """Accuracy on the full test set of the models' mean logits (e.g. the edges' ensemble)."""
        correct = seen = 0
        with torch.no_grad():
            for model in models:
                model.eval()
            for x, y in self.factory.eval_loader(self.test_data):
                logits = torch.stack([eval_logits(m, x, flip=self.factory.spec.test_flip) for m in models]).mean(0)
                correct += int((logits.argmax(1) == y).sum())
                seen += int(y.numel())
        return correct / max(seen, 1)

    def train(
        self, weights: Mapping[str, torch.Tensor] | None, data: ImageDataset, *, phase: str, epochs: int,
        on_epoch_record: Callable[[dict[str, float]], None] | None = None,
        loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[StateDict, list[dict[str, float]]]:
        """Train from ``weights`` (None: the server's seeded random init) on ``data`` for ``epochs`` epochs,
        with ``loss`` (default: cross-entropy; see ``ecavg.core.objectives``)."""
        model = self.new_model(weights)
        settings = TrainingSettings(**{**self.settings.__dict__, "epochs": epochs})
        torch.manual_seed(derive_seed(self.seed, phase, "server", "train"))
        loader = self.factory.loader(data, settings.batch_size, train=True,
                                     seed=derive_seed(self.seed, phase, "server", "shuffle"))

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            if self.eval_each_epoch or epoch == epochs:
                metrics["test_accuracy"] = self.factory.evaluate(model, self.test_data)["accuracy"]
            if on_epoch_record is not None:
                on_epoch_record(metrics)

        history = train(model, loader, settings, desc=f"server {phase}", on_epoch=on_epoch, loss=loss)
        return cpu_state_dict(model), history

    def recalibrate(self, weights: Mapping[str, torch.Tensor], data: ImageDataset) -> StateDict | None:
        """BatchNorm statistics recomputed on ``data``; None when the model has no BatchNorm."""
        model = self.new_model(weights)
        loader = self.factory.loader(data, self.settings.batch_size, train=True,
                                     seed=derive_seed(self.seed, "bn_recalibration", "server"))
        if not recalibrate_batchnorm(model, loader):
            return None
        return cpu_state_dict(model)
