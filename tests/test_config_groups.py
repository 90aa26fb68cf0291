"""Issue 27 (its last item): the option groups model.moe, model.dyt, model.span and train.guard, and the old flat
keys, still read everywhere a config is read (config.LEGACY_KEYS): YAML files, --set, study files, saved runs and
exported folders. Each test compares the old spelling with the new one."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from spannorm.config import LEGACY_KEYS, ConfigError, legacy_view, to_dict, upgrade_config
from spannorm.model_config import ModelConfig
from spannorm.output import value
from spannorm.run import RunDir, read_metrics
from spannorm.run_config import load_config, read_run_config, run_config_from_dict, same_experiment
from spannorm.study.grid import build_cell, expand, leaf, plan_study, study_from_dict
from spannorm.train import train

FLAT = {  # one value of every old flat key, none of them the default
    "model": {
        "n_experts": 4,
        "top_k": 1,
        "n_shared_experts": 1,
        "expert_d_ff": 48,
        "capacity_factor": 1.5,
        "moe_aux_coef": 0.02,
        "moe_z_coef": 0.002,
        "norm": "dyt",
        "dyt_alpha0": 0.7,
        "dyt_recipe": "llm",
        "dyt_alpha0_attn": 0.9,
        "dyt_alpha0_other": 0.3,
        "span_scale": "init",
        "span_c": 2.0,
    },
    "train": {
        "guard": True,
        "guard_skip_limit": 4,
        "guard_spike_z": 5.0,
        "guard_window": 9,
        "guard_lr_factor": 0.5,
        "guard_max_rollbacks": 2,
    },
}
NESTED = {
    "model": {
        "moe": {
            "n_experts": 4,
            "top_k": 1,
            "n_shared_experts": 1,
            "expert_d_ff": 48,
            "capacity_factor": 1.5,
            "aux_coef": 0.02,
            "z_coef": 0.002,
        },
        "norm": "dyt",
        "dyt": {"alpha0": 0.7, "recipe": "llm", "alpha0_attn": 0.9, "alpha0_other": 0.3},
        "span": {"scale": "init", "c": 2.0},
    },
    "train": {
        "guard": {"enabled": True, "skip_limit": 4, "spike_z": 5.0, "window": 9, "lr_factor": 0.5, "max_rollbacks": 2}
    },
}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_old_flat_keys_and_the_nested_ones_give_the_same_config(tmp_path):
    assert upgrade_config(FLAT) == NESTED and upgrade_config(NESTED) == NESTED  # (and FLAT itself is unchanged)
    assert FLAT["model"]["n_experts"] == 4 and "moe" not in FLAT["model"]
    flat, nested = (load_config(write(tmp_path, f"{n}.yaml", d)) for n, d in (("flat", FLAT), ("nested", NESTED)))
    assert flat == nested != load_config(write(tmp_path, "default.yaml", {}))
    m, t = nested.model, nested.train
    assert (m.moe.n_experts, m.moe.top_k, m.moe.aux_coef, m.dyt.recipe.value, m.span.scale.value, m.span.c) == (
        4,
        1,
        0.02,
        "llm",
        "init",
        2.0,
    )
    assert (t.guard.enabled, t.guard.window, t.guard.max_rollbacks) == (True, 9, 2)
    # a group given in part: the rest at its defaults; a group as an object or a mapping
    assert ModelConfig(span={"c": 3.0}).span.scale.value == "norm"
    assert ModelConfig(moe=nested.model.moe) == ModelConfig(moe=NESTED["model"]["moe"])


@pytest.mark.parametrize(
    "old, new",
    [
        ("model.span_scale=init", "model.span.scale=init"),
        ("model.n_experts=4", "model.moe.n_experts=4"),
        ("model.moe_z_coef=0.5", "model.moe.z_coef=0.5"),
        ("model.dyt_recipe=llm", "model.dyt.recipe=llm"),
        ("train.guard=true", "train.guard.enabled=true"),
        ("train.guard_window=7", "train.guard.window=7"),
    ],
)
def test_set_takes_either_key_on_a_file_of_either_spelling(tmp_path, old, new):
    flat, nested = write(tmp_path, "flat.yaml", FLAT), write(tmp_path, "nested.yaml", NESTED)
    configs = [load_config(path, [s]) for path in (flat, nested) for s in (old, new)]
    assert all(c == configs[0] for c in configs[1:])
    assert load_config("tiny", [old]) == load_config("tiny", [new]) != load_config("tiny")
    assert load_config("tiny", ["train.guard={enabled: true, window: 7}"]) == load_config(
        "tiny", ["train.guard=true", "train.guard_window=7"]
    )


@pytest.mark.parametrize(
    "data, names",
    [
        ({"model": {"span_scale": "init", "span": {"scale": "norm"}}}, ("model.span_scale", "model.span.scale")),
        ({"model": {"top_k": 1, "moe": {"top_k": 1}}}, ("model.top_k", "model.moe.top_k")),
        ({"train": {"guard": {"window": 5}, "guard_window": 6}}, ("train.guard_window", "train.guard.window")),
        ({"train": {"guard": True, "guard_window": 6}}, None),  # (the old keys alone: fine)
    ],
)
def test_a_value_under_both_its_old_and_its_new_key_is_refused_in_one_line(tmp_path, capsys, data, names):
    from spannorm.cli import main

    path = write(tmp_path, "both.yaml", data)
    if names is None:
        assert load_config(path).train.guard.window == 6
        return
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert all(n in str(e.value) for n in names) and "\n" not in str(e.value)
    assert main(["config", "show", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(n in err for n in names)


def test_config_show_prints_the_groups_with_their_docs_and_reads_the_old_keys(capsys):
    from spannorm.cli import main

    assert main(["config", "show", "--config", "moe-tiny", "--set", "model.span_scale=init"]) == 0
    shown = capsys.readouterr().out
    assert (
        "\n  moe:\n    # 0: dense SwiGLU FFN; >= 1: MoE FFN with this many routed experts\n    n_experts: 4\n" in shown
    )
    assert "\n  span:\n" in shown and "\n    scale: init\n" in shown and "\n  guard:\n" in shown
    old = {k.split(".")[1] for k in LEGACY_KEYS} - {k.rsplit(".", 1)[1] for k in LEGACY_KEYS.values()} - {"guard"}
    assert len(old) == 13 and not [k for k in old if f" {k}:" in shown]  # (no old key is written)


def small_study(corpus, **axes):
    grid = {"model.scheme": ["span"], "model.n_layers": [2], "train.lr": [1e-2], "train.seed": [1], **axes}
    return {
        "base": "tiny",
        "set": [f"data.corpus={corpus}"],
        "tokens_per_cell": 2560,
        "grids": [{"name": "g", "axes": grid}],
    }


@pytest.mark.parametrize(
    "old, new, values",
    [
        ("model.span_scale", "model.span.scale", ["init", "norm"]),
        ("model.span_c", "model.span.c", [1.0, 4.0]),
        ("model.n_experts", "model.moe.n_experts", [0, 2]),
        ("model.dyt_recipe", "model.dyt.recipe", ["plain", "llm"]),
        ("train.guard", "train.guard.enabled", [False, True]),
    ],
)
def test_a_study_names_its_cells_as_before_whichever_spelling_its_points_use(corpus, old, new, values):
    """A point path by its old name or its new one: the same cells, the same names (the old leaf, as the committed
    studies' cells are named), their config the point's value."""
    plans = [plan_study(study_from_dict(small_study(corpus, **{path: values}))) for path in (old, new)]
    cells = [expand(p) for p in plans]
    assert [c.name for c in cells[0]] == [c.name for c in cells[1]]
    assert [c.cfg for c in cells[0]] == [c.cfg for c in cells[1]]
    assert leaf(old) == leaf(new) == old.split(".")[1]
    changed = next(c for c in cells[1] if c.extras)  # (the value that is not the base config's)
    assert changed.name.endswith(f"_{old.split('.')[1]}-{value(changed.extras[new])}")
    assert changed.axes[new] == changed.extras[new] and changed.series.split()[1].startswith(leaf(old) + "=")
    sets = ["model.span_scale=init", "train.guard=true"]  # (a study's set: old keys on the nested preset)
    with_sets = small_study(corpus) | {"set": small_study(corpus)["set"] + sets}
    cfg = plan_study(study_from_dict(with_sets)).base_cfg
    assert cfg.model.span.scale.value == "init" and cfg.train.guard.enabled


def test_a_study_warm_starts_along_an_old_key_and_refuses_an_axis_given_twice(corpus):
    data = small_study(corpus, **{"model.n_experts": [0, 2]})
    data["grids"][0] |= {
        "search": {"train.lr": {"start": 1e-2, "min": 1e-3, "max": 1e-1}},
        "warm_start": "model.n_experts",
    }
    del data["grids"][0]["axes"]["train.lr"]
    plan = plan_study(study_from_dict(data))
    assert plan.study.grids[0].warm_start == "model.n_experts"
    again = copy.deepcopy(data)
    again["grids"][0]["warm_start"] = "model.moe.n_experts"  # (the new spelling of the grid's axis: that axis)
    assert plan_study(study_from_dict(again)).study.grids[0].warm_start == "model.n_experts"
    twice = small_study(corpus, **{"model.span_scale": ["init"], "model.span.scale": ["none"]})
    with pytest.raises(ConfigError, match=r"grids\[0\].axes key='model.span_scale' is invalid: .*model.span.scale"):
        study_from_dict(twice)


def test_a_run_saved_with_the_old_flat_keys_resumes_exactly(corpus, tmp_path):
    """A run directory from before the groups: its config.yaml holds the old flat keys. It resumes (the same
    experiment), and to the same losses as a run that was never interrupted."""
    cfg = load_config("tiny", [f"data.corpus={corpus}", "train.ckpt_interval=10", "train.guard=true", "model.span_c=2"])
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "old", progress=False, stop_after=15)
    saved = RunDir(tmp_path / "old").config_file
    nested = yaml.safe_load(saved.read_text())
    flat = {s: legacy_view(s, section) if s != "data" else section for s, section in nested.items()}
    assert "span_c" in flat["model"] and flat["train"]["guard"] is True and "guard_window" in flat["train"]
    saved.write_text(yaml.safe_dump(flat, sort_keys=False))
    assert read_run_config(saved) == cfg and same_experiment(read_run_config(saved), cfg)
    train(cfg, tmp_path / "old", resume=True, progress=False)
    losses = [[(r["step"], r["loss"], r["val_loss"]) for r in read_metrics(tmp_path / n)] for n in ("full", "old")]
    assert losses[0] == losses[1]  # exactly


def test_the_flat_legacy_view_round_trips_and_keeps_the_init_probe_caches_valid():
    cfg = run_config_from_dict(NESTED)
    for section in ("model", "train"):
        d = to_dict(getattr(cfg, section))
        assert upgrade_config({section: legacy_view(section, d)}) == {section: d}
    assert legacy_view("model", to_dict(cfg.model))["moe_aux_coef"] == 0.02
    # a committed study's cache key was made of the flat model: the same keys come out of the nested one
    key = json.loads((Path(__file__).parents[1] / "docs/results/init_probe.json").read_text())["key"]
    flat = legacy_view("model", to_dict(ModelConfig()))
    assert set(key["model"]) <= set(flat) and set(flat) - set(key["model"]) <= {
        "qk_norm",
        "hc_streams",
        "parametrization",
        "base_width",
        "base_depth",
    }
    assert (
        legacy_view("model", {"scheme": "span", "span": {"scale": "none"}}) == key["variants"]["span span_scale=none"]
    )


def test_an_exported_config_json_with_the_old_flat_attributes_loads_the_same_model_config(tmp_path):
    pytest.importorskip("transformers")
    from spannorm.hf_model import SpanNormConfig

    cfg = run_config_from_dict(NESTED).model
    new = SpanNormConfig.from_model_config(cfg).to_dict()
    assert new["moe"]["top_k"] == 1 and new["span"] == {"scale": "init", "c": 2.0} and "n_experts" not in new
    old = {k: v for k, v in new.items() if k not in ("moe", "dyt", "span")}
    old |= {("moe_top_k" if k == "top_k" else k): v for k, v in legacy_view("model", to_dict(cfg)).items()}
    assert old["moe_top_k"] == 1 and old["span_scale"] == "init" and "moe" not in old
    folder = tmp_path / "old-export"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(old))
    loaded = SpanNormConfig.from_pretrained(folder)
    assert loaded.model_config() == cfg and loaded.moe == new["moe"]
    with pytest.raises(ConfigError, match="model.span_scale and model.span.scale"):
        SpanNormConfig(span_scale="none", span={"scale": "init"})


def test_build_cell_reads_the_nested_config_for_an_old_point_path(corpus):
    from spannorm.study.grid import Follow

    plan = plan_study(study_from_dict(small_study(corpus)))
    cell = build_cell(plan, Follow(plan.study.grids[0], {"model.scheme": "span", "model.span_c": 4.0}))
    assert cell.cfg.model.span.c == 4.0 and cell.axes == {"model.scheme": "span", "model.span_c": 4.0}
    assert cell.extras == {"model.span_c": 4.0} and cell.name.endswith("_span_c-4")


@pytest.mark.parametrize("old", sorted(LEGACY_KEYS))
def test_an_old_flat_keyword_in_the_python_api_names_its_new_place_in_one_line(old):
    from spannorm.run_config import TrainConfig

    section, name = old.split(".")
    cls = {"model": ModelConfig, "train": TrainConfig}[section]
    _, group, member = LEGACY_KEYS[old].split(".")
    given = FLAT[section][name]
    with pytest.raises(ConfigError) as error:
        cls(**{name: given})
    message = str(error.value)
    assert "\n" not in message and LEGACY_KEYS[old] in message and f"{group}={{{member!r}: {given!r}}}" in message
    nested = NESTED[section]  # (the spelling it names is taken, beside the group's other values)
    assert to_dict(cls(**nested)) == to_dict(cls(**{**nested, group: {**nested[group], member: given}}))
