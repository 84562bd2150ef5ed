"""`python -m inflora_dist.bench scale` end to end on a tiny ViT (real gloo processes), and its projection model.

No assertion on the seconds: timings on a shared test machine are not a test. Bytes and collectives are exact.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

from inflora_dist.bench.__main__ import main
from inflora_dist.bench.scale import add_arguments, eigh_seconds, gate_cost, llama2_7b_long, measured_rate, project

TINY = ["--hidden", "64", "--layers", "1", "--image-size", "32", "--batch-size", "4", "--batches", "1",
        "--batched-dim", "32", "--batched-count", "3"]  # fmt: skip


def test_scale_benchmark_measures_traffic_and_prints_json_last(capsys):
    figures = main(["scale", *TINY, "--worlds", "1", "2", "--dims", "32", "64", "--bucket-mib", "0.01",
                    "--precision-batches", "40", "--projected-dim", "96", "--device", "cpu", "--json"])  # fmt: skip
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(figures))
    assert [r["world"] for r in printed["worlds"]] == [1, 2]
    d = 64  # one k/v group of d = 64: its triangle and count against the full matrix and count
    for r in printed["worlds"]:
        assert r["full_reduce_bytes"] == (d * d + 1) * 8 and r["full_collectives"] == 2
        assert r["bucketed_reduce_bytes"] == (d * (d + 1) // 2 + 1) * 8
        assert r["bucketed_collectives"] == math.ceil(r["bucketed_reduce_bytes"] / (0.01 * 2**20))
    assert printed["reduce_bytes_ratio"] < 0.51
    assert printed["collectives_per_pass"] == printed["collectives_expected"] == 2
    assert [r["d"] for r in printed["decompositions"]] == [32, 64]
    assert printed["precision"]["fp32_gemm_fp64_sum"] < printed["precision"]["fp32_all"]
    names = [p["workload"].split(",")[0] for p in printed["projection"]]
    assert names == ["ViT-B/16", "ViT-B/16", "LLaMA-2-7B", "LLaMA-2-7B"]
    # The second ViT row takes the measured H200 step's throughput: 64 images of 197 tokens in 0.1249 s.
    assert printed["projection"][1]["tflops_per_gpu"] == pytest.approx(4 * 86e6 * 197 * 64 / 0.1249 / 1e12)
    # The eigh path against the SVD path it replaced, side by side on one matrix.
    assert printed["d"] == 96 and set(printed["projected_decomp_s"]) == {"svd", "eigh"}
    assert printed["projected_decomp_angle"] <= 1e-6
    assert printed["projected_decomp_k"]["svd"] == printed["projected_decomp_k"]["eigh"]
    # Batched decompositions against one at a time: the same results (on the host, bit for bit).
    (batched,) = printed["batched"]
    assert (batched["d"], batched["count"], batched["max_difference"]) == (32, 3, 0.0)
    ratio = printed["projected_decomp_s"]["eigh"] / printed["projected_decomp_s"]["svd"]
    assert math.isclose(printed["projected_decomp_ratio"], ratio)


def test_projection_by_hand():
    """Two GPUs, one group of d = 100, passes capped at 4,000 tokens: every term of the model computed by hand."""
    args = argparse.Namespace(nodes=1, gpus_per_node=2, tflops=100.0, mfu=0.5, bus_gbps=10.0,
                              decomp_seconds=[(64, 0.01), (128, 0.02)], batched_ratio=None)  # fmt: skip
    workload = {"name": "toy", "params": 1e9, "samples_per_task": 1000, "tokens_per_sample": 10, "epochs": 3,
                "dims": {"g": 100}, "covariance_max_tokens": 4000}  # fmt: skip
    p = project(workload, args)
    rate = 2 * 100e12 * 0.5
    assert math.isclose(p["train_s"], 3 * 1e4 * 4e9 / rate)
    assert math.isclose(p["passes_s"], 2 * 4000 * (2e9 + 2 * 100**2) / rate)
    assert p["reduce_bytes_per_pass"] == (5050 + 1) * 8
    assert math.isclose(p["reduce_s"], 2 * 5051 * 8 * 0.5 / 10e9)
    assert math.isclose(p["decompositions_s"], 2 * 0.02)  # two eigh of d = 100: the 128 point's time
    overhead = p["passes_s"] + p["reduce_s"] + p["decompositions_s"]
    assert math.isclose(p["overhead_share"], overhead / p["train_s"])
    # A measured step's throughput replaces tflops x mfu: 50 samples of 10 tokens in 0.5 s per GPU.
    measured = project(workload, args, measured_rate(workload, 50, 0.5))
    assert math.isclose(measured["train_s"], 3 * 1000 / (2 * 50) * 0.5)


def test_projection_stacks_a_ranks_groups_of_one_size():
    """Five groups of d = 100 on 2 GPUs: the busier rank's three take one stacked call per round, at the
    batched ratio; without a measured ratio no gain is assumed; a lone group keeps the single-call time."""
    args = argparse.Namespace(nodes=1, gpus_per_node=2, tflops=100.0, mfu=0.5, bus_gbps=10.0,
                              decomp_seconds=[(128, 0.02)], batched_ratio=None)  # fmt: skip
    workload = {"name": "toy", "params": 1e9, "samples_per_task": 10, "tokens_per_sample": 10, "epochs": 1,
                "dims": {f"g{i}": 100 for i in range(5)}}  # fmt: skip
    assert math.isclose(project(workload, args)["decompositions_s"], 2 * 3 * 0.02)
    args.batched_ratio = 0.25
    assert math.isclose(project(workload, args)["decompositions_s"], 2 * 3 * 0.02 * 0.25)
    args.gpus_per_node = 5
    assert math.isclose(project(workload, args)["decompositions_s"], 2 * 0.02)


def test_eigh_seconds_from_measured_points():
    """The smallest measured size at or above d; beyond the largest, d^3 scaling."""
    points = [(1024, 0.09), (4096, 0.18)]
    assert eigh_seconds(768, points) == 0.09
    assert eigh_seconds(4096, points) == 0.18
    assert math.isclose(eigh_seconds(8192, points), 0.18 * 8)


def test_gainlora_gate_cost_counts_its_steps_pass_and_decompositions():
    """The gates' per-step cost is the gate flops + one gradient all-reduce + the projection; the gate pass is
    free when InfLoRA's update pass reads every token, a forward pass of the task's data when that is capped."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    capped, full = (gate_cost(llama2_7b_long(256, covariance_max_tokens=cap), args) for cap in (65536, None))
    assert full["gate_pass_s"] == 0.0 and full["gate_pass_shared"] and not capped["gate_pass_shared"]
    n, rate = 8, 8 * 989e12 * 0.4
    assert capped["gate_pass_s"] == pytest.approx(1000 * 256 * 2 * 6.74e9 / rate)
    allreduce = 2 * (2 * 4096 * 50 + 4096) * 4 * (n - 1) / n / 100e9
    assert capped["gate_step_s"] > allreduce and capped["gate_step_s"] < 1e-3  # sub-millisecond per step
    assert capped["steps_per_task"] == 32 and capped["gate_share"] > full["gate_share"]
