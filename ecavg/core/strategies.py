"""The strategies (ECAvg and its baselines), each composed of the public phases in ``ecavg.core.phases``.

Every strategy is a class registered in ``STRATEGIES``: its name is a value of the config key ``strategy``, and
what it declares (does it train edge models, does the server train, which results fields it fills) is what
config validation, the deploy settings, the CLI's help and the docs builder read. Adding a strategy is one class
here (or in a module imported by ``ecavg.core.options``) plus its tests and docs.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import ClassVar

from ecavg.core import phases
from ecavg.core.aggregation import make_aggregator
from ecavg.core.objectives import make_objective
from ecavg.core.phases import RunContext, Tally
from ecavg.core.records import Outcome, StateDict
from ecavg.core.update import make_update_mode
from ecavg.registry import Option, Registry


class Strategy(Option, ABC):
    title: ClassVar[str]  # how tables in the docs name it
    # Whether edges train models of their own (false: shared_init and edge-side options mean nothing).
    edge_models: ClassVar[bool] = True
    # Whether the server trains on the edges' data: "required", "optional" (skipped, with a note, when a
    # deployment gives the server no data) or "none".
    server_training: ClassVar[str] = "none"
    # The results fields it fills, for the README's table.
    fills: ClassVar[str] = ""
    # Whether it ends by sending a final model to the edges (step 5, shaped by update.mode).
    updates_edges: ClassVar[bool] = True
    # Whether each edge still has its own pre-trained model at the update (update modes that keep or compare it).
    keeps_pretrained: ClassVar[bool] = False
    # Whether it combines the edges' models with the rule ``aggregation`` names.
    aggregates: ClassVar[bool] = False

    @classmethod
    def run(cls, ctx: RunContext) -> Outcome:
        tally = Tally(ctx)
        server_weights, edge_weights = cls.compose(ctx, tally)
        return Outcome(tally.results(), server_weights, edge_weights)

    @classmethod
    @abstractmethod
    def compose(cls, ctx: RunContext, tally: Tally) -> tuple[StateDict | None, dict[str, object]]:
        """Run the phases; return the server's final weights and each edge's (or SAME_AS_SERVER)."""


STRATEGIES: Registry[Strategy] = Registry("strategy", "ecavg", what="strategy")


@STRATEGIES.register
class ECAvg(Strategy):
    name = "ecavg"
    title = "ECAvg"
    summary = "the five steps: edges pre-train, the server averages, fine-tunes on the edges' data, sends it back"
    server_training = "optional"
    fills = "all"
    keeps_pretrained = True
    aggregates = True

    @classmethod
    def compose(cls, ctx: RunContext, tally: Tally) -> tuple[StateDict | None, dict[str, object]]:
        aggregator = make_aggregator(ctx.cfg)
        objective = make_objective(ctx.cfg)
        kept: dict[str, StateDict] | None = {} if objective.needs_edge_models else None
        phases.pretrain(ctx, tally, aggregator=aggregator, keep=kept,
                        restore_own=make_update_mode(ctx.cfg).needs_own_weights)
        averaged = phases.aggregate(ctx, tally, aggregator)
        if ctx.cfg["server_data_fraction"] == 0:  # the server holds no data: one-shot averaging
            return averaged, phases.update(ctx, tally, averaged)
        if kept is not None:
            tally.server.update(objective.bind(ctx.server, kept))
        finetuned = phases.server_train(ctx, tally, "finetune", averaged, objective)
        return finetuned, phases.update(ctx, tally, finetuned)


@STRATEGIES.register
class Centralized(Strategy):
    name = "centralized"
    title = "centralized (server only, same server epochs)"
    summary = ("the server trains from the initial weights on the union of the edges' data for `server.epochs`, "
               "then sends the model to the edges")
    edge_models = False
    server_training = "required"
    fills = "`accuracy_after`, `accuracy_finetuned`"

    @classmethod
    def compose(cls, ctx: RunContext, tally: Tally) -> tuple[StateDict | None, dict[str, object]]:
        init = phases.initial_weights(ctx, tally)
        trained = phases.server_train(ctx, tally, "centralized", init, make_objective(ctx.cfg))
        return trained, phases.update(ctx, tally, trained)


@STRATEGIES.register
class LocalOnly(Strategy):
    name = "local"
    title = "local-only edges"
    summary = "edges pre-train only (what each edge has without the server)"
    fills = "`accuracy_before`"
    updates_edges = False

    @classmethod
    def compose(cls, ctx: RunContext, tally: Tally) -> tuple[StateDict | None, dict[str, object]]:
        kept: dict[str, StateDict] = {}
        phases.pretrain(ctx, tally, keep=kept)
        return None, dict(kept)


@STRATEGIES.register
class FedAvg(Strategy):
    name = "fedavg"
    title = "FedAvg (same total epochs)"
    summary = "`fedavg.rounds` rounds of `edge.epochs` local epochs + weighted averaging, no server data"
    fills = "`accuracy_before` (after round 1's local training), `accuracy_after`, `accuracy_averaged`"
    aggregates = True

    @classmethod
    def compose(cls, ctx: RunContext, tally: Tally) -> tuple[StateDict | None, dict[str, object]]:
        init = phases.initial_weights(ctx, tally)
        global_weights: StateDict | None = init if ctx.cfg["shared_init"] else None
        rounds = ctx.cfg["fedavg"]["rounds"]
        for r in range(1, rounds + 1):
            phase = f"round{r}"
            cached = ctx.store.load(phase)
            if cached is not None:
                record, global_weights = cached
                tally.timing["pretrain"] += record["train_s"]
                tally.timing["aggregate"] += record["aggregate_s"]
                tally.bytes["uplink"] += record["bytes_up"]
                tally.bytes["downlink"] += record["bytes_down"]
            else:
                before = (tally.timing["pretrain"], tally.timing["aggregate"], tally.bytes["uplink"],
                          tally.bytes["downlink"])
                aggregator = make_aggregator(ctx.cfg)
                records = phases.train_edges(ctx, tally, phase, global_weights, epochs=ctx.cfg["edge"]["epochs"],
                                             aggregator=aggregator, checkpoint_edges=False)
                t = time.perf_counter()
                global_weights = aggregator.result(ctx.server, ctx.pool.training_data)
                tally.timing["aggregate"] += time.perf_counter() - t
                record = {
                    "accuracy": ctx.server.evaluate(global_weights),
                    "edges": {n: rec["accuracy"] for n, rec in records.items()},
                    "train_s": tally.timing["pretrain"] - before[0],
                    "aggregate_s": tally.timing["aggregate"] - before[1],
                    "bytes_up": tally.bytes["uplink"] - before[2], "bytes_down": tally.bytes["downlink"] - before[3],
                }
                ctx.store.save(phase, record, global_weights)
                ctx.emit({"participant": "server", "phase": phase, "test_accuracy": record["accuracy"]})
            if r == 1:
                for name, acc in record["edges"].items():
                    tally.edges[name]["accuracy_before"] = acc
            tally.server["accuracy_averaged"] = record["accuracy"]
        assert global_weights is not None
        return global_weights, phases.update(ctx, tally, global_weights)


def run_strategy(ctx: RunContext) -> Outcome:
    return STRATEGIES.get(ctx.cfg["strategy"]).run(ctx)
