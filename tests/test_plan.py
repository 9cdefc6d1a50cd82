"""``ecavg plan``: the time model (pure) and its inputs (bytes, rates). The --link/--edge-cpu parsers it shares with
``deploy local`` (``ecavg.deploy.rates``) are tested in test_links.py."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from ecavg.cli import main
from ecavg.config import load_toml, resolve_config
from ecavg.errors import ConfigError
from ecavg.plan.model import (
    COMMUNICATION,
    COMPUTE,
    FLOWER_ROUTING_S,
    HELLO_EXTRA_S,
    MESSAGE_OVERHEAD_S,
    OVERHEAD,
    ComputeRates,
    EdgeInputs,
    Payloads,
    PlanInputs,
    batches,
    crossover_rate_bps,
    predict,
    pull_wait_seconds,
    round_summary,
)

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"

# -- the model ----------------------------------------------------------------------------------------------------

RATES = ComputeRates(edge_train_s=1e-3, server_train_s=2e-3, update_train_s=1e-3, eval_s=1e-4, average_s=0.5)
PAYLOADS = Payloads(whole=1_000_000, upload=1_000_000, delta_down=1_000_000)


def inputs(**changes) -> PlanInputs:
    edges = (EdgeInputs("edge-0", 1000, 100, data_bytes=2_000_000), EdgeInputs("edge-1", 1000, 100,
                                                                                data_bytes=2_000_000))
    base = PlanInputs(strategy="ecavg", edges=edges, rates=RATES, payloads=PAYLOADS, edge_epochs=2,
                      edge_batch_size=100, server_epochs=3, server_batch_size=100, server_train_samples=2000,
                      full_test_samples=200, eval_each_epoch=True, upload_data=True, message_overhead_s=3.0,
                      hello_overhead_s=5.0, train_start_s=1.0)
    return replace(base, **changes)


def by_phase(plan_inputs: PlanInputs) -> dict:
    return {ph.phase: ph for ph in predict(plan_inputs)}


def test_batches_drop_the_last_partial_batch_like_the_loader():
    assert (batches(1000, 100), batches(1050, 100), batches(100, 100), batches(30, 100), batches(0, 100)) == \
        (10, 10, 1, 1, 0)


def test_ecavg_phases_and_hand_computed_seconds():
    p = inputs(edges=tuple(replace(e, rate_bps=8e6) for e in inputs().edges))  # 1 MB/s each way
    phases = by_phase(p)
    assert list(phases) == ["hello", "pretrain", "aggregate", "finetune", "update"]
    pre = phases["pretrain"]
    # 2 epochs x 10 batches x 100 samples x 1 ms + 2 evaluations x 100 test samples x 0.1 ms
    assert pre.compute_s == pytest.approx(2.0 + 0.02)
    # 1 MB down, 1 MB weights + 2 MB data up, at 1 MB/s
    assert pre.transfer_s == pytest.approx(4.0)
    # Flower's overhead per message, plus the fresh process's first optimizer
    assert pre.overhead_s == pytest.approx(3.0 + 1.0)
    assert pre.total_s == pytest.approx(4.0 + 2.02 + 4.0)
    assert (pre.bytes_down, pre.bytes_up, pre.dominant) == (1_000_000, 3_000_000, COMMUNICATION)
    assert phases["hello"].total_s == 5.0 and phases["hello"].dominant == OVERHEAD
    assert phases["aggregate"].total_s == pytest.approx(0.5 + 200 * 1e-4)
    # 3 epochs x 20 batches x 100 x 2 ms + 3 evaluations of the full test set, + the server's first optimizer
    assert phases["finetune"].compute_s == pytest.approx(12.0 + 3 * 0.02)
    assert phases["finetune"].total_s == pytest.approx(12.0 + 3 * 0.02 + 1.0)
    assert phases["update"].compute_s == pytest.approx(100 * 1e-4) and phases["update"].transfer_s == 1.0
    assert phases["update"].overhead_s == 3.0  # replace: no training, no optimizer
    summary = round_summary(list(phases.values()))
    assert summary["total_s"] == pytest.approx(sum(ph.total_s for ph in phases.values()), abs=1e-3)


def test_a_phase_waits_for_the_slowest_edge_link_and_cpu():
    slow_link = inputs(edges=(EdgeInputs("edge-0", 1000, 100, rate_bps=80e6), EdgeInputs("edge-1", 1000, 100,
                                                                                         rate_bps=8e6)),
                       upload_data=False)
    pre = by_phase(slow_link)["pretrain"]
    assert pre.slowest == "edge-1" and pre.transfer_s == pytest.approx(2.0)
    assert pre.per_edge["edge-0"]["transfer_s"] == pytest.approx(0.2)
    slow_cpu = inputs(edges=(EdgeInputs("edge-0", 1000, 100), EdgeInputs("edge-1", 1000, 100, cpu_share=0.25)))
    pre = by_phase(slow_cpu)["pretrain"]
    assert pre.slowest == "edge-1" and pre.compute_s == pytest.approx(4 * 2.02)
    assert pre.per_edge["edge-0"]["compute_s"] == pytest.approx(2.02)
    # Its process start (CPU work, part of each message's overhead) is slowed by the share too; the rest of the
    # overhead (Flower's routing) is not.
    started = by_phase(replace(slow_cpu, edge_start_s=2.0))
    assert started["pretrain"].overhead_s == pytest.approx(3.0 + 1.0 + 2.0 * 3)  # message + train start + 3 x start
    assert started["hello"].overhead_s == pytest.approx(5.0 + 2.0 * 3)
    assert by_phase(replace(slow_cpu, edge_start_s=2.0, edges=(EdgeInputs("edge-0", 1000, 100),)))[
        "pretrain"].overhead_s == pytest.approx(4.0)
    # More samples on one edge: that edge is the straggler even on equal links.
    uneven = inputs(edges=(EdgeInputs("edge-0", 3000, 100), EdgeInputs("edge-1", 1000, 100)))
    assert by_phase(uneven)["pretrain"].slowest == "edge-0"


def test_flower_notices_a_payload_at_its_next_backoff_ask():
    # Flower asks for a message's objects at 0, 1, 3, 7, 15, 25, 35, 45 ... s (backoff 1 s doubling, capped at 10 s).
    assert [pull_wait_seconds(t) for t in (0.0, 0.5, 1.0, 2.0, 20.0, 25.0, 36.0)] == \
        pytest.approx([0.0, 0.5, 0.0, 1.0, 5.0, 0.0, 9.0])
    # 1 MB each way at 0.4 Mbit/s: 20 s per transfer, noticed 5 s late. The ServerApp waits for every reply; only a
    # warm ClientApp (already asking when a message arrives) waits for a download too.
    slow = inputs(edges=(EdgeInputs("edge-0", 1000, 100, rate_bps=4e5),), upload_data=False)
    cold, warm = by_phase(slow)["pretrain"], by_phase(replace(slow, warm_clientapps=True))["pretrain"]
    assert cold.transfer_s == warm.transfer_s == pytest.approx(40.0)
    assert cold.overhead_s == pytest.approx(3.0 + 1.0 + 5.0)
    assert warm.overhead_s == pytest.approx(3.0 + 1.0 + 5.0 + 5.0)
    # Unlimited links: nothing to wait for.
    assert by_phase(replace(inputs(), warm_clientapps=True))["pretrain"].overhead_s == pytest.approx(4.0)


def test_the_backoff_is_flowers():
    constant = pytest.importorskip("flwr.supercore.constant")
    from ecavg.plan.model import PULL_BACKOFF_CAP_S, PULL_INITIAL_BACKOFF_S

    assert (PULL_INITIAL_BACKOFF_S, PULL_BACKOFF_CAP_S) == (constant.PULL_INITIAL_BACKOFF, constant.PULL_BACKOFF_CAP)


def test_no_data_upload_without_server_training_data():
    pre = by_phase(inputs(upload_data=False, edges=tuple(replace(e, rate_bps=8e6) for e in inputs().edges)))
    assert pre["pretrain"].bytes_up == 1_000_000 and pre["pretrain"].transfer_s == pytest.approx(2.0)


def test_delta_downloads_use_the_delta_size_and_fedavg_rounds():
    p = inputs(strategy="fedavg", fedavg_rounds=3, upload_data=False, server_train_samples=0,
               payloads=Payloads(whole=1000, upload=300, delta_down=300, delta=True))
    phases = by_phase(p)
    assert list(phases) == ["hello", "round1", "round2", "round3", "update"]
    assert [phases[f"round{k}"].bytes_down for k in (1, 2, 3)] == [1000, 300, 300]
    assert phases["round1"].bytes_up == 300 and phases["update"].bytes_down == 300
    # Without shared_init the first download carries no weights.
    no_init = by_phase(replace(p, payloads=replace(p.payloads, first_down=0)))
    assert no_init["round1"].bytes_down == 0 and no_init["round2"].bytes_down == 300


def test_data_goes_first_when_the_server_trains_before_the_edges():
    central = by_phase(inputs(strategy="centralized"))
    assert list(central) == ["hello", "data", "centralized", "update"]
    assert central["data"].bytes_up == 2_000_000 and central["update"].bytes_down == 1_000_000
    warm = by_phase(inputs(warmup_epochs=1, warmup_samples=500))
    assert list(warm) == ["hello", "data", "warmup", "pretrain", "aggregate", "finetune", "update"]
    assert warm["pretrain"].bytes_up == 1_000_000  # the data already went up
    assert (warm["warmup"].overhead_s, warm["finetune"].overhead_s) == (1.0, 0.0)  # the server trained already
    assert list(by_phase(inputs(strategy="local", upload_data=False))) == ["hello", "pretrain"]
    assert "finetune" not in by_phase(inputs(server_train_samples=0))


def test_update_modes_add_edge_fine_tuning():
    replace_mode = by_phase(inputs())["update"].compute_s
    tuned = by_phase(inputs(update_mode="finetune", update_epochs=2, update_batch_size=100))["update"]
    finetune = tuned.compute_s
    assert tuned.overhead_s == 3.0 + 1.0
    # 2 epochs x 1000 samples x 1 ms + 1 evaluation between epochs + the kept model on its test and the full test
    assert finetune == pytest.approx(2.0 + 100 * 1e-4 + (100 + 200) * 1e-4)
    assert replace_mode == pytest.approx(100 * 1e-4)
    guarded = by_phase(inputs(update_mode="guarded", update_epochs=2, update_batch_size=100,
                              edges=tuple(replace(e, validation_samples=50) for e in inputs().edges)))
    assert guarded["update"].compute_s > 2 * 2.0


def test_crossover_rate_is_where_transfer_equals_compute():
    p = inputs()
    rate = crossover_rate_bps(p)
    at = replace(p, edges=tuple(replace(e, rate_bps=rate) for e in p.edges))
    summary = round_summary(predict(at))
    assert summary["communication_s"] == pytest.approx(summary["compute_s"], rel=1e-3)
    faster = replace(p, edges=tuple(replace(e, rate_bps=rate * 10) for e in p.edges))
    assert round_summary(predict(faster))["communication_s"] < summary["compute_s"]
    assert by_phase(faster)["finetune"].dominant == COMPUTE


def test_predict_refuses_unknown_strategies():
    with pytest.raises(ValueError, match="no time model"):
        predict(inputs(strategy="distill"))


# -- the inputs: real bytes, rates from a run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart():
    from ecavg.plan import inputs as plan_inputs_module

    cfg = resolve_config({**load_toml(QUICKSTART), "threads": 1})
    return cfg, plan_inputs_module.setup(cfg, None)


def test_payloads_are_the_encoded_sizes(quickstart):
    from ecavg.core.transfer import Transfer
    from ecavg.plan.inputs import payloads

    cfg, participants = quickstart
    fp32 = payloads(cfg, participants)
    weights = participants.server.new_model().state_dict()
    raw = sum(t.numel() * t.element_size() for t in weights.values())
    assert raw < fp32.whole < raw + 1000 and fp32.upload == fp32.whole and not fp32.delta
    int8 = payloads({**cfg, "transfer": {"codec": "int8", "delta": True, "deflate": False}}, participants)
    assert int8.delta and int8.whole < 0.3 * fp32.whole and int8.upload == int8.delta_down
    reference = dict(weights)
    assert int8.upload == len(Transfer("int8", True).encode(reference, base=reference))
    # Deflated sizes depend on the values: every transfer is planned at the initial weights' deflated size (a delta
    # of the weights from themselves is all zeros and would deflate to almost nothing).
    deflated = payloads({**cfg, "transfer": {"codec": "int8", "delta": True, "deflate": True}}, participants)
    assert deflated.whole == len(Transfer("int8", True, True).encode(reference)) < int8.whole
    assert deflated.upload == deflated.delta_down == deflated.whole


def test_data_upload_bytes_match_the_wire_format(quickstart):
    from ecavg.plan.inputs import data_upload_bytes

    cfg, participants = quickstart
    sizes = data_upload_bytes(cfg, participants)
    # mnist-sample: 4,000 training digits of 28x28 uint8, an int64 label and an int64 position each, plus headers
    assert len(sizes) == 2 and 0 < sum(sizes) - 4000 * (784 + 16) < 1000
    half = data_upload_bytes({**cfg, "server_data_fraction": 0.5}, participants)
    assert sum(half) == pytest.approx(sum(sizes) / 2, rel=0.01)
    # transfer.deflate deflates the upload too (digits are mostly background): planned at the exact deflated size.
    deflated = data_upload_bytes({**cfg, "transfer": {**cfg["transfer"], "deflate": True}}, participants)
    assert sum(deflated) < 0.5 * sum(sizes)


def test_the_aggregate_step_counts_the_forward_passes_of_recalibration_and_activation_matching(quickstart):
    from ecavg.plan.inputs import plan_inputs
    from ecavg.plan.model import ComputeRates

    cfg, participants = quickstart
    rates = ComputeRates(edge_train_s=1e-3, server_train_s=1e-3, update_train_s=1e-3, eval_s=1e-4)

    def forward(**top) -> int:
        return plan_inputs({**cfg, **top}, participants, rates, data_dir=None, links={},
                           cpu_shares={}).aggregate_forward_samples

    union = len(participants.union)
    assert forward() == 0
    # The MLP has no BatchNorm: recalibration runs nothing. Two edges: the reference and the other, once each.
    assert forward(bn_recalibration=True) == 0
    assert forward(aggregation="match_activations", matching={"samples": 1000}) == 2 * 1000
    assert forward(aggregation="match_activations", matching={"samples": 10 * union}) == 2 * union
    assert forward(aggregation="match") == 0


def fake_run(tmp_path: Path, cfg: dict, *, edge_rate: float = 4000.0, aggregate_s: float = 0.1) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": cfg, "data_dir": None}))
    (run / "results.json").write_text(json.dumps({
        "timing_s": {"aggregate": aggregate_s}, "edges": [{"test_samples": 500}, {"test_samples": 500}]}))
    lines = [{"participant": f"edge-{k}", "phase": "pretrain", "epoch": e, "seconds": 0.5,
              "samples_per_s": edge_rate * (1 + 0.01 * e)} for k in (0, 1) for e in (1, 2, 3)]
    lines += [{"participant": "server", "phase": "finetune", "epoch": 1, "samples_per_s": 2000.0},
              {"participant": "server", "phase": "aggregate", "test_accuracy": 0.9}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return run


def test_rates_from_run(tmp_path, quickstart):
    from ecavg.plan.inputs import rates_from_run

    cfg, _ = quickstart
    rates = rates_from_run(fake_run(tmp_path, cfg), cfg)
    assert rates.edge_train_s == pytest.approx(1 / (4000 * 1.02))  # the median epoch
    assert rates.server_train_s == pytest.approx(1 / 2000) and rates.update_train_s == rates.edge_train_s
    assert rates.eval_s == pytest.approx(0.1 / 1000)
    other = {**cfg, "model": {**cfg["model"], "hidden": 50}}
    with pytest.raises(ConfigError, match="another model"):
        rates_from_run(tmp_path / "run", other)
    with pytest.raises(ConfigError, match="dataset"):
        rates_from_run(tmp_path / "run", {**cfg, "data": {**cfg["data"], "dataset": "mnist"}})
    (tmp_path / "run" / "results.json").write_text("[]")
    with pytest.raises(ConfigError, match="not an ecavg run"):
        rates_from_run(tmp_path / "run", cfg)


@pytest.mark.slow  # times an edge process start in a subprocess (--edge-cpu): about 10 s
def test_plan_command_json_and_table(tmp_path, quickstart, capsys):
    cfg, _ = quickstart
    run = fake_run(tmp_path, cfg)
    assert main(["plan", "--config", str(QUICKSTART), "--set", "threads=1", "--from", str(run), "--json",
                 "--link", "all=10mbit", "--link", "edge-1=100kbit", "--edge-cpu", "edge-0=0.5"]) == 0
    plan = json.loads(capsys.readouterr().out)
    phases = {ph["phase"]: ph for ph in plan["phases"]}
    assert list(phases) == ["hello", "pretrain", "aggregate", "finetune", "update"]
    assert phases["pretrain"]["slowest"] == "edge-1" and phases["pretrain"]["dominant"] == COMMUNICATION
    assert phases["pretrain"]["bytes_up"] == plan["payloads"]["upload"] + plan["edges"][1]["data_bytes"]
    assert plan["edges"][0]["cpu_share"] == 0.5 and plan["edges"][1]["rate_bps"] == 1e5
    assert math.isclose(plan["summary"]["total_s"], sum(ph["total_s"] for ph in plan["phases"]), abs_tol=0.01)
    # Read from an embedded run with an edge below one core: the edge process start is timed here (the share
    # slows it), on top of the development machine's routing figure.
    assert "timed here" in plan["compute_source"]
    assert plan["message_overhead_s"] > FLOWER_ROUTING_S
    assert plan["hello_overhead_s"] == pytest.approx(plan["message_overhead_s"] + HELLO_EXTRA_S)
    # Without --edge-cpu nothing is timed: the development machine's figures.
    assert main(["plan", "--from", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["message_overhead_s"] == pytest.approx(MESSAGE_OVERHEAD_S)
    assert main(["plan", "--from", str(run), "--message-overhead", "2.5"]) == 0
    table = capsys.readouterr().out
    assert "pretrain" in table and "finetune" in table and "No --link given" in table
    assert "Flower overhead 2.5 s per message" in table
    assert main(["plan", "--from", str(run), "--message-overhead", "-1"]) == 2
    assert "--message-overhead" in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_measures_positive_rates_and_the_edge_start(quickstart):
    from ecavg.plan.inputs import calibrate

    cfg, participants = quickstart
    rates = calibrate(cfg, participants, seconds=0.2)
    assert 0 < rates.edge_train_s < 0.1 and 0 < rates.eval_s < rates.edge_train_s * 10
    assert rates.server_train_s == rates.edge_train_s  # same batch size and optimiser: measured once
    assert rates.edge_start_s is not None and 0.1 < rates.edge_start_s < 600
    assert rates.train_start_s is not None and 0 <= rates.train_start_s < 600


def test_plan_command_refuses_cpu_shares_without_one_thread(tmp_path, quickstart, capsys):
    assert main(["plan", "--config", str(QUICKSTART), "--set", "threads=2", "--edge-cpu", "edge-0=0.5"]) == 2
    assert "threads = 2" in capsys.readouterr().err
    assert main(["plan", "--config", str(QUICKSTART), "--link", "edge-7=1mbit"]) == 2
    assert "has 2 edges" in capsys.readouterr().err


def test_overheads_are_fitted_to_a_deployed_run(tmp_path, quickstart, capsys):
    """--from a deployed run: Flower's overheads are what its exchanges took beyond compute and transfers at that
    run's own links, and a plan of other links adds those, not the development machine's constants."""
    from ecavg.plan.inputs import Overheads, overheads_from_run, plan_inputs, rates_from_run

    cfg, participants = quickstart
    run = fake_run(tmp_path, cfg)
    rates = rates_from_run(run, cfg)
    assert overheads_from_run(run, rates, None) is None  # an embedded run has no exchanges
    links = {0: 10_000_000, 1: 1_000_000}
    bare = replace(plan_inputs(cfg, participants, rates, data_dir=None, links=links, cpu_shares={},
                               message_overhead_s=0.0), hello_overhead_s=0.0, train_start_s=0.0)
    overhead = {"hello": 9.0, "pretrain": 4.0 + 2.5, "update": 4.0}
    walls = {ph.phase: ph.total_s + overhead[ph.phase] for ph in predict(bare) if ph.phase in overhead}
    assert walls["pretrain"] > 10  # edge-1's 1 Mbit/s link: the fit must take the transfers off
    results = json.loads((run / "results.json").read_text())
    results["timing_s"]["finetune"] = by_phase(bare)["finetune"].total_s + 3.0  # the server's first optimizer
    results["deploy"] = {"phase_wall_s": walls, "links": {"edges": {
        "edge-0": {"rate_bps": 10_000_000}, "edge-1": {"rate_bps": 1_000_000}}}}
    (run / "results.json").write_text(json.dumps(results))
    fitted = overheads_from_run(run, rates, None)
    assert isinstance(fitted, Overheads)
    assert (fitted.message_s, fitted.hello_s, fitted.train_start_s, fitted.server_train_start_s) == pytest.approx(
        (4.0, 9.0, 2.5, 3.0))
    assert main(["plan", "--from", str(run), "--link", "all=2mbit", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["message_overhead_s"], plan["hello_overhead_s"], plan["train_start_s"],
            plan["server_train_start_s"]) == pytest.approx((4.0, 9.0, 2.5, 3.0))
    assert "fitted to that deployed run" in plan["compute_source"]
    # Several calibration runs: each figure's median over them.
    import shutil

    for k, extra in ((2, 2.0), (3, 4.0)):
        other = shutil.copytree(run, tmp_path / f"run{k}")
        results_k = json.loads((other / "results.json").read_text())
        results_k["deploy"]["phase_wall_s"] = {p: w + extra for p, w in walls.items()}
        (other / "results.json").write_text(json.dumps(results_k))
    assert main(["plan", "--from", str(run), "--from", str(tmp_path / "run2"), "--from", str(tmp_path / "run3"),
                 "--link", "all=2mbit", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["message_overhead_s"], plan["hello_overhead_s"]) == pytest.approx((6.0, 11.0))
    assert "those 3 deployed runs (median)" in plan["compute_source"]
    del results["deploy"]["phase_wall_s"]["update"]
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(ConfigError, match="does not train"):
        overheads_from_run(run, rates, None)


def test_overheads_of_a_warm_clientapp_run_leave_its_download_waits_to_the_model(tmp_path, quickstart):
    """A warm ClientApp waits for Flower to notice each download behind its link; fitting such a run as if its
    ClientApps were per-message would count those waits as message overhead."""
    from ecavg.plan.inputs import overheads_from_run, plan_inputs, rates_from_run

    cfg, participants = quickstart
    run = fake_run(tmp_path, cfg)
    rates = rates_from_run(run, cfg)
    links = {0: 1_000_000, 1: 1_000_000}

    def bare(warm):
        return replace(plan_inputs(cfg, participants, rates, data_dir=None, links=links, cpu_shares={},
                                   message_overhead_s=0.0, warm_clientapps=warm),
                       hello_overhead_s=0.0, train_start_s=0.0)

    cold, warm = by_phase(bare(False)), by_phase(bare(True))
    assert warm["update"].total_s > cold["update"].total_s + 1  # the download's wait: what this test is about
    overhead = {"hello": 9.0, "pretrain": 4.0 + 2.5, "update": 4.0}
    results = json.loads((run / "results.json").read_text())
    results["deploy"] = {"clientapp": "warm",
                         "phase_wall_s": {p: warm[p].total_s + extra for p, extra in overhead.items()},
                         "links": {"edges": {"edge-0": {"rate_bps": 1_000_000}, "edge-1": {"rate_bps": 1_000_000}}}}
    (run / "results.json").write_text(json.dumps(results))
    fitted = overheads_from_run(run, rates, None)
    assert (fitted.message_s, fitted.hello_s, fitted.train_start_s) == pytest.approx((4.0, 9.0, 2.5))
