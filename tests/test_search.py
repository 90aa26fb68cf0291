"""A grid's search (spannorm.study.search): the best over lr × init scale, bracketed on both axes, replayed from
the cells on disk; warm starts across depth; limits; confirmation cells; a real study that runs one."""

import json
import math

import pytest

from spannorm.config import ConfigError
from spannorm.study import expand, plan_study, run_study, study_from_dict
from spannorm.study.search import search_follow, searches

pytestmark = pytest.mark.usefixtures("one_thread")


def search_study(corpus, **grid_changes):
    grid = {
        "name": "fair",
        "axes": {"model.scheme": ["pre", "span"], "model.n_layers": [2, 3], "train.seed": [1]},
        "search": {
            "train.lr": {"start": 4e-3, "min": 5e-4, "max": 6.4e-2},
            "model.init_scale": {"start": 1, "min": 0.125, "max": 8},
        },
        "warm_start": "model.n_layers",
        "confirm": {"seeds": [1, 2, 3], "tokens_per_cell": 5120, "set": ["train.warmup_steps=4"]},
    } | grid_changes
    return {
        "base": "tiny",
        "set": [f"data.corpus={corpus}", "train.probe_interval=0"],
        "tokens_per_cell": 2560,
        "probe": False,
        "grids": [grid],
    }


def bowl(cell):
    """A fake final val loss with its minimum at lr 1.6e-2 and init scale 0.5 (pre) or lr 2e-3, scale 2 (span)."""
    m = cell.cfg.model
    lr0, s0 = (1.6e-2, 0.5) if m.scheme.value == "pre" else (2e-3, 2.0)
    return 2 + (math.log2(cell.cfg.train.lr / lr0)) ** 2 + (math.log2(m.init_scale / s0)) ** 2 + 0.01 * m.n_layers


def fake_train(plan, out, loss=bowl, status=lambda cell: "ok"):
    """Write a summary.json for every cell the searches ask for, round after round, until they ask for none."""
    rounds = 0
    while True:
        cells = expand(plan, search_follow(searches(plan, out)))
        new = [c for c in cells if not (out / "cells" / c.name / "summary.json").is_file()]
        if not new:
            return rounds
        for c in new:
            d = out / "cells" / c.name
            d.mkdir(parents=True)
            s = status(c)
            summary = {"steps": c.cfg.train.max_steps, "final_val_loss": loss(c), "diverged": s == "diverged"}
            (d / "summary.json").write_text(json.dumps(summary | {"stalled": s == "stalled"}))
        rounds += 1


def test_the_search_brackets_the_best_on_both_axes_and_confirms_it(corpus, tmp_path):
    plan = plan_study(study_from_dict(search_study(corpus)))
    assert fake_train(plan, tmp_path) > 2
    found = searches(plan, tmp_path)
    assert [s.state for s in found] == ["done"] * 4
    for s in found:
        want = (1.6e-2, 0.5) if s.point["model.scheme"] == "pre" else (2e-3, 2.0)
        assert tuple(s.values(s.best).values()) == want
        assert s.limits == []
        i, j = s.best  # bracketed: all four neighbours were trained, and are worse
        for c in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
            assert s.tried[c][1]["final_val_loss"] > s.tried[s.best][1]["final_val_loss"]
    # the deeper point started from the shallower one's best: its cross only
    deep = next(s for s in found if s.point == {"model.scheme": "pre", "model.n_layers": 3, "train.seed": 1})
    shallow = next(s for s in found if s.point == {"model.scheme": "pre", "model.n_layers": 2, "train.seed": 1})
    assert len(deep.tried) == 5 < len(shallow.tried)
    confirm = [f for f in search_follow(found) if f.tokens]
    assert len(confirm) == 4 * 3
    assert {f.point["train.seed"] for f in confirm} == {1, 2, 3}


def test_a_search_replays_to_the_same_cells_and_stops_at_its_limits(corpus, tmp_path):
    data = search_study(corpus)
    data["grids"][0]["search"]["train.lr"]["max"] = 8e-3  # pre's best (1.6e-2) is beyond it
    plan = plan_study(study_from_dict(data))
    fake_train(plan, tmp_path)
    first = [(s.point, sorted(s.tried), s.best) for s in searches(plan, tmp_path)]
    assert first == [(s.point, sorted(s.tried), s.best) for s in searches(plan, tmp_path)]
    pre = next(s for s in searches(plan, tmp_path) if s.point["model.scheme"] == "pre")
    assert pre.values(pre.best)["train.lr"] == 8e-3
    assert pre.limits == ["train.lr reached its limit max=0.008"]


def test_a_search_where_nothing_trains_steps_down_the_lr(corpus, tmp_path):
    plan = plan_study(study_from_dict(search_study(corpus, warm_start=None)))
    fake_train(plan, tmp_path, status=lambda c: "ok" if c.cfg.train.lr < 1e-3 else "diverged")
    s = searches(plan, tmp_path)[0]
    assert s.state == "done" and s.values(s.best)["train.lr"] == 5e-4  # the limit: min
    assert "train.lr reached its limit min=0.0005" in s.limits


def ridge(cell):
    """A fake val loss in a narrow valley where a smaller init lets a higher lr train: u = x + y steep, v = x - y
    shallow (x, y: log2 of lr / 4e-3 and of init scale), its minimum at lr 1.6e-2, scale 0.25. From the start
    every step on one axis climbs out of the valley; only a diagonal step goes down it."""
    x, y = math.log2(cell.cfg.train.lr / 4e-3), math.log2(cell.cfg.model.init_scale)
    return 2 + 10 * (x + y) ** 2 + (x - y - 4) ** 2


def test_a_search_with_diagonals_finds_the_best_a_cross_misses(corpus, tmp_path):
    """Issue 24: a one-axis-at-a-time search stops at its start on a diagonal valley; with ``diagonals`` it goes
    down the valley to the true best, bracketed on all 8 sides; the report states the rule."""
    best = {}
    for diagonals in (False, True):
        plan = plan_study(study_from_dict(search_study(corpus, warm_start=None, diagonals=diagonals)))
        out = tmp_path / str(diagonals)
        fake_train(plan, out, loss=ridge)
        found = searches(plan, out)
        assert [s.state for s in found] == ["done"] * 4
        best[diagonals] = {tuple(s.values(s.best).values()) for s in found}
        if diagonals:
            s = found[0]
            i, j = s.best
            ring = [(i + a, j + b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
            assert all(s.tried[c][1]["final_val_loss"] > s.tried[s.best][1]["final_val_loss"] for c in ring)
    assert best == {False: {(4e-3, 1.0)}, True: {(1.6e-2, 0.25)}}
    with pytest.raises(ConfigError, match=r"grids\[0\].diagonals=True is invalid: expected false in a grid without"):
        plan_study(study_from_dict(search_study(corpus, search={}, warm_start=None, confirm=None, diagonals=True)))


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"search": {"model.n_layers": {"start": 2, "min": 1, "max": 4}}}, "grids[0].search key='model.n_layers'"),
        ({"search": {"train.lr": {"start": 1, "min": 0.1, "max": 0.5}}}, "grids[0].search.train.lr.start=1.0"),
        ({"search": {"train.lr": {"start": 1e-3, "min": 1e-4, "max": 1e-2, "factor": 1}}}, "factor=1.0"),
        ({"warm_start": "train.lr"}, "grids[0].warm_start='train.lr'"),
        ({"search": {}, "warm_start": None, "confirm": {"seeds": [1], "tokens_per_cell": 5120}}, "grids[0].confirm"),
        ({"confirm": {"seeds": [1], "tokens_per_cell": 5000}}, "tokens_per_cell=5000 is invalid for grids[0].confirm"),
        ({"confirm": {"seeds": [1], "tokens_per_cell": 5120, "set": ["train.max_steps=3"]}}, "train.max_steps"),
    ],
)
def test_bad_search_is_a_one_line_error(corpus, change, fragment):
    with pytest.raises(ConfigError) as e:
        plan_study(study_from_dict(search_study(corpus, **change)))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_study_with_a_search_trains_resumes_and_reports(corpus, tmp_path):
    data = search_study(corpus)
    g = data["grids"][0]
    g["axes"] = {"model.scheme": ["pre"], "model.n_layers": [2], "train.seed": [1]}
    g["search"] = {"train.lr": {"start": 1e-2, "min": 5e-3, "max": 2e-2}}  # 3 lrs at most
    g["confirm"]["seeds"] = [2]
    study = study_from_dict(data)
    rows = run_study(study, tmp_path, "test", log=lambda *_: None)
    names = [r["name"] for r in rows]
    assert {"pre_L2_lr0.005_s1", "pre_L2_lr0.01_s1", "pre_L2_lr0.02_s1"} == {n for n in names if "tokens" not in n}
    (confirm,) = [r for r in rows if "tokens" in r["name"]]
    assert confirm["name"].endswith("_s2_tokens-5120") and confirm["steps"] == 20 and confirm["status"] == "ok"
    again = run_study(study, tmp_path, "test", log=lambda *_: None)
    assert [r["final_val_loss"] for r in again] == [r["final_val_loss"] for r in rows]
    text = (tmp_path / "report.md").read_text()
    assert "## Searches" in text  # (pre alone: no claim judged, by its study file's rules or the generic ones;
    assert "trains no SpanNorm (`span`) cell" in text  # the fair study's committed report checks the rules' path)


def test_a_peer_grid_adds_the_best_confirmed_peer_once_it_is_known(corpus, tmp_path):
    data = search_study(corpus, warm_start=None)
    data["grids"][0]["axes"] = {"model.scheme": ["span", "pre", "post"], "model.n_layers": [2], "train.seed": [1]}
    data["grids"].append(
        {
            "name": "wide",
            "axes": {"model.scheme": ["span"], "model.d_model": [32, 48], "model.n_layers": [2], "train.seed": [1]},
            "search": data["grids"][0]["search"],
            "warm_start": "model.d_model",
            "peer": {"grid": "fair", "among": ["pre", "post"], "at": {"model.n_layers": 2}},
        }
    )
    plan = plan_study(study_from_dict(data))

    def loss(cell):  # post's confirmation is the lowest of the peers
        return bowl(cell) - (0.5 if cell.cfg.model.scheme.value == "post" and cell.tokens else 0)

    fake_train(plan, tmp_path, loss=loss)
    wide = [s for s in searches(plan, tmp_path) if s.grid.name == "wide"]
    assert sorted((s.point["model.scheme"], s.point["model.d_model"]) for s in wide) == [
        ("post", 32),
        ("post", 48),
        ("span", 32),
        ("span", 48),
    ]
    # the d_model 32 points are the first grid's cells again (one directory each), and 48 starts from their best
    names = [c.name for c in expand(plan, search_follow(searches(plan, tmp_path)))]
    assert len(names) == len(set(names)) and not any("d_model-32" in n for n in names)
    assert all(s.state == "done" for s in wide)


def test_a_peer_must_name_an_earlier_grid_with_confirm(corpus):
    data = search_study(corpus)
    data["grids"][0]["peer"] = {"grid": "nope", "among": ["pre"]}
    with pytest.raises(ConfigError, match=r"grids\[0\].peer.grid='nope' is invalid"):
        study_from_dict(data)


def test_fair_verdicts_compare_confirmed_bests_by_the_study_rules(corpus, tmp_path):
    from spannorm.study.verdicts import BETTER, WORSE, comparison_table, verdicts_report

    data = search_study(corpus, warm_start=None)
    grid = data["grids"][0]
    grid["axes"] = {"model.scheme": ["span", "pre", "post"], "model.n_layers": [2], "train.seed": [1]}
    grid["peer"] = {"grid": "fair", "among": ["post"]}
    data["grids"] = [dict(grid, name="fair", peer=None), dict(grid, name="peers")]
    data["grids"][0].pop("peer")
    plan = plan_study(study_from_dict(data))
    offset = {"span": 0.0, "pre": 0.3, "post": -0.3}

    def loss(cell):  # span: 0.3 below pre, 0.3 above post; seeds differ by 0.01
        return bowl(cell) + offset[cell.cfg.model.scheme.value] + 0.01 * cell.cfg.train.seed

    def status(cell):  # post diverges at the higher lrs, where span trains
        return "diverged" if cell.cfg.model.scheme.value == "post" and cell.cfg.train.lr >= 8e-3 else "ok"

    fake_train(plan, tmp_path, loss=loss, status=status)
    found = searches(plan, tmp_path)
    table, results = comparison_table(plan, found, tmp_path, {})
    got = {(role, other.point["model.scheme"]): r for role, _, other, r in results}
    assert set(got) == {("pre", "pre"), ("best peer", "post")}  # each pair once, though two grids hold it
    assert got[("pre", "pre")]["verdict"] == BETTER and got[("pre", "pre")]["delta"] == pytest.approx(0.3)
    assert got[("best peer", "post")]["verdict"] == WORSE
    text = verdicts_report(plan, found, tmp_path, {}, init=[])
    assert "Stability where PostNorm diverges or stalls (claim 3, R4): supported." in text
    assert "Quality: lower validation loss than PreNorm (claim 4, R3): supported." in text
    # no probes were written (fake cells): the probe-based claims cannot decide
    assert "Less collapse after training (claim 5, R5): inconclusive." in text
    for f in search_follow(found):  # probes of the confirmation cells: span's deep blocks less alike than pre's
        if f.tokens:
            (c,) = expand(plan, [f])[-1:]
            span = c.cfg.model.scheme.value == "span"
            probe = {"adjacent_cosine": [0.9 if span else 0.99] * 2, "layer_drop": [0.05 if span else 0.001] * 2}
            probe |= {"presum_rms": [{"attn": 1.0}], "stream_rms": [1.0], "grad_ratio_first_last": 1.0}
            (tmp_path / "cells" / c.name / "probe.json").write_text(json.dumps(probe))
    text = verdicts_report(plan, found, tmp_path, {}, init=[])
    assert (
        "Less collapse after training (claim 5, R5): supported.** L=2, at each best lr: adjacent cosine pre 0.990"
        in text
    )
    assert "All of the above in MoE models (claim 6, R6): inconclusive.** the study has no MoE points" in text


def test_the_moe_claim_is_judged_on_the_moe_points(corpus, tmp_path):
    from spannorm.study.verdicts import verdicts_report

    data = search_study(corpus, warm_start="model.n_experts")  # (the old flat key, as fair-study.yaml: still read)
    data["grids"][0]["axes"] = {
        "model.scheme": ["span", "pre"],
        "model.n_experts": [0, 2],
        "model.n_layers": [2],
        "train.seed": [1],
    }
    plan = plan_study(study_from_dict(data))

    def loss(cell):  # span 0.3 below pre, dense or MoE; seeds 0.01 apart
        return bowl(cell) + (0.3 if cell.cfg.model.scheme.value == "pre" else 0) + 0.01 * cell.cfg.train.seed

    fake_train(plan, tmp_path, loss=loss)
    text = verdicts_report(plan, searches(plan, tmp_path), tmp_path, {}, init=[])
    dense, moe = (line for line in text.splitlines() if "(claim 4, R3)" in line or "(claim 6, R6)" in line)
    assert "supported.** n_experts=0, n_layers=2: span better" in dense and "n_experts=2" not in dense
    # R3 on the MoE point holds; R5's collapse has no probes here: claim 6 stays inconclusive
    assert "inconclusive.** supported: n_experts=2, n_layers=2: span better | inconclusive: no depth" in moe


def test_a_search_beside_a_plain_grid_shares_its_cells(corpus, tmp_path):
    data = search_study(corpus)
    axes = {"model.scheme": ["pre"], "model.n_layers": [2], "train.lr": [4e-3, 1e-3], "train.seed": [1]}
    plain = {"name": "plain", "axes": axes}
    data["grids"].insert(0, plain)
    plan = plan_study(study_from_dict(data))
    fake_train(plan, tmp_path)
    pre = next(
        s for s in searches(plan, tmp_path) if s.point == {"model.scheme": "pre", "model.n_layers": 2, "train.seed": 1}
    )
    assert tuple(pre.values(pre.best).values()) == (1.6e-2, 0.5)
    cells = {c.name: c for c in expand(plan, search_follow(searches(plan, tmp_path)))}
    assert cells["pre_L2_lr0.004_s1"].grids == ["plain", "fair"]  # one cell, in both grids
    assert "pre_L2_lr0.001_s1" in cells and len(cells) == len(set(cells))


def test_a_recipe_that_does_not_train_at_the_best_lr_is_a_handicap(corpus, tmp_path):
    """R1 in the report: the recipe's cell (init scale 1) at the best lr stalled, the best is at another scale: the
    recipe handicaps its scheme (the report said "—", as if there were nothing to say; fair study, post at L = 48)."""
    from spannorm.study.search import recipe_gap, recipe_text

    def status(c):
        return "stalled" if c.cfg.model.scheme.value == "pre" and c.cfg.model.init_scale == 1 else "ok"

    plan = plan_study(study_from_dict(search_study(corpus, warm_start=None)))
    fake_train(plan, tmp_path, status=status)
    pre, span = (next(s for s in searches(plan, tmp_path) if s.point["model.scheme"] == k) for k in ("pre", "span"))
    assert recipe_gap(pre) == math.inf and recipe_text(pre) == "stalled **handicap**"
    assert recipe_gap(span) == pytest.approx(1.0) and recipe_text(span) == "+1.000 **handicap**"  # (scale 1 vs 2)


def test_a_searched_studys_plots_show_each_scheme_at_its_best_init_scale(corpus, tmp_path):
    """Issue 32: a searched study's val_vs_lr draws one line per scheme at its best init scale at each lr (every
    init_scale tried was a line of its own); best_lr.png, which drew every variant, is not drawn (and an earlier
    report's is removed, not left to be read as this one's)."""
    from spannorm.study.plots import best_over_init, plot_study
    from spannorm.study.results import cell_result

    def status(c):  # pre at scale 0.5 (its best elsewhere) stalls at lr 8e-3: the best of the rest is taken there
        bad = c.cfg.model.scheme.value == "pre" and c.cfg.model.init_scale == 0.5 and c.cfg.train.lr == 8e-3
        return "stalled" if bad else "ok"

    plan = plan_study(study_from_dict(search_study(corpus, warm_start=None, confirm=None)))
    fake_train(plan, tmp_path, status=status)
    cells = expand(plan, search_follow(searches(plan, tmp_path)))
    rows = [cell_result(c, tmp_path) for c in cells]
    best = best_over_init(cells, rows)
    for (where, scheme, depth, lr), (_, group) in best.items():
        assert where == ""
        mine = [(r, c) for r, c in zip(rows, cells) if c.depth_lr == (depth, lr) and c.cfg.model.scheme.value == scheme]
        trained = [r for r, _ in mine if r["status"] == "ok"]
        assert group.mean == min(r["final_val_loss"] for r in trained)
    assert best[("", "pre", 2, 1.6e-2)][0] == 0.5 and best[("", "span", 3, 2e-3)][0] == 2.0
    tried = {c.cfg.model.init_scale for c in cells if c.name.startswith("pre_L2_lr0.008_")}
    assert 0.5 in tried and len(tried) > 1 and best[("", "pre", 2, 8e-3)][0] != 0.5  # (0.5 stalled there)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "best_lr.png").write_bytes(b"an earlier report's")
    assert plot_study(tmp_path, cells, rows) == ["plots/val_vs_depth.png", "plots/val_vs_lr.png"]
    assert not (tmp_path / "plots" / "best_lr.png").exists()


def test_the_transfer_table_says_whether_the_best_lr_moves_along_the_warm_start(corpus, tmp_path):
    """Issue 30: a one-axis lr search with a warm start reports its best at each value of that axis; pre's optimum
    stays put (transfers), span's moves × 4 from L = 2 to L = 4 (moves)."""
    from spannorm.study.plots import plot_transfer
    from spannorm.study.search import transfer_report

    grid = {"axes": {"model.scheme": ["pre", "span"], "model.n_layers": [2, 3, 4], "train.seed": [1]}}
    grid["search"] = {"train.lr": {"start": 4e-3, "min": 5e-4, "max": 6.4e-2}}
    plan = plan_study(study_from_dict(search_study(corpus, **grid, confirm=None)))

    def loss(cell):
        m, lr = cell.cfg.model, cell.cfg.train.lr
        best = 8e-3 if m.scheme.value == "pre" else 2e-3 * 2 ** (m.n_layers - 2)
        return 2 + math.log2(lr / best) ** 2

    fake_train(plan, tmp_path, loss=loss)
    table = transfer_report(searches(plan, tmp_path))
    pre, span = (next(r for r in table.splitlines() if r.startswith(f"| scheme={s} ")) for s in ("pre", "span"))
    assert "| 0.008 | 0.008 | 0.008 | +0 | transfers |" in pre
    assert "| 0.002 | 0.004 | 0.008 | +2 | moves |" in span
    assert "Grid fair (along n_layers)" in table
    found = searches(plan, tmp_path)
    assert plot_transfer(tmp_path / "transfer.png", found) and (tmp_path / "transfer.png").stat().st_size > 0
    assert not plot_transfer(tmp_path / "none.png", [s for s in found if s.grid.warm_start is None])


def test_the_report_of_grids_that_search_different_axes(corpus, tmp_path):
    """Issue 31: a grid that searches lr × init scale beside one that searches the lr alone (fair-peers-2026's nGPT,
    whose init scale changes nothing): one summary table, — where a grid has no such axis (nor R1's recipe gap),
    each history on its own axes."""
    from spannorm.study.search import search_report

    data = search_study(corpus, confirm=None)
    data["grids"][0]["axes"] = {"model.scheme": ["pre"], "model.n_layers": [2], "train.seed": [1]}
    data["grids"].append(
        {
            "name": "lr-only",
            "axes": {"model.scheme": ["span"], "model.n_layers": [2], "train.seed": [1]},
            "search": {"train.lr": {"start": 4e-3, "min": 5e-4, "max": 6.4e-2}},
        }
    )
    plan = plan_study(study_from_dict(data))
    fake_train(plan, tmp_path)
    found = searches(plan, tmp_path)
    cells = expand(plan, search_follow(found))
    text = search_report(found, cells, [{} for _ in cells])
    head, pre, span = (line for line in text.splitlines()[:4] if not line.startswith("|---"))
    assert "| best lr | best init_scale |" in head and "| recipe (init_scale=1) − best, at the best lr |" in head
    assert "| 0.016 | 0.5 |" in pre and "| 0.002 | — |" in span and "| — | — |" in span  # (no scale; no R1 gap)
    assert "init_scale \\ lr |" in text.split("span (")[0] and "\n|  | 0.001 | 0.002 | 0.004 |" in text
