"""spannorm bench: one real case per implementation (seconds), the ratio report, bad input."""

import pytest

from spannorm.bench import Case, ratios, run_case
from spannorm.cli import main


@pytest.mark.parametrize("impl", ["spannorm", "hf-llama"])
def test_one_case_runs(impl):
    row = run_case(Case(impl, "pre", depth=1, dtype="bf16", reps=1, warmup=0))
    assert row["tokens_per_s"] > 0 and row["step_s"] > 0 and row["peak_mem_mb"] > 0
    assert {"impl", "scheme", "depth", "dtype", "tokens_per_s", "peak_mem_mb"} <= set(row)


def test_hf_reference_has_the_same_size_as_pre():
    ours = run_case(Case("spannorm", "pre", depth=2, dtype="fp32", reps=1, warmup=0))
    theirs = run_case(Case("hf-llama", "pre", depth=2, dtype="fp32", reps=1, warmup=0))
    assert ours["n_params"] == theirs["n_params"]


def test_ratios_and_depth_fit():
    def row(impl, scheme, depth, dtype, step, mem=100.0):
        return {"impl": impl, "scheme": scheme, "depth": depth, "dtype": dtype, "step_s": step,
                "tokens_per_s": 2048 / step, "peak_mem_mb": mem}

    rows = [row("spannorm", "pre", L, "fp32", 0.01 + 0.002 * L) for L in (4, 8, 16, 32)]
    rows += [row("spannorm", "span", 8, "fp32", 0.0286, 103.0), row("hf-llama", "pre", 8, "fp32", 0.052)]
    lines = ratios({"rows": rows})
    assert "fp32: span/pre step time 1.100x, peak memory 1.030x" in lines
    assert "fp32: spannorm pre / HF Llama tokens/s 2.000x" in lines
    assert "fp32: spannorm pre step time = 10.0 ms + 2.00 ms × L (R² 1.0000)" in lines


def test_bench_bad_input(capsys):
    assert main(["bench", "--dtypes", "fp16"]) == 2
    assert "--dtypes 'fp16' is invalid: expected fp32 and/or bf16" in capsys.readouterr().err
    assert main(["bench", "--schemes", "nope"]) == 2
    assert "--schemes='nope' is invalid" in capsys.readouterr().err


def test_moe_case_and_its_dense_equivalent():
    from spannorm.bench import moe_cases

    moe = run_case(Case("spannorm-moe", "span", depth=1, dtype="bf16", reps=1, warmup=0))
    dense = run_case(Case("spannorm-moe-dense", "span", depth=1, dtype="bf16", reps=1, warmup=0))
    assert moe["step_s"] > 0 and moe["n_params"] > dense["n_params"]
    # same active parameters, up to the router (8 × d_model)
    assert moe["n_active_params"] - dense["n_active_params"] == 8 * 256
    assert dense["n_active_params"] == dense["n_params"]
    todo = moe_cases(["fp32"], rounds=2)
    assert [c.impl for c in todo] == ["spannorm-moe-dense", "spannorm-moe"] * 2


def test_moe_ratio_uses_medians():
    from spannorm.bench import moe_ratios

    rows = [{"impl": "spannorm-moe", "dtype": "fp32", "step_s": s} for s in (0.3, 0.9, 0.33)]
    rows += [{"impl": "spannorm-moe-dense", "dtype": "fp32", "step_s": s} for s in (0.2, 0.22, 0.1)]
    assert moe_ratios({"rows": rows}) == ["fp32: MoE (8 experts, top-2) / dense with the same active parameters: "
                                          "step time 1.650x (330 ms vs 200 ms, median of 3 rounds)"]
