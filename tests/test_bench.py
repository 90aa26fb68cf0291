"""spannorm bench: one real case per implementation (seconds), the ratio report, bad input."""

import pytest

from spannorm.bench import STANDARD, Case, cases, peak_memory, ratios, time_group
from spannorm.cli import main


def test_a_group_is_timed_together_and_hf_has_the_same_size_as_pre():
    group = [
        Case("spannorm", "pre", 1, "bf16"),
        Case("hf-llama", "pre", 1, "bf16"),
        Case("spannorm", "span", 1, "bf16"),
    ]
    rows = time_group(group, reps=1, warmup=0)
    assert [(r["impl"], r["scheme"]) for r in rows] == [(c.impl, c.scheme) for c in group]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0
        assert {"impl", "scheme", "depth", "dtype", "compile", "tokens_per_s", "n_params"} <= set(r)
    assert rows[0]["n_params"] == rows[1]["n_params"]
    # HF Llama keeps more activations for the backward than PreNorm. SpanNorm's default (model.span.scale=norm)
    # keeps PreNorm's plus what its branch normalization saves: the FFN output in fp32 (autocast runs
    # rms_norm in fp32) and its (B, T, 1) inverse RMS, per block (span.scale=init or multiplier: none)
    assert 0 < rows[0]["saved_mb"] < rows[1]["saved_mb"]
    B, T, d = STANDARD["batch_size"], STANDARD["seq_len"], STANDARD["d_model"]
    assert rows[2]["saved_mb"] - rows[0]["saved_mb"] == pytest.approx((B * T * d * 4 + B * T * 4) / 2**20, rel=1e-6)


def test_peak_memory_is_positive():
    assert peak_memory(Case("spannorm", "pre", 1, "fp32")) > 0


def test_case_list():
    got = cases(["pre", "span", "post"], [4, 8], ["bf16"], with_hf=True, compile=True)
    assert [(c.impl, c.scheme, c.depth, c.compile, c.group) for c in got] == [
        ("spannorm", "pre", 4, False, "main"),
        ("spannorm", "span", 4, False, "main"),
        ("hf-llama", "pre", 4, False, "main"),
        ("spannorm", "pre", 8, False, "main"),
        ("spannorm", "span", 8, False, "main"),
        ("hf-llama", "pre", 8, False, "main"),
        ("spannorm", "pre", 8, False, "peers"),
        ("spannorm", "post", 8, False, "peers"),
        ("spannorm", "pre", 8, False, "compile"),
        ("spannorm", "pre", 8, True, "compile"),
        ("spannorm", "span", 8, False, "compile"),
        ("spannorm", "span", 8, True, "compile"),
        ("spannorm", "post", 8, False, "compile"),  # (every scheme asked for: mhc's cost compiled, issue 31)
        ("spannorm", "post", 8, True, "compile"),
        ("hf-llama", "pre", 8, False, "compile"),
        ("hf-llama", "pre", 8, True, "compile"),
    ]


def test_ratios_and_depth_fit():
    def row(impl, scheme, depth, dtype, step, mem=100.0):
        return {
            "impl": impl,
            "scheme": scheme,
            "depth": depth,
            "dtype": dtype,
            "step_s": step,
            "tokens_per_s": 2048 / step,
            "peak_mem_mb": mem,
        }

    rows = [row("spannorm", "pre", L, "fp32", 0.01 + 0.002 * L) for L in (4, 8, 16, 32)]
    rows += [row("spannorm", "span", 8, "fp32", 0.0286, 103.0), row("hf-llama", "pre", 8, "fp32", 0.052)]
    rows += [row("spannorm", "span", 4, "fp32", 0.018 / 1.1), row("hf-llama", "pre", 4, "fp32", 0.036)]
    rows += [
        row(impl, scheme, 8, "fp32", step) | {"compile": c, "group": "compile"}
        for impl, scheme, c, step in [
            ("spannorm", "pre", False, 0.026),
            ("spannorm", "pre", True, 0.013),
            ("spannorm", "span", True, 0.0143),
            ("spannorm", "mhc", False, 0.104),
            ("spannorm", "mhc", True, 0.052),
            ("hf-llama", "pre", False, 0.052),
            ("hf-llama", "pre", True, 0.039),
        ]
    ]
    rows += [
        row("spannorm", "pre", 8, "fp32", 0.02) | {"group": "peers"},
        row("spannorm", "post", 8, "fp32", 0.03) | {"group": "peers"},
    ]
    for r in rows:  # saved activations: 10 MB per layer for pre and span, at the depths where both ran
        if r["impl"] == "spannorm" and r["depth"] in (4, 8) and "group" not in r:
            r["saved_mb"] = 10.0 * r["depth"]
    lines = ratios({"rows": rows})
    assert "fp32: span/pre saved activations by depth: L=4 1.000x, L=8 1.000x (geometric mean 1.000x)" in lines
    assert "fp32: step time / pre's, every scheme at L=8: post 1.50" in lines
    assert "fp32 compiled: spannorm pre / HF Llama tokens/s 3.000x" in lines
    assert "fp32: spannorm pre compiled / eager tokens/s 2.000x" in lines  # both from the compile group
    assert "fp32: hf-llama pre compiled / eager tokens/s 1.333x" in lines
    assert "fp32 compiled: span/pre step time 1.100x" in lines
    assert (
        "fp32 compiled: mhc/pre step time 4.000x" in lines
        and "fp32: spannorm mhc compiled / eager tokens/s 2.000x" in lines
    )
    assert "fp32: span/pre step time 1.100x, peak memory 1.030x" in lines
    assert "fp32: spannorm pre / HF Llama tokens/s 2.000x" in lines
    assert "fp32: spannorm pre step time = 10.0 ms + 2.00 ms × L (R² 1.0000)" in lines
    # span/pre 1/1.1 at L=4 and 1.1 at L=8: geometric mean 1; pre/HF 2 at both (depths 16, 32 have no span or HF)
    assert "fp32: span/pre step time by depth: L=4 0.909x, L=8 1.100x (geometric mean 1.000x)" in lines
    assert "fp32: spannorm pre / HF Llama tokens/s by depth: L=4 2.000x, L=8 2.000x (geometric mean 2.000x)" in lines


def test_bench_bad_input(capsys):
    assert main(["bench", "--dtypes", "fp16"]) == 2
    assert "--dtypes 'fp16' is invalid: expected fp32 and/or bf16" in capsys.readouterr().err
    assert main(["bench", "--schemes", "nope"]) == 2
    assert "--schemes='nope' is invalid" in capsys.readouterr().err


def test_moe_case_and_its_dense_equivalent():
    from spannorm.bench import moe_cases

    todo = moe_cases(["fp32"])
    assert [c.impl for c in todo] == ["spannorm-moe-dense", "spannorm-moe"]
    dense, moe = time_group([Case(c.impl, c.scheme, 1, "bf16") for c in todo], reps=1, warmup=0)
    assert moe["step_s"] > 0 and moe["n_params"] > dense["n_params"]
    # same active parameters, up to the router (8 × d_model)
    assert moe["n_active_params"] - dense["n_active_params"] == 8 * 256
    assert dense["n_active_params"] == dense["n_params"]


def test_moe_ratio():
    from spannorm.bench import moe_ratios

    rows = [
        {"impl": "spannorm-moe", "dtype": "fp32", "step_s": 0.33},
        {"impl": "spannorm-moe-dense", "dtype": "fp32", "step_s": 0.2},
    ]
    assert moe_ratios({"rows": rows}) == [
        "fp32: MoE (8 experts, top-2) / dense with the same active parameters: step time 1.650x (330 ms vs 200 ms)"
    ]


def test_report_of_a_json_result(tmp_path, capsys):
    import json

    row = {
        "impl": "spannorm",
        "scheme": "pre",
        "depth": 8,
        "dtype": "fp32",
        "compile": False,
        "group": "main",
        "step_s": 0.5,
        "tokens_per_s": 4096.0,
        "peak_mem_mb": 700.0,
        "mfu": 0.25,
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"rows": [row, row | {"impl": "hf-llama", "step_s": 1.0, "tokens_per_s": 2048.0}]}))
    assert main(["bench", "--report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fp32: spannorm pre / HF Llama tokens/s 2.000x" in out
    assert "| spannorm | pre | 8 | fp32 | no | main | 4,096 | 500 | 700 | — | 25.0% |" in out
    path.write_text("{}")
    assert main(["bench", "--report", str(path)]) == 2
    assert "is not a spannorm bench --json file" in capsys.readouterr().err
