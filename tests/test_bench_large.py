"""`python -m inflora_dist.bench large`: the covariance allowance it checks before any work. The 7B runs themselves
are benchmarks (docs/scaling.md), not tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from inflora_dist.bench.__main__ import main
from inflora_dist.bench.large import covariance_plans, group_dims, time_host_linear

QV_ALL = Path(__file__).resolve().parent.parent / "configs" / "scale" / "llama2_7b_qv_all.yaml"


def test_the_qv_config_splits_its_pass_within_two_gib_per_rank():
    """q and v of all 32 blocks: 32 groups of d = 4096; the 2 GiB cap gives 4 passes of 8 groups at world 2."""
    dims = group_dims(QV_ALL)
    assert len(dims) == 32 and set(dims.values()) == {4096}
    plan = covariance_plans(QV_ALL, dims, [2], max_gib=2.0)[2]
    assert [len(p) for p in plan["passes"]] == [8, 8, 8, 8] and plan["peak_bytes"] <= 2 * 2**30


def test_an_uncapped_config_over_the_allowance_is_refused_before_any_work(tmp_path):
    """Without inflora.covariance_max_bytes_per_rank the 32 sums and the kept covariances need 6.4 GiB per rank:
    refused in one line naming the config, the need and the key that splits the pass; nothing is written."""
    cfg = OmegaConf.load(QV_ALL)
    del cfg.inflora["covariance_max_bytes_per_rank"]
    uncapped = tmp_path / "uncapped.yaml"
    OmegaConf.save(cfg, uncapped)
    keep = tmp_path / "runs"
    with pytest.raises(
        ValueError,
        match=r"uncapped.yaml: its covariance plan needs 6,4\d\d MiB per rank at world 2 "
        r"\(32 input groups in 1 pass\(es\)\), over the 2 GiB allowed .*covariance_max_bytes_per_rank",
    ):
        main(["large", "--config", str(uncapped), "--worlds", "2", "--keep", str(keep)])  # fmt: skip
    assert not keep.exists()


def test_host_linear_figures_side_by_side():
    """bf16 GEMM and float32 products timed on the same layer shape, forward and input gradient, at toy size."""
    figures = time_host_linear(32, 64, tokens=4)
    assert (figures["d_in"], figures["d_out"], figures["tokens"]) == (32, 64, 4)
    kinds = ("native_forward", "native_input_grad", "float32_products_forward", "float32_products_input_grad")
    assert all(figures[f"{k}_gflops"] > 0 for k in kinds)
