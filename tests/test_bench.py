"""Smoke tests for the benchmarks (bench/): the quick aggregation and transfer code on tiny inputs, so it cannot rot.

Nothing here asserts a speed: timings on a shared machine are noise. The checks are that each piece runs, returns
well-formed results, and computes the right thing (averages, codecs, results file).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import aggregation, common, transfer
from bench import run as bench_run
from ecavg.core.transfer import EdgeLinks


def test_perturbed_stream_yields_offsets_and_restores_base():
    base = {"w": torch.zeros(3), "n": torch.tensor(5)}
    seen = [(sd["w"][0].item(), sd["n"].item(), w, name) for sd, w, name in aggregation.perturbed_stream(base, 4)]
    assert [s[0] for s in seen] == [0.0, 1.0, 0.0, 1.0]
    assert [s[1] for s in seen] == [5, 6, 5, 6]
    assert [s[3] for s in seen] == ["edge-0", "edge-1", "edge-2", "edge-3"]
    assert base["w"].tolist() == [0.0, 0.0, 0.0] and base["n"].item() == 5


@pytest.mark.parametrize("method", sorted(aggregation.METHODS))
def test_every_aggregation_method_gives_the_exact_weighted_average(method):
    base = {"a": torch.randn(4, 3), "b": torch.randn(7), "steps": torch.tensor(10)}
    reference = {k: v.clone() for k, v in base.items()}
    result, seconds = aggregation.METHODS[method](aggregation.perturbed_stream(base, 5))
    assert seconds >= 0
    assert aggregation.max_error(result, reference, 5) < 1e-5


def test_aggregation_worker_in_process_reports_floor_and_memory():
    timed = aggregation.worker(3, model=aggregation.TINY_MODEL, num_classes=10, bandwidth_bytes=4 * 2**20)
    assert timed["floor_bytes"] == 4 * timed["model_bytes"]
    for m in timed["methods"].values():
        assert m["seconds"] > 0 and m["fraction_of_floor"] > 0 and m["max_abs_error"] < 1e-5
    memory = aggregation.worker(3, model=aggregation.TINY_MODEL, num_classes=10, mode="memory")
    for m in memory["methods"].values():
        assert m["peak_models"] is None or m["peak_models"] >= 0


@pytest.mark.slow
def test_aggregation_run_uses_fresh_processes_per_k(capsys):
    result = aggregation.run((2,), model=aggregation.TINY_MODEL, num_classes=10, bandwidth_bytes=4 * 2**20)
    entry = result["per_k"][0]
    assert entry["k"] == 2 and entry["model"] == aggregation.TINY_MODEL
    assert set(entry["methods"]) == set(aggregation.METHODS)
    assert "peak_models" in entry["methods"]["streaming_averager"]
    assert "Aggregation" in capsys.readouterr().out


@pytest.mark.parametrize("label", sorted(transfer.VARIANTS))
def test_bench_uploads_go_through_the_products_transfer(label):
    torch.manual_seed(0)
    start = {"conv.weight": torch.randn(8, 4, 3, 3), "bn.running_var": torch.rand(8) + 0.5,
             "bn.num_batches_tracked": torch.tensor(3)}
    trained = {k: (v + 0.05 * torch.randn_like(v)) if v.is_floating_point() else v + 1 for k, v in start.items()}
    variant = transfer.VARIANTS[label]
    decoded, nbytes = EdgeLinks(variant).upload("edge-0", trained, received=start)
    # The bytes counted are the product's payload for this upload, nothing re-implemented in bench/.
    assert nbytes == len(variant.encode(trained, base=start if variant.delta else None))
    assert decoded["bn.num_batches_tracked"].item() == 4
    error = transfer.relative_error(trained, decoded)
    assert error == 0 if variant.codec_name == "fp32" else 0 < error < 2e-2


def test_bench_variants_cover_codecs_delta_and_deflate():
    assert {"fp32", "fp16", "bf16", "int8", "int8+delta", "int8+deflate"} <= set(transfer.VARIANTS)
    state = {"w": torch.randn(256, 256)}
    fp32 = EdgeLinks(transfer.VARIANTS["fp32"]).upload("edge", state, received=state)[1]
    int8 = EdgeLinks(transfer.VARIANTS["int8"]).upload("edge", state, received=state)[1]
    assert 0.24 < int8 / fp32 < 0.3


def test_transfer_wire_and_serialization_sections_on_small_models(capsys):
    models = (("mlp", "mnist", 10, 1, 28), ("cnn", "cifar10", 10, 3, 32))
    wire = transfer.wire_bytes(models, codecs=("fp32", "fp16", "int8"))
    assert wire["mlp"]["ratio_to_fp32"]["fp32"] == 1.0
    assert 0.45 < wire["cnn"]["ratio_to_fp32"]["fp16"] < 0.55
    speed = transfer.serialization_speed("cnn", 10, repeats=1)
    assert all(v > 0 for v in speed["gb_per_s"].values())
    assert math.isfinite(speed["validated_decode_over_raw_load"])
    assert "Serialization" in capsys.readouterr().out


def test_finite_checks_agree():
    good = {"a": torch.randn(100), "b": torch.randn(3, 3)}
    assert transfer._aminmax_check(good) and transfer._isfinite_check(good)
    for bad_value in (math.nan, math.inf, -math.inf):
        bad = {**good, "b": torch.tensor([[0.0, bad_value]])}
        assert not transfer._aminmax_check(bad) and not transfer._isfinite_check(bad)


def test_codec_accuracy_on_the_shipped_mnist_sample(capsys):
    config = {
        "strategy": "ecavg", "seed": 0, "eval_each_epoch": False,
        "data": {"dataset": "mnist-sample", "partition": "iid", "num_edges": 2, "train_fraction": 0.25},
        "model": {"name": "mlp", "hidden": 32},
        "edge": {"epochs": 1, "batch_size": 64, "lr": 0.05},
        "server": {"epochs": 1, "batch_size": 64, "lr": 0.05},
    }
    result = transfer.codec_accuracy(config, codecs=("fp32", "int8+delta"), test_size=300)
    assert result["test_size"] == 300
    fp32, int8 = result["codecs"]["fp32"], result["codecs"]["int8+delta"]
    assert fp32["delta_accuracy_after_update"] == 0
    assert 0.2 < int8["bytes_ratio_to_fp32"] < 0.35
    assert 0 <= int8["accuracy_edges_after_update"] <= 1
    assert "Codecs on a short ECAvg run" in capsys.readouterr().out


def test_results_file_merges_sections(tmp_path):
    path = tmp_path / "latest.json"
    common.write_results({"aggregation": {"x": 1}}, path=path, command=["bench/run.py"])
    common.write_results({"transfer": {"y": 2}}, path=path, command=["bench/run.py", "--quick"])
    document = json.loads(path.read_text())
    assert document["schema"] == common.SCHEMA_VERSION
    assert document["sections"]["aggregation"]["x"] == 1
    assert document["sections"]["transfer"]["command"] == ["bench/run.py", "--quick"]
    assert "measured_at" in document["sections"]["aggregation"]
    # Sections merged from different runs may come from different machines: each names its own.
    assert document["sections"]["aggregation"]["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_section_selection():
    assert bench_run.selected_sections(bench_run.parse_args(["--quick"])) == list(bench_run.DEFAULT_SECTIONS)
    assert "experiments" in bench_run.selected_sections(bench_run.parse_args([]))
    assert bench_run.selected_sections(bench_run.parse_args(["--e2e"])) == ["e2e"]
    assert bench_run.selected_sections(bench_run.parse_args(["--sections", "aggregation"])) == ["aggregation"]
    with pytest.raises(SystemExit):
        bench_run.selected_sections(bench_run.parse_args(["--sections", "nope"]))


def test_machine_probes_return_positive_rates():
    assert common.sgemm_peak_gflops(sizes=(128,), repeats=2) > 0
    assert common.copy_bandwidth_gbs(nbytes=2**20, repeats=2) > 0
    assert common.rss_bytes() > 0 and common.peak_rss_bytes() >= common.rss_bytes() // 2


def test_encode_direct_is_valid_safetensors_for_every_dtype():
    from safetensors.torch import load

    from bench.proposals import encode_direct
    from ecavg.core.serialization import decode_metadata

    state = {
        "w": torch.randn(5, 3), "h": torch.randn(4).half(), "b": torch.randn(2, 2).bfloat16(),
        "d": torch.randn(3).double(), "steps": torch.tensor(7), "mask": torch.tensor([True, False, True]),
        "q": torch.randint(-100, 100, (6,), dtype=torch.int8), "empty": torch.zeros(0, 4),
    }
    payload = encode_direct(state, {"codec": "fp32"})
    decoded = load(payload)
    assert set(decoded) == set(state)
    for key, tensor in state.items():
        assert decoded[key].dtype == tensor.dtype and torch.equal(decoded[key], tensor), key
    assert decode_metadata(payload) == {"codec": "fp32"}


def test_all_finite_aminmax_names_the_first_bad_tensor():
    from bench.proposals import all_finite_aminmax

    state = {"a": torch.randn(3), "n": torch.tensor(1), "b": torch.tensor([1.0, math.nan]), "c": torch.zeros(0)}
    assert all_finite_aminmax(state) == "b"
    assert all_finite_aminmax({"a": torch.randn(3), "h": torch.tensor([-math.inf]).half()}) == "h"
    assert all_finite_aminmax({"a": torch.randn(3)}) is None


def test_plain_convs_round_trip_keeps_state_dict_and_outputs():
    # SmallMapConv2d itself is tested in tests/test_small_map.py; the benchmarks' baselines swap it back.
    from bench.proposals import SmallMapConv2d, use_plain_convs, use_small_map_convs
    from ecavg.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=3, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    keys = list(model.state_dict())
    assert use_plain_convs(model) == 20
    assert not any(isinstance(m, SmallMapConv2d) for m in model.modules())
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-4)
    assert use_small_map_convs(model) == 20


@pytest.mark.slow
def test_scale_measures_one_run_in_a_subprocess(tmp_path):
    from bench import scale

    row = scale.measure(3, tmp_path, tmp_path, dataset="mnist-sample")
    assert row["exit_code"] == 0, row.get("error")
    assert row["peak_rss_bytes"] > 50 * 2**20 and row["seconds"] > 0
    # The default run checkpoints the shared init, a running sum (released), the average and the fine-tune.
    assert 1 <= row["checkpoint_models"] <= row["checkpoint_peak_models"] <= 3.5
    assert scale.disk_bytes(tmp_path / "nothing-here") == 0


def test_the_noop_floor_app_imports_flower_only_and_its_rows_subtract_the_floor():
    """The floor must be Flower's own cost: a ClientApp process of the no-op app imports neither torch nor ecavg."""
    import subprocess
    import sys

    pytest.importorskip("flwr")
    check = ("import sys, bench.noop_app.client as c; "
             "assert c.client_app is not None; "
             "print(sorted(m for m in ('torch', 'ecavg') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True,
                         cwd=common.REPO_ROOT).stdout.strip()
    assert out == "[]"
    from bench import deploy_overhead

    rows = deploy_overhead.phase_rows(
        {"phase_wall_s": {"hello": 10.0, "pretrain": 12.0}}, {"timing_s": {"pretrain": 2.0, "init": 1.0}},
        {"per-message": {"first_round_s": 8.0, "median_round_s": 5.0},
         "warm": {"first_round_s": 3.0, "median_round_s": 3.5}})
    assert rows[0] == {"phase": "hello", "deployed_s": 10.0, "embedded_s": 0.0, "deployed_minus_embedded_s": 10.0,
                       "floor_per_message_s": 8.0, "excess_over_floor_per_message_s": 2.0, "floor_warm_s": 3.0,
                       "excess_over_floor_warm_s": 7.0}
    assert rows[1]["deployed_minus_embedded_s"] == 10.0 and rows[1]["excess_over_floor_warm_s"] == 6.5
    assert "deploy-overhead" in bench_run.SECTIONS


def test_time_to_accuracy_keeps_the_tasks_an_earlier_run_measured():
    """Tasks are measured one at a time (hours each): a run of one task keeps the other's figures, stamped."""
    from bench import time_to_accuracy

    def body(task, seconds):
        return {"configs": {task: f"configs/fast/{task}.toml"}, "summary": {task: {"ecavg_seconds": seconds}},
                "runs": [{"task": task, "strategy": "ecavg", "seconds": seconds}]}

    earlier = {**body("cifar10_mobilenetv2", 700.0), "measured_at": "then", "machine": {"cpu": "A"}}
    earlier["runs"].append({"task": "cifar100_resnet50", "strategy": "ecavg", "seconds": 1.0})  # replaced below
    merged = time_to_accuracy.keep_other_tasks(body("cifar100_resnet50", 2000.0), earlier)
    assert set(merged["summary"]) == set(merged["configs"]) == {"cifar10_mobilenetv2", "cifar100_resnet50"}
    assert merged["summary"]["cifar100_resnet50"]["ecavg_seconds"] == 2000.0
    assert [(r["task"], r["seconds"], r.get("measured_at")) for r in merged["runs"]] == [
        ("cifar10_mobilenetv2", 700.0, "then"), ("cifar100_resnet50", 2000.0, None)]
    assert merged["runs"][0]["machine"] == {"cpu": "A"}
    assert time_to_accuracy.keep_other_tasks(body("cifar10_mobilenetv2", 1.0), None)["runs"][0]["seconds"] == 1.0


@pytest.mark.slow
def test_time_to_accuracy_times_the_fast_config_and_its_centralized_baseline(tmp_path, monkeypatch):
    """Both runs in fresh processes, judged by their worst edge; kept where --keep-runs says."""
    from bench import time_to_accuracy

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "cifar10_mobilenetv2.toml").write_text(
        'eval_each_epoch = false\nthreads = 1\n[data]\ndataset = "mnist-sample"\ntest_augment = "flip"\n'
        '[model]\nname = "mlp"\nhidden = 16\n[edge]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n'
        '[server]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n')
    # A target every edge reaches and one none does: "reached" follows the worst edge.
    monkeypatch.setitem(time_to_accuracy.TARGETS, "cifar10_mobilenetv2", (0.0, 3600))
    body = time_to_accuracy.run(tmp_path, keep_runs=tmp_path / "kept", config_dir=configs)
    rows = {r["strategy"]: r for r in body["runs"]}
    assert set(rows) == {"ecavg", "centralized"}
    for strategy, row in rows.items():
        assert row["exit_code"] == 0, row.get("error")
        assert row["reached"] and row["within_goal"] and row["seconds_to_target"] == row["seconds"] > 0
        assert row["worst_edge_accuracy_after"] == min(row["edges_accuracy_after"])
        assert row["server_samples_per_s"] > 0
        assert row["machine"]["torch"] == torch.__version__ and row["measured_at"]
        assert (tmp_path / "kept" / "cifar10_mobilenetv2" / "fast" / f"strategy={strategy}" / "results.json").exists()
    assert rows["centralized"]["timing_s"]["pretrain"] == 0
    summary = body["summary"]["cifar10_mobilenetv2"]
    assert summary["ecavg_over_centralized_seconds"] == pytest.approx(rows["ecavg"]["seconds"] /
                                                                      rows["centralized"]["seconds"])
    with pytest.raises(SystemExit, match="already exists"):
        time_to_accuracy.run(tmp_path, keep_runs=tmp_path / "kept", config_dir=configs)
    results = json.loads((tmp_path / "kept/cifar10_mobilenetv2/fast/strategy=ecavg/results.json").read_text())
    worst = rows["ecavg"]["worst_edge_accuracy_after"]
    missed = time_to_accuracy.judge(results, 10.0, worst + 1e-6, 3600)
    assert missed["reached"] is False and missed["seconds_to_target"] is None and missed["within_goal"] is False
    slow = time_to_accuracy.judge(results, 10.0, worst, 5)
    assert slow["reached"] and slow["seconds_to_target"] == 10.0 and slow["within_goal"] is False


def test_codec_trained_scores_a_runs_model_under_each_codec(tmp_path, capsys):
    from bench import codec_trained
    from ecavg.core.codecs import CODECS
    from ecavg.experiment import run_experiment

    config = {"strategy": "ecavg", "threads": 1, "data": {"dataset": "mnist-sample", "train_fraction": 0.25},
              "model": {"name": "mlp", "hidden": 32}, "edge": {"epochs": 1}, "server": {"epochs": 1}}
    results = run_experiment(config, output_dir=tmp_path / "run")
    rows = {row["codec"]: row for row in codec_trained.measure(tmp_path / "run", None, 1)}
    assert list(rows) == list(CODECS)
    # fp32 is the run's own fine-tuned model, scored as results.json scored it.
    assert rows["fp32"]["accuracy"] == results["server"]["accuracy_finetuned"]
    assert rows["fp32"]["change_pp"] == 0 and rows["fp32"]["of_fp32"] == 1
    assert rows["int8"]["bytes"] < rows["fp16"]["bytes"] < rows["fp32"]["bytes"]
    assert all(abs(row["change_pp"]) < 2 for row in rows.values())  # a 32-unit MLP survives 8 bits
    assert codec_trained.main([str(tmp_path / "run"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [row["codec"] for row in printed[str(tmp_path / "run")]] == list(CODECS)
    assert codec_trained.main([str(tmp_path / "nothing")]) == 2
    assert "no server.safetensors" in capsys.readouterr().err
    (tmp_path / "run" / "server.safetensors").write_bytes(b"not safetensors")
    assert codec_trained.main([str(tmp_path / "run")]) == 2
    assert "server.safetensors" in capsys.readouterr().err.splitlines()[-1]
