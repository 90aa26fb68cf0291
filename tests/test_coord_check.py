"""Coordinate checks (spannorm.coord_check): µP keeps every role's update flat in width and CompleteP the model's
in depth, for pre, span and post; the standard parametrization drifts."""

import json

import pytest
import torch

from spannorm.coord_check import FLAT, coord_check, exponent, verdict
from spannorm.data import TokenData, prepare
from spannorm.data_config import DataConfig
from spannorm.model_config import ModelConfig
from spannorm.model_config import Parametrization as P


@pytest.fixture(scope="module")
def batches():
    data = TokenData(prepare(DataConfig()), 64)
    gen = torch.Generator().manual_seed(0)
    return [data.sample(gen, 8) for _ in range(9)]


def test_exponent_is_the_log_log_slope():
    assert exponent([64, 128, 256], [1.0, 2.0, 4.0]) == pytest.approx(1.0)
    assert exponent([4, 8, 16], [3.0, 3.0, 3.0]) == pytest.approx(0.0, abs=1e-12)
    row = {"axis": "width", "exponent": {r: 0.0 for r in ("embedding", "attention", "ffn", "stream", "logits")}}
    assert verdict(row) == "flat"
    row["exponent"]["ffn"] = FLAT + 0.01
    assert verdict(row).startswith("drifts: ffn")


@pytest.mark.parametrize("scheme", ["pre", "span", "post"])
def test_mup_is_flat_in_width_and_standard_drifts(scheme, batches):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, scheme=scheme)
    standard, mup = coord_check(cfg, "width", [32, 64, 128], [P.STANDARD, P.MUP], batches[:5], 1e-2, [1])
    assert verdict(mup) == "flat", mup["exponent"]
    assert verdict(standard).startswith("drifts"), standard["exponent"]


@pytest.mark.parametrize("scheme", ["pre", "span", "post"])
def test_completep_is_flat_in_depth(scheme, batches):
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=4, scheme=scheme)
    standard, completep = coord_check(cfg, "depth", [8, 16, 32, 64], [P.STANDARD, P.COMPLETEP], batches, 1e-2, [1, 2])
    assert verdict(completep) == "flat", completep["exponent"]
    if scheme == "pre":  # its stream is never normalized: under standard its update grows with L
        assert standard["exponent"]["stream"] > FLAT, standard["exponent"]


def test_the_command_writes_a_table_a_json_and_a_plot(tmp_path, capsys):
    from spannorm.cli import main

    out = tmp_path / "cc.json"
    args = "probe --coord-check width --sizes 32,64 --schemes pre --steps 2 --seeds 1 --set train.threads=1"
    main([*args.split(), "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["parametrization"] for r in rows] == ["standard", "mup"] and rows[0]["sizes"] == [32, 64]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| pre | mup |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, bad",
    [
        ("--sizes 64", "--sizes"),
        ("--sizes 64,x", "--sizes"),
        ("--steps 0", "--steps"),
        ("--lr -1", "--lr"),
        ("--depths 2,4", "--depths"),
        ("--sizes 36,72", "model.n_heads"),
    ],
)
def test_bad_input_is_one_line(args, bad, capsys):
    from spannorm.cli import main

    assert main(["probe", "--coord-check", "width", *args.split()]) != 0
    err = capsys.readouterr().err.strip()
    assert bad in err and len(err.splitlines()) == 1, err
