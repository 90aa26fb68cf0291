"""The study report's SpanNorm scaling section and ablation plot include the default span of another grid
(not only the cells of a span_scale/span_c grid), and claim 4's Δ states its sign. Made-up results, no training."""

import pytest

from spannorm.study import expand, lr_sensitivity, plan_study, study_from_dict
from spannorm.study.claims import claim_quality
from spannorm.study.plots import plot_ablation
from spannorm.study.results import SeedGroup

LO, HI = 1e-3, 1e-2
DEFAULT = "span span_scale=norm span_c=1"  # the default span (model_config's span.scale and span.c)


def study(corpus, scalings=("init", "multiplier")):
    """A study shaped like configs/studies/lr.yaml: a span_scale grid, and a main grid whose span is the
    default; L=2 and L=3 in main, only L=3 in the ablation; main also has an MoE span grid at L=3."""
    lrs = [LO, HI]
    return {
        "base": "tiny",
        "set": [f"data.corpus={corpus}"],
        "tokens_per_cell": 2560,
        "grids": [
            {
                "name": "abl",
                "axes": {
                    "model.scheme": ["span"],
                    "model.span_scale": list(scalings),  # (the old flat keys, as the committed lr study: still read)
                    "model.n_layers": [3],
                    "train.lr": lrs,
                    "train.seed": [1],
                },
            },
            {
                "name": "main",
                "axes": {
                    "model.scheme": ["span", "pre"],
                    "model.n_layers": [2, 3],
                    "train.lr": lrs,
                    "train.seed": [1, 2],
                },
            },
            {
                "name": "moe",
                "axes": {
                    "model.scheme": ["span"],
                    "model.n_layers": [3],
                    "train.lr": lrs,
                    "train.seed": [1],
                    "model.n_experts": [4],
                },
            },
        ],
    }


# val loss at (lo, hi) by (scheme, span_scale, MoE?); a value above 3.2 is a stalled cell
VALS = {
    ("pre", "norm", False): (2.0, 2.5),
    ("span", "norm", False): (1.9, 2.2),  # the default: trains at the high lr, below pre
    ("span", "init", False): (1.8, 3.3),  # stalls at the high lr
    ("span", "multiplier", False): (1.85, 2.65),  # trains, above pre
    ("span", "norm", True): (1.0, 1.0),  # MoE: must not count as a dense scaling
}


def made_up_rows(cells, seed2_delta=0.2):
    """results.csv rows from VALS; the seed-2 cells' losses are higher by ``seed2_delta``."""
    rows = []
    for c in cells:
        m, t = c.cfg.model, c.cfg.train
        v = VALS[(m.scheme.value, m.span.scale.value, m.moe.enabled)][0 if t.lr < 5e-3 else 1]
        v += seed2_delta if t.seed == 2 else 0.0
        rows.append({"status": "stalled" if v > 3.2 else "ok", "final_val_loss": v})
    return rows


def table_lines(text):
    return {r.split(" | ")[0].lstrip("| "): r for r in text.splitlines() if r.startswith("| ")}


def test_lr_sensitivity_includes_the_default_span_of_another_grid(corpus):
    cells = expand(plan_study(study_from_dict(study(corpus))))
    assert any(c.series == "span" and c.grids == ["main"] for c in cells)  # the default span: no span_scale axis
    text = lr_sensitivity(cells, made_up_rows(cells))
    assert "At L=3, between lr=0.001 and lr=0.01" in text and "At L=2" not in text  # the ablation's depth only
    line = table_lines(text)
    assert list(line) == [
        "series",
        "pre",
        "span span_scale=init span_c=1",
        "span span_scale=multiplier span_c=1",
        DEFAULT,
    ]
    # seeds 1 and 2 of main (1.9 and 2.1; 2.2 and 2.4): mean ± std over both
    assert line[DEFAULT].endswith("| 2.000 ± 0.141 | 2.300 ± 0.141 | +0.300 | yes |")
    assert line["span span_scale=init span_c=1"].endswith("| 3.300 stalled (1/1) | — | no |")
    assert line["span span_scale=multiplier span_c=1"].endswith("| 2.650 | +0.800 | no |")
    assert "at most PreNorm's 2.600): `span span_scale=norm span_c=1`." in text
    assert "1.000" not in text  # the MoE span cells are not a dense scaling
    # a default span cell not run yet makes the answer provisional
    rows = made_up_rows(cells)
    rows[next(i for i, c in enumerate(cells) if c.series == "span" and c.depth_lr == (3, HI))]["status"] = "not run"
    assert "so far; some cells are not run yet." in lr_sensitivity(cells, rows)
    # no span_scale or span_c grid: no section, though main has the default span
    rest = [(c, r) for c, r in zip(cells, made_up_rows(cells)) if "abl" not in c.grids]
    assert lr_sensitivity([c for c, _ in rest], [r for _, r in rest]) == ""


def test_a_cell_of_both_grids_counts_once(corpus):
    """The ablation's span_scale=norm cells are main's default span_L3 seed-1 cells: one cell each, in both grids."""
    cells = expand(plan_study(study_from_dict(study(corpus, scalings=("norm", "init")))))
    shared = [c for c in cells if c.series == "span" and c.cfg.model.n_layers == 3 and c.cfg.train.seed == 1]
    assert [c.grids for c in shared] == [["abl", "main"]] * 2
    line = table_lines(lr_sensitivity(cells, made_up_rows(cells)))
    assert list(line).count(DEFAULT) == 1
    # seed 1 (1.9) and seed 2 (2.1), not seed 1 twice (1.967 ± 0.115)
    assert line[DEFAULT].endswith("| 2.000 ± 0.141 | 2.300 ± 0.141 | +0.300 | yes |")


def test_ablation_plot_draws_the_default_span(corpus, tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    errorbar = matplotlib.axes.Axes.errorbar

    def record(self, *args, **kwargs):
        drawn.append(kwargs.get("label"))
        return errorbar(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", record)
    cells = expand(plan_study(study_from_dict(study(corpus))))
    assert plot_ablation(tmp_path / "ablation.png", cells, made_up_rows(cells))
    assert (tmp_path / "ablation.png").is_file()
    assert sorted(drawn) == sorted(
        ["pre", "span span_scale=init span_c=1", "span span_scale=multiplier span_c=1", DEFAULT]
    )


def group(*vals):
    return SeedGroup([], [{"status": "ok", "final_val_loss": v} for v in vals])


@pytest.mark.parametrize("extras", [{}, {"model.n_experts": 4}])
def test_claim_quality_states_the_sign_of_its_difference(extras):
    pre, span = ("pre", "span") if not extras else ("pre n_experts=4", "span n_experts=4")
    points = {
        (pre, 3, LO): group(2.0, 2.2),
        (span, 3, LO): group(1.9, 2.1),  # span lower: pre − span = +0.1
        (pre, 3, HI): group(2.0, 2.0),
        (span, 3, HI): group(2.5, 2.5),  # span higher: -0.5
    }
    c = claim_quality(points, extras)
    assert "(Δ(pre − span)=+0.100, std 0.141)" in c.evidence and "(Δ(pre − span)=-0.500, std 0.000)" in c.evidence
    assert "Δ=" not in c.evidence
    assert c.evidence.count(f"positive means {span} is lower") == 1
    assert c.rule == (
        f"at each (depth, lr) with finite losses for both, {span} wins if its mean val loss is below {pre}'s "
        "by more than the larger seed std, loses if above by more; supported if it wins at more than half of "
        "the points, not supported if it loses at half or more, else inconclusive; needs 2+ seeds"
    )


def test_a_study_without_span_cells_judges_no_claim(corpus):
    """A study of other schemes only (post's seeds, the 2026 peers) judged SpanNorm's claims from init probes alone
    ("Bounded gradients: supported" in a post-only study): it now says it judges none."""
    from spannorm.study import Claim, report

    data = study(corpus)
    data["grids"] = [{**data["grids"][1], "name": "main"}]
    claim = [("Bounded gradients", Claim("supported", "at init only", "a rule"))]
    for schemes, judged in ((["span", "pre"], True), (["pre"], False)):
        data["grids"][0]["axes"]["model.scheme"] = schemes
        plan = plan_study(study_from_dict(data))
        cells = expand(plan)
        counts = {"trained": 0, "reused": 0, "failed": 0}
        for verdicts in ("", "- **Bounded gradients (claim 2, R5): supported.**"):  # (a searched study's own rules)
            text = report(plan, cells, made_up_rows(cells), "cmd", [], claim, counts, verdicts=verdicts)
            section = text.split("## Claims (SPANNORM.md)")[1].split("## Base config")[0]
            assert ("Bounded gradients" in section) == judged
            assert ("trains no SpanNorm (`span`) cell, so it judges none" in section) == (not judged)
