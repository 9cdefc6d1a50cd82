"""Step 5, the update: what an edge does with the server's final model (config key ``update.mode``).

The paper replaces every edge's model with the server's (``replace``). When the edges' data differ, that can
leave an edge worse than its own pre-trained model, so the other modes keep some of what the edge learned:

- ``finetune``: the edge trains ``update.epochs`` from the server's weights on its own data;
- ``personal``: the edge takes the server's weights except ``update.keep_local`` (its classifier head, its
  BatchNorm layers, or both), which it keeps from its own pre-trained model (FedPer / FedBN), optionally
  followed by ``update.epochs`` of fine-tuning;
- ``guarded``: the edge holds out ``update.validation_fraction`` of its training data (neither it nor the
  server ever trains on it), scores its own model and every candidate (server, fine-tuned, personal) on that
  slice, and keeps the best; a tie keeps its own model.

The edge runs the update (``EdgeWorker.update`` calls ``UpdateMode.apply``), in either runtime; nothing here
changes what the server trains. A mode is one class registered in ``UPDATE_MODES`` plus the keys it declares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch
from torch import nn

from ecavg.config.checks import choice, int_at_least, number_in
from ecavg.core.participants import cpu_state_dict, derive_seed
from ecavg.core.records import EdgeEvaluation, StateDict
from ecavg.core.training import TrainingSettings
from ecavg.data import ImageDataset, stratified_share
from ecavg.errors import ConfigError, EdgeSetupError, ModelError
from ecavg.models import batchnorm_keys, head_keys
from ecavg.registry import Key, Option, Registry

if TYPE_CHECKING:
    from ecavg.core.participants import EdgeWorker
    from ecavg.data import ImageDataset

KEEP_LOCAL_PARTS = ("head", "bn")
# What an edge may end with, in the order guarded prefers them on a tie (its own model first).
CANDIDATES = ("own", "server", "finetuned", "personal")
# The phases of the update's fine-tunes (seeds and metrics.jsonl records): from the server's weights, from the
# personal merge.
FINETUNE_PHASES = ("update-finetune", "update-personal")


def _keep_local(v: Any) -> str | None:
    if isinstance(v, list) and all(isinstance(x, str) and x in KEEP_LOCAL_PARTS for x in v) and len(set(v)) == len(v):
        return None
    return "must be a list of distinct parts from head, bn (e.g. [\"head\"], [\"bn\"], [\"head\", \"bn\"])"


# Shared by the modes that read them (one Key object each, so the registry sees one declaration).
EPOCHS = Key(1, int_at_least(0), "epochs the edge trains from the server's weights (personal, guarded: 0 = none)")
LR = Key(0.0, number_in(0.0, 100.0), "learning rate of the update's fine-tuning; 0: edge.lr")
BATCH_SIZE = Key(0, int_at_least(0), "batch size of the update's fine-tuning; 0: edge.batch_size")
SCHEDULE = Key("edge", choice(("edge", "constant", "onecycle", "cosine")),
               "schedule of the update's fine-tuning; edge: edge.schedule")
KEEP_LOCAL = Key(["head"], _keep_local, "parts the edge keeps from its own pre-trained model: head, bn")
VALIDATION_FRACTION = Key(0.1, number_in(0.0, 0.5, lo_open=True),
                          "share of each edge's training data held out to choose its model")
FINETUNE_KEYS = {"update.epochs": EPOCHS, "update.lr": LR, "update.batch_size": BATCH_SIZE,
                 "update.schedule": SCHEDULE}


def validation_split(data: ImageDataset, fraction: float, seed: int, edge_name: str) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """(training positions, validation positions) in ``data``: a seeded, class-stratified ``fraction`` held out
    (at least one sample). Both runtimes call this with the same arguments, so they hold out the same samples."""
    g = torch.Generator().manual_seed(derive_seed(seed, "update-validation", edge_name))
    validation = stratified_share(data.labels, data.num_classes, fraction, g)
    if len(validation) == 0 and len(data) > 0:
        validation = torch.randperm(len(data), generator=g)[:1]
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[validation] = False
    return rest.nonzero().flatten(), validation.sort().values


@dataclass
class Choice:
    """The model an edge ends with, and what making it cost."""

    kept: str
    weights: StateDict
    train_samples: int = 0
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    validation: dict[str, float] | None = None


class UpdateMode(Option, ABC):
    """What an edge does with the server's final weights."""

    # Whether the edge must keep its own pre-trained weights until the update.
    needs_own_weights: ClassVar[bool] = False
    # Whether each edge holds out a validation slice of its training data (from everyone's training).
    holds_out_validation: ClassVar[bool] = False
    # Whether the mode reads update.keep_local (the model must then have what it names).
    uses_keep_local: ClassVar[bool] = False

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        section = cfg["update"]
        self.epochs = int(section["epochs"])
        self.keep_local = tuple(section["keep_local"])
        self.validation_fraction = float(section["validation_fraction"])
        self._local_keys: frozenset[str] | None = None

    def candidates(self) -> tuple[str, ...]:
        """The values ``kept`` may take (what a deployed edge's reply is checked against)."""
        return ("server",)

    def check(self, cfg: Mapping[str, Any]) -> None:
        """Consistency of the ``update`` keys with this mode (ConfigError naming the key)."""

    def check_model(self, model: nn.Module, model_name: str) -> None:
        """The model has the parts ``update.keep_local`` names (called once the model can be built)."""
        if not self.uses_keep_local:
            return
        if "head" in self.keep_local:
            try:
                head_keys(model)
            except ModelError as error:
                raise ConfigError(f"config key 'update.keep_local' names \"head\", but model {model_name!r} has no "
                                  f"classifier head the model registry can find ({error}); remove \"head\"") from None
        if "bn" in self.keep_local and not batchnorm_keys(model):
            raise ConfigError(f"config key 'update.keep_local' names \"bn\", but model {model_name!r} has no "
                              "BatchNorm layers; remove \"bn\"")

    def settings(self, edge: TrainingSettings) -> TrainingSettings:
        """The fine-tuning's optimiser settings: ``update.*`` where set, else the ``[edge]`` ones."""
        section = self.cfg["update"]
        return replace(edge, epochs=self.epochs, lr=section["lr"] or edge.lr,
                       batch_size=section["batch_size"] or edge.batch_size,
                       schedule=edge.schedule if section["schedule"] == "edge" else section["schedule"])

    @abstractmethod
    def choose(self, edge: EdgeWorker, server_weights: StateDict) -> Choice:
        """The edge's final model."""

    def apply(self, edge: EdgeWorker, server_weights: StateDict) -> EdgeEvaluation:
        """Make the edge's final model and evaluate it on the edge's own test partition and the full test set."""
        made = self.choose(edge, server_weights)
        extras = {"kept": made.kept, "train_samples": made.train_samples, "validation": made.validation,
                  "history": made.history}
        if made.kept == "server":
            return replace(edge.evaluate(server_weights), **extras)  # exactly the paper's step 5
        model = edge.new_model(made.weights)
        result = edge.evaluate_model(model, edge.test_data)
        full = edge.evaluate_model(model, edge.full_test_data)["accuracy"] if edge.full_test_data is not None else None
        return EdgeEvaluation(name=edge.name, accuracy=result["accuracy"], test_samples=result["samples"],
                              accuracy_full=full, weights=made.weights, **extras)

    # -- what the modes are made of ------------------------------------------------------------------

    def own_weights(self, edge: EdgeWorker) -> StateDict:
        if edge.pretrained_weights is None:
            raise EdgeSetupError(f"{edge.name}: update.mode = \"{self.name}\" needs the edge's own pre-trained "
                                 "weights, but it holds none (was it restarted since pre-training?)")
        return edge.pretrained_weights

    def finetune(self, edge: EdgeWorker, weights: StateDict, phase: str) -> Choice:
        """``weights`` trained ``update.epochs`` on the edge's training data (unchanged for 0 epochs)."""
        if self.epochs == 0:
            return Choice("", weights)
        model, history = edge.train_model(weights, phase=phase, settings=self.settings(edge.settings))
        return Choice("", cpu_state_dict(model), self.epochs * len(edge.train_data), {phase: history})

    def personalise(self, edge: EdgeWorker, server_weights: StateDict) -> StateDict:
        """The server's weights with the ``keep_local`` parts taken from the edge's own model."""
        if self._local_keys is None:
            model = edge.new_model()
            keys: list[str] = []
            if "head" in self.keep_local:
                keys += head_keys(model)
            if "bn" in self.keep_local:
                keys += batchnorm_keys(model)
            self._local_keys = frozenset(keys)
        own = self.own_weights(edge)
        return {k: own[k].clone() if k in self._local_keys else v for k, v in server_weights.items()}

    def personal(self, edge: EdgeWorker, server_weights: StateDict) -> Choice:
        tuned = self.finetune(edge, self.personalise(edge, server_weights), "update-personal")
        return replace(tuned, kept="personal")


UPDATE_MODES: Registry[UpdateMode] = Registry("update.mode", "replace", what="update mode")


@UPDATE_MODES.register
class Replace(UpdateMode):
    name = "replace"
    summary = "every edge replaces its model with the server's (the paper's step 5)"

    def choose(self, edge: EdgeWorker, server_weights: StateDict) -> Choice:
        return Choice("server", server_weights)


@UPDATE_MODES.register
class Finetune(UpdateMode):
    name = "finetune"
    summary = "each edge trains `update.epochs` from the server's weights on its own data"
    keys = FINETUNE_KEYS

    def candidates(self) -> tuple[str, ...]:
        return ("finetuned",)

    def check(self, cfg: Mapping[str, Any]) -> None:
        if self.epochs < 1:
            raise ConfigError("config key 'update.epochs' must be >= 1 with update.mode = \"finetune\", got 0")

    def choose(self, edge: EdgeWorker, server_weights: StateDict) -> Choice:
        return replace(self.finetune(edge, server_weights, "update-finetune"), kept="finetuned")


@UPDATE_MODES.register
class Personal(UpdateMode):
    name = "personal"
    summary = ("each edge takes the server's weights except `update.keep_local` (head, bn), kept from its own "
               "model; then `update.epochs` of fine-tuning (0: none)")
    keys = {**FINETUNE_KEYS, "update.keep_local": KEEP_LOCAL}
    needs_own_weights = True
    uses_keep_local = True

    def candidates(self) -> tuple[str, ...]:
        return ("personal",)

    def check(self, cfg: Mapping[str, Any]) -> None:
        if not self.keep_local:
            raise ConfigError("config key 'update.keep_local' must name at least one of head, bn with "
                              "update.mode = \"personal\", got []")

    def choose(self, edge: EdgeWorker, server_weights: StateDict) -> Choice:
        return self.personal(edge, server_weights)


@UPDATE_MODES.register
class Guarded(UpdateMode):
    name = "guarded"
    summary = ("each edge scores its own model, the server's, the fine-tuned and the personal one on a held-out "
               "slice of its training data and keeps the best (a tie keeps its own)")
    keys = {**FINETUNE_KEYS, "update.keep_local": KEEP_LOCAL, "update.validation_fraction": VALIDATION_FRACTION}
    needs_own_weights = True
    holds_out_validation = True
    uses_keep_local = True

    def candidates(self) -> tuple[str, ...]:
        return CANDIDATES

    def choose(self, edge: EdgeWorker, server_weights: StateDict) -> Choice:
        if edge.validation_data is None:
            raise EdgeSetupError(f"{edge.name}: update.mode = \"guarded\" needs a held-out validation slice, "
                                 "but the edge has none")
        made = {"own": Choice("own", self.own_weights(edge)), "server": Choice("server", server_weights)}
        if self.epochs > 0:
            made["finetuned"] = replace(self.finetune(edge, server_weights, "update-finetune"), kept="finetuned")
        if self.keep_local:
            made["personal"] = self.personal(edge, server_weights)
        scores = {name: edge.evaluate_model(edge.new_model(c.weights), edge.validation_data)["accuracy"]
                  for name, c in made.items()}
        best = "own"
        for name in made:  # strictly better only: a tie keeps the earlier candidate, the edge's own model first
            if scores[name] > scores[best]:
                best = name
        history = {phase: h for c in made.values() for phase, h in c.history.items()}
        return Choice(best, made[best].weights, sum(c.train_samples for c in made.values()), history, scores)


def make_update_mode(cfg: Mapping[str, Any]) -> UpdateMode:
    return UPDATE_MODES.get(cfg["update"]["mode"])(cfg)


def _value(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def check_update_config(cfg: Mapping[str, Any], strategy: Any) -> None:
    """The ``update`` keys fit the strategy and the mode (ConfigError naming the key).

    ``strategy`` is the selected strategy class: it says whether its edges receive a final model
    (``updates_edges``), have models of their own (``edge_models``) and keep their pre-trained ones until
    the update (``keeps_pretrained``).
    """
    mode = make_update_mode(cfg)
    if not strategy.edge_models or not strategy.updates_edges:
        changed = [k for k, key in UPDATE_MODES.keys().items() if _value(cfg, k) != key.default]
        if mode.name != UPDATE_MODES.default or changed:
            key = "update.mode" if mode.name != UPDATE_MODES.default else changed[0]
            why = ("its edges have no models of their own, they only receive the server's" if not strategy.edge_models
                   else "its edges receive no model from the server")
            raise ConfigError(f"config key '{key}' has no meaning for strategy = \"{strategy.name}\" ({why}); "
                              "remove the [update] keys")
    if mode.needs_own_weights and not strategy.keeps_pretrained:
        raise ConfigError(f"config key 'update.mode' = \"{mode.name}\" needs each edge's own pre-trained model, "
                          f"which strategy = \"{strategy.name}\" does not keep until the update; use "
                          "update.mode = \"finetune\" or \"replace\"")
    mode.check(cfg)
