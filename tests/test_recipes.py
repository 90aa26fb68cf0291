"""Width-aware recipes (issue 24): every scheme's base std σ is a rule of the width, checked at two widths and two
depths against an independent table; model.init_std pins a number, model.init_scale multiplies every std."""

import json
import math

import pytest
import torch

from spannorm import ModelConfig, Scheme, build_model
from spannorm.layers import Role
from spannorm.run import init_record
from spannorm.schemes import weight_stds

FAN_IN = "fan-in"
CARRIED = "carried"  # GPT-2's 0.02 at width 768: 0.02·sqrt(768/d)
# the rule each scheme's σ follows, written out by hand: docs/fair-study/recipes/ measured the choice for pre, span,
# post, peri, lns, siamese and mixln; admin follows post, sandwich and hybrid(_star) pre, residual siamese
RULE = {
    "pre": FAN_IN,
    "post": CARRIED,
    "span": FAN_IN,
    "deepnorm": FAN_IN,
    "b2t": FAN_IN,
    "admin": CARRIED,
    "peri": FAN_IN,
    "sandwich": FAN_IN,
    "mixln": FAN_IN,
    "hybrid": FAN_IN,
    "hybrid_star": FAN_IN,
    "lns": CARRIED,
    "residual": FAN_IN,
    "siamese": FAN_IN,
    "deepscale": FAN_IN,
    "olmo2": FAN_IN,
    "mhc": FAN_IN,  # as pre
    "ngpt": FAN_IN,  # (its matrices are normalized after the draw: only its direction counts)
}
# the fair study's search put these schemes' best init scale at this factor of the authors' rule carried, at both
# depths; the recommended rule carries it while model.init_std is null
MEASURED = {"b2t": 2.0}
GPT2_OUT_DOWN = {"pre", "peri", "sandwich", "hybrid", "hybrid_star", "mhc"}  # out and down × 1/sqrt(2L)
PLAIN = {"post", "admin", "lns", "residual", "siamese", "mixln", "olmo2", "ngpt"}  # every linear weight σ


def sigma(scheme: str, d: int, L: int) -> float:
    return d**-0.5 if RULE[scheme] == FAN_IN else 0.02 * math.sqrt(768 / d)  # (no scheme's depends on L)


def expected(scheme: str, d: int, L: int, s: float | None = None) -> dict[Role, float]:
    """Roles whose std is σ (``s``, default the width rule's) or a multiple of it, and constants that do not
    follow it, by scheme (the other roles: tests/test_peers.py); the width rule's carries the measured factor."""
    stds = _expected(scheme, d, L, sigma(scheme, d, L) if s is None else s)
    return {role: std * (MEASURED.get(scheme, 1.0) if s is None else 1.0) for role, std in stds.items()}


def _expected(scheme: str, d: int, L: int, s: float) -> dict[Role, float]:
    if scheme in GPT2_OUT_DOWN:
        return {Role.EMBED: s, Role.ATTN_QK: s, Role.FFN_UP: s, Role.ATTN_OUT: s / math.sqrt(2 * L)}
    if scheme in PLAIN:
        return {Role.ATTN_QK: s, Role.ATTN_OUT: s, Role.FFN_DOWN: s} | (
            {Role.EMBED: math.sqrt(2 / 5)} if scheme == "mixln" else {Role.EMBED: s}
        )
    if scheme in ("span", "deepnorm", "b2t"):  # σ on the embedding and the head; the blocks have their own rules
        return {Role.EMBED: s, Role.HEAD: s}
    assert scheme == "deepscale"
    return {Role.EMBED: 1.0, Role.ATTN_QK: d**-0.5}  # unit-variance embedding, fan-in inputs: no σ


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("L", [4, 48])
@pytest.mark.parametrize("scheme", [s.value for s in Scheme])
def test_every_scheme_base_std_follows_its_width_rule(scheme, d, L):
    assert set(RULE) == {s.value for s in Scheme}
    cfg = ModelConfig(d_model=d, n_heads=4, n_layers=L, scheme=scheme)
    got = weight_stds(cfg, L - 1)
    for role, std in expected(scheme, d, L).items():
        assert got[role] == pytest.approx(std, rel=1e-9), role
    if scheme == "ngpt":  # (its matrices are normalized at init: a pinned or scaled std is refused, test_ngpt.py)
        return
    # a number pins σ at every width; init_scale multiplies every std of the rule
    pinned = weight_stds(ModelConfig(d_model=d, n_heads=4, n_layers=L, scheme=scheme, init_std=0.02), L - 1)
    for role, std in expected(scheme, d, L, s=0.02).items():
        assert pinned[role] == pytest.approx(std, rel=1e-9), role
    scaled = weight_stds(ModelConfig(d_model=d, n_heads=4, n_layers=L, scheme=scheme, init_scale=0.25), L - 1)
    assert scaled == pytest.approx({r: 0.25 * v for r, v in got.items()})


@pytest.mark.parametrize("scheme", ["pre", "span", "deepnorm"])
def test_init_scale_multiplies_the_measured_weights_and_not_the_norms(scheme):
    def build(scale):
        torch.manual_seed(0)
        return build_model(ModelConfig(d_model=64, n_heads=4, n_layers=3, scheme=scheme, init_scale=scale))

    a, b = build(1.0), build(2.0)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if p.dim() == 2:
            assert q.std().item() == pytest.approx(2 * p.std().item(), rel=1e-5), name
        else:  # norm gains (and biases) are not weights of the init rule
            assert torch.equal(p, q), name


def test_shared_init_uses_the_width_rule():
    for d in (64, 256):
        cfg = ModelConfig(d_model=d, n_heads=4, n_layers=4, scheme="b2t", init="shared")
        assert all(v == pytest.approx(sigma("pre", d, 4)) for v in weight_stds(cfg, 0).values())


@pytest.mark.parametrize("value", [0, -0.1, float("nan"), "big", True])
def test_bad_init_std_or_scale_is_a_one_line_error(value):
    from spannorm.config import ConfigError

    for field in ("init_std", "init_scale"):
        with pytest.raises(ConfigError, match=f"model.{field}="):
            ModelConfig(**{field: value})


def test_the_code_s_width_rules_are_the_measured_ones():
    """scripts/fair_recipes.py applies fair-recipes.yaml's rule to its committed cells and fails on a disagreement."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "scripts/fair_recipes.py"), str(root / "docs/fair-study/recipes")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 2 + 8  # a row per screened scheme (olmo2 the eighth)


def relabel_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts/relabel_measured.py"
    spec = importlib.util.spec_from_file_location("relabel_measured", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def old_cell(tmp_path, monkeypatch, name, sets, attr, old):
    """A study cell of ``sets`` whose init.json was written while its scheme's class attribute ``attr`` was ``old``."""
    import yaml

    from spannorm.config import to_dict
    from spannorm.files import atomic_write_text
    from spannorm.run_config import load_config
    from spannorm.schemes import SCHEMES

    cfg = load_config("tiny", sets)
    cell = tmp_path / "cells" / name
    cell.mkdir(parents=True)
    atomic_write_text(cell / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    with monkeypatch.context() as m:  # the recipe before the change
        m.setattr(SCHEMES[cfg.model.scheme], attr, old)
        atomic_write_text(cell / "init.json", json.dumps(init_record(cfg.model)))
    return cell, cfg


def test_relabel_proves_each_cell_the_same_model_before_it_renames_anything(tmp_path, monkeypatch):
    """scripts/relabel_measured.py: a b2t cell trained at init_scale 1 before b2t's × 2 is today's recipe at 0.5;
    a wrong factor fails the proof and nothing is renamed."""
    import dataclasses

    from spannorm.config import to_dict

    script = relabel_script()
    sets = ["model.scheme=b2t", "model.n_layers=2"]
    cell, cfg = old_cell(tmp_path, monkeypatch, "b2t_L2_lr0.001_s1", sets, "measured", None)

    with pytest.raises(SystemExit, match="not today's at init_scale 0.25"):
        script.relabel(tmp_path, {"b2t": 4.0})
    [(old, new, new_cfg)] = script.relabel(tmp_path, {"b2t": 2.0})
    assert (old, new.name) == (cell, "b2t_L2_lr0.001_s1_init_scale-0.5")
    assert new_cfg == to_dict(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_scale=0.5)))
    assert cell.is_dir()  # relabel() only plans: main() renames


def test_relabel_takes_each_cell_s_factor_from_its_init_json(tmp_path, monkeypatch):
    """A bare ``post``: each cell's factor comes from its own init.json. A L = 48 cell trained while post's recipe
    had × 0.5 there (as its short-lived depth rule did) is relabelled × 2 (init_scale 1 becomes 0.5), a cell whose
    recipe did not change is left, and a cell whose init.json is not the recipe at any scale fails the proof."""
    from spannorm.schemes import SCHEMES

    script = relabel_script()
    today = SCHEMES[Scheme.POST].base_std
    halved = today._replace(std=today.std / 2)
    sets = ["model.scheme=post", "model.n_layers=48"]
    deep, _ = old_cell(tmp_path, monkeypatch, "post_L48_lr0.004_s1", sets, "base_std", halved)
    sets = ["model.scheme=post", "model.n_layers=12"]
    old_cell(tmp_path, monkeypatch, "post_L12_lr0.004_s1", sets, "base_std", today)
    [(old, new, new_cfg)] = script.relabel(tmp_path, {"post": None})
    assert (old, new.name, new_cfg["model"]["init_scale"]) == (deep, "post_L48_lr0.004_s1_init_scale-0.5", 0.5)

    record = json.loads((deep / "init.json").read_text())
    record["weight_stds"][-1] = {role: 2 * std for role, std in record["weight_stds"][-1].items()}
    (deep / "init.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="not today's at init_scale 0.5"):
        script.relabel(tmp_path, {"post": None})
