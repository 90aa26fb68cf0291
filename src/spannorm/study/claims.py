"""The six claims of SPANNORM.md, each with a verdict from an explicit rule over a study's data, and the
probes of freshly initialized models that claims 1 and 2 also read (init_probe.json)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import from_dict, legacy_view, to_dict
from ..data import TokenData, prepare
from ..files import atomic_write_text, dumps
from ..model import build_model
from ..model_config import ModelConfig
from ..output import num
from ..probe import probe
from ..run import init_record
from ..run_config import RunConfig
from .grid import PROBE_BATCH, Cell, canonical, series_label
from .results import aggregate, read_probe

# --- init probe (claims 1 and 2) -----------------------------------------------------------

INIT_VARIANTS = {
    "pre": {"scheme": "pre"},
    "post": {"scheme": "post"},
    "span": {"scheme": "span"},
    "span span_scale=none": {"scheme": "span", "span": {"scale": "none"}},
}


# fields added after studies cached their probes, left out of the key at their defaults (their caches stay valid)
LATER_DEFAULTS = {
    ("text_field", "text"),
    ("name_field", None),
    ("qk_norm", None),
    ("hc_streams", 4),
    ("parametrization", "standard"),
    ("base_width", None),
    ("base_depth", None),
}


def variant(model: ModelConfig, depth: int, change: dict) -> ModelConfig:
    """``model`` at ``depth`` with the fields of ``change`` (a group's: a mapping of some of its fields) changed."""
    d = to_dict(model) | {"n_layers": depth}
    return from_dict(ModelConfig, d | {k: d[k] | v if isinstance(v, dict) else v for k, v in change.items()}, "model")


def init_probe(cfg: RunConfig, depths: list[int], path: Path, compute: bool = True) -> list[dict] | None:
    """:func:`spannorm.probe.probe` of fresh models (pre, post, span, span without scaling) at the study's
    depths and model size (``cfg``: the study's base config); cached in ``path`` for the same inputs. Without
    ``compute`` (``--report-only``), a missing or stale cache is None: nothing is probed. The cache also records
    each probed model's init stds (``init``): a cache whose recipes the code has changed since is stale (caches
    made before that record are judged by their key alone)."""
    key = {  # (the model and the variants as they were before the option groups: the keys caches hold)
        "model": {k: v for k, v in legacy_view("model", to_dict(cfg.model)).items() if (k, v) not in LATER_DEFAULTS},
        "data": {k: v for k, v in to_dict(cfg.data).items() if (k, v) not in LATER_DEFAULTS},
        "seed": cfg.train.seed,
        "seq_len": cfg.train.seq_len,
        "depths": depths,
        "variants": {label: legacy_view("model", change) for label, change in INIT_VARIANTS.items()},
    }
    models = {
        (label, depth): variant(cfg.model, depth, change) for label, change in INIT_VARIANTS.items() for depth in depths
    }
    init = [init_record(m) for m in models.values()]
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key and cached.get("init", init) == init:
            return cached["runs"]
    if not compute:
        return None
    x, y = next(TokenData(prepare(cfg.data), cfg.train.seq_len).val_batches(PROBE_BATCH, 1))
    runs = []
    for (label, _), model_cfg in models.items():
        torch.manual_seed(cfg.train.seed)
        model = build_model(model_cfg)
        row = probe(model, x, y)
        runs.append(
            {
                "variant": label,
                **{
                    k: row[k]
                    for k in ("depth", "stream_rms", "presum_rms", "grad_ratio_first_last", "skip_gain_measured")
                },
            }
        )
    atomic_write_text(path, dumps({"key": key, "init": init, "runs": runs}))
    return runs


# --- claims --------------------------------------------------------------------------------

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclass
class Claim:
    """One claim's verdict (SUPPORTED, NOT_SUPPORTED or INCONCLUSIVE), the evidence, and the rule that decided it."""

    verdict: str
    evidence: str
    rule: str


def _max_presum(p: dict) -> float:
    return max(v for block in p["presum_rms"] for v in block.values())


def claim_stability(points: dict, extras: dict) -> Claim:
    post, span = series_label("post", extras), series_label("span", extras)
    rule = (
        f"supported if at every (depth, lr) where {post} diverged or stalled in most seeds, {span} trained "
        "(neither diverged nor stalled in most seeds); inconclusive if there is no such point"
    )
    bad = sorted(k[1:] for k, a in points.items() if k[0] == post and a.failed)
    if not any(k[0] == post for k in points) or not any(k[0] == span for k in points):
        return Claim(INCONCLUSIVE, f"the study has no {post} or no {span} cells", rule)
    if not bad:
        return Claim(INCONCLUSIVE, f"{post} neither diverged nor stalled at any (depth, lr)", rule)
    ev, ok = [], []
    for d, lr in bad:
        p, s = points[(post, d, lr)], points.get((span, d, lr))
        trained = s is not None and not s.failed
        ok.append(trained)
        ev.append(
            f"L={d}, lr={lr:g}: {post} {p.text()}; {span} "
            + ("(no cell)" if s is None else s.text() + (" — trained" if trained else " — failed too"))
        )
    return Claim(SUPPORTED if all(ok) else NOT_SUPPORTED, "; ".join(ev), rule)


def _best_lr_evidence(points: dict, pre: str, span: str) -> str:
    """Evidence beside the rule: each depth's best (lowest mean val loss) lr of either series, among those
    that trained."""
    best = {}
    for (series, d, lr), a in points.items():
        if series in (pre, span) and a.mean is not None and not a.failed:
            if (series, d) not in best or a.mean < best[(series, d)][0]:
                best[(series, d)] = (a.mean, lr)
    depths = sorted({d for s, d in best if (pre, d) in best and (span, d) in best})
    return (
        ""
        if not depths
        else ". At each depth's best lr: "
        + "; ".join(
            f"L={d}: {pre} {best[(pre, d)][0]:.3f} (lr={best[(pre, d)][1]:g}), {span} {best[(span, d)][0]:.3f} "
            f"(lr={best[(span, d)][1]:g})"
            for d in depths
        )
    )


def claim_quality(points: dict, extras: dict) -> Claim:
    pre, span = series_label("pre", extras), series_label("span", extras)
    rule = (
        f"at each (depth, lr) with finite losses for both, {span} wins if its mean val loss is below {pre}'s "
        "by more than the larger seed std, loses if above by more; supported if it wins at more than half of "
        "the points, not supported if it loses at half or more, else inconclusive; needs 2+ seeds"
    )
    common = sorted(k[1:] for k in points if k[0] == span and (pre, *k[1:]) in points)
    rows, wins, losses, one_seed = [], 0, 0, False
    for d, lr in common:
        a, b = points[(pre, d, lr)], points[(span, d, lr)]
        if a.mean is None or b.mean is None:
            rows.append(f"L={d}, lr={lr:g}: {pre} {a.text()}, {span} {b.text()}")
            continue
        if a.std is None or b.std is None:
            one_seed = True
        noise = max(a.std or 0.0, b.std or 0.0)
        diff = a.mean - b.mean
        wins += diff > noise
        losses += -diff > noise
        spread = "one seed" if a.std is None and b.std is None else f"std {noise:.3f}"
        rows.append(f"L={d}, lr={lr:g}: {pre} {a.mean:.3f}, {span} {b.mean:.3f} (Δ(pre − span)={diff:+.3f}, {spread})")
    scored = sum(
        1 for d, lr in common if points[(pre, d, lr)].mean is not None and points[(span, d, lr)].mean is not None
    )
    if not scored:
        return Claim(INCONCLUSIVE, "; ".join(rows) or f"no (depth, lr) with both {pre} and {span}", rule)
    ev = (
        f"{span} lower at {wins}/{scored}, higher at {losses}/{scored} (Δ(pre − span) is {pre}'s mean val loss "
        f"minus {span}'s: positive means {span} is lower): " + "; ".join(rows) + _best_lr_evidence(points, pre, span)
    )
    if one_seed:
        return Claim(INCONCLUSIVE, "fewer than 2 finite seeds somewhere, so the seed noise is unknown; " + ev, rule)
    verdict = SUPPORTED if wins > scored / 2 else NOT_SUPPORTED if losses >= scored / 2 else INCONCLUSIVE
    return Claim(verdict, ev, rule)


def claim_collapse(cells: list[Cell], out: Path, extras: dict, ok: set[str], at_best: bool = False) -> Claim:
    """``at_best``: each series' cells are at its own best lr (a search's confirmation), compared as one lr."""
    pre, span = series_label("pre", extras), series_label("span", extras)
    per = "at each one's best lr" if at_best else "per lr"
    rule = (
        f"at the deepest depth with probes of both that trained (neither diverged nor stalled: a stalled model's "
        f"layers say nothing about collapse), {per} (mean over seeds): {span} is less collapsed if its "
        "mean adjacent cosine over the deeper half of the blocks is lower AND its mean layer-drop loss increase "
        f"there is higher than {pre}'s; supported if so at more than half of the lrs, not supported if both "
        "favour PreNorm at half or more, else inconclusive"
    )
    probes: dict = {}
    for c in cells:
        if c.series in (pre, span) and c.name in ok and (p := read_probe(out, c)) and p.get("layer_drop"):
            probes.setdefault((c.series, c.cfg.model.n_layers, None if at_best else c.cfg.train.lr), []).append(p)
    depths = sorted({k[1] for k in probes if (pre, *k[1:]) in probes and (span, *k[1:]) in probes})
    if not depths:
        return Claim(INCONCLUSIVE, f"no depth with trained-model probes of both {pre} and {span}", rule)
    depth = depths[-1]
    lrs = sorted(
        {k[2] for k in probes if k[1] == depth and (pre, depth, k[2]) in probes and (span, depth, k[2]) in probes},
        key=lambda x: x or 0.0,
    )

    def deep(ps: list[dict], key: str) -> float:
        return statistics.fmean(statistics.fmean(p[key][len(p[key]) // 2 :]) for p in ps)

    ev, good, bad = [], 0, 0
    for lr in lrs:
        a, b = probes[(pre, depth, lr)], probes[(span, depth, lr)]
        cos_a, cos_b = deep(a, "adjacent_cosine"), deep(b, "adjacent_cosine")
        drop_a, drop_b = deep(a, "layer_drop"), deep(b, "layer_drop")
        good += cos_b < cos_a and drop_b > drop_a
        bad += cos_b >= cos_a and drop_b <= drop_a
        where = "at each best lr" if lr is None else f"lr={lr:g}"
        ev.append(
            f"L={depth}, {where}: adjacent cosine {pre} {cos_a:.3f} vs {span} {cos_b:.3f}, "
            f"layer drop {pre} {drop_a:.4f} vs {span} {drop_b:.4f}"
        )
    verdict = SUPPORTED if good > len(lrs) / 2 else NOT_SUPPORTED if bad >= len(lrs) / 2 else INCONCLUSIVE
    return Claim(verdict, "; ".join(ev), rule)


def _left_out(cells: list[Cell], out: Path, ok: set[str], schemes: tuple[str, ...], value) -> str:
    """Evidence from the probes of diverged or stalled cells, which the trained-model rules leave out."""
    bad = [
        f"{c.name} {num(value(p))}"
        for c in cells
        if c.name not in ok and not c.extras and c.cfg.model.scheme.value in schemes and (p := read_probe(out, c))
    ]
    return ("; left out, diverged or stalled: " + ", ".join(bad)) if bad else ""


def _by_depth(values: dict[int, float]) -> str:
    """``{depth: value}`` as "L=12: 1.09, L=48: 1.05"; "none yet" where there is none (no empty list)."""
    return ", ".join(f"L={d}: {v:.3g}" for d, v in sorted(values.items())) or "none yet"


def claim_signal(cells: list[Cell], out: Path, init: list[dict], ok: set[str]) -> Claim:
    rule = (
        "needs 2+ depths; supported if SpanNorm's largest pre-norm-sum RMS (probes of the cells that trained, "
        "i.e. neither diverged nor stalled; mean over lrs and seeds) at the deepest depth is at most 2× that at the "
        "shallowest AND PreNorm's final stream RMS grows "
        "by at least 1.5× from the shallowest to the deepest; not supported if SpanNorm's grows by more than 2×; "
        "else inconclusive (init numbers are shown beside, for reference)"
    )
    trained: dict = {}
    for c in cells:
        if not c.extras and c.name in ok and c.cfg.model.scheme.value in ("pre", "span") and (p := read_probe(out, c)):
            trained.setdefault((c.cfg.model.scheme.value, c.cfg.model.n_layers), []).append(p)
    span_max = {d: statistics.fmean(_max_presum(p) for p in ps) for (s, d), ps in trained.items() if s == "span"}
    pre_rms = {d: statistics.fmean(p["stream_rms"][-1] for p in ps) for (s, d), ps in trained.items() if s == "pre"}
    init_span = {r["depth"]: _max_presum(r) for r in init if r["variant"] == "span"}
    init_pre = {r["depth"]: r["stream_rms"][-1] for r in init if r["variant"] == "pre"}
    ev = (
        f"trained: span max pre-norm-sum RMS {_by_depth(span_max)}; pre final stream RMS {_by_depth(pre_rms)}. "
        f"At init: span {_by_depth(init_span)}; pre {_by_depth(init_pre)}"
        + _left_out(cells, out, ok, ("span",), _max_presum)
    )
    if len(span_max) < 2 or len(pre_rms) < 2:
        return Claim(INCONCLUSIVE, "fewer than 2 depths with trained probes of both pre and span. " + ev, rule)
    lo, hi = min(span_max), max(span_max)
    span_growth = span_max[hi] / span_max[lo]
    pre_growth = pre_rms[max(pre_rms)] / pre_rms[min(pre_rms)]
    ev = f"span grows {span_growth:.2f}×, pre {pre_growth:.2f}× (L={lo}→{hi}). " + ev
    if span_growth > 2:
        return Claim(NOT_SUPPORTED, ev, rule)
    return Claim(SUPPORTED if pre_growth >= 1.5 else INCONCLUSIVE, ev, rule)


def claim_gradients(cells: list[Cell], out: Path, init: list[dict], ok: set[str]) -> Claim:
    rule = (
        "supported if SpanNorm's first/last-block gradient-norm ratio stays within 10× of 1 at every depth "
        "(init probes, and probes of the cells that trained, i.e. neither diverged nor stalled) AND, at the deepest "
        "depth, PostNorm's or unscaled SpanNorm's is at least "
        "100× away from 1 (init or trained); not supported if SpanNorm's leaves the 10× band; else inconclusive"
    )
    deepest = max((r["depth"] for r in init), default=0)
    span_r = [r["grad_ratio_first_last"] for r in init if r["variant"] == "span"]
    other_r = [
        r["grad_ratio_first_last"]
        for r in init
        if r["variant"] in ("post", "span span_scale=none") and r["depth"] == deepest
    ]
    ev = ["at init: " + ", ".join(f"{r['variant']} L={r['depth']}: {num(r['grad_ratio_first_last'])}" for r in init)]
    trained_span, trained_other = [], []
    for c in cells:
        scheme = c.cfg.model.scheme.value
        if (p := read_probe(out, c)) is None:
            continue
        if scheme == "span" and not c.extras and c.name in ok:
            trained_span.append(p["grad_ratio_first_last"])
        elif c.cfg.model.n_layers == deepest and (
            (scheme == "post" and not c.extras)
            or (scheme == "span" and canonical(c.extras) == {"model.span.scale": "none"})
        ):
            trained_other.append(p["grad_ratio_first_last"])
    span_r += trained_span
    other_r += trained_other
    ev.append(
        "trained: span "
        + (", ".join(num(x) for x in trained_span) or "—")
        + f"; post and unscaled span at L={deepest} "
        + (", ".join(num(x) for x in trained_other) or "—")
        + _left_out(cells, out, ok, ("span",), lambda p: p["grad_ratio_first_last"])
    )

    def off(x: float) -> float:
        return abs(math.log10(x)) if x and math.isfinite(x) and x > 0 else math.inf

    if not span_r:
        return Claim(INCONCLUSIVE, "no probe of span", rule)
    if max(off(x) for x in span_r) > 1:
        return Claim(NOT_SUPPORTED, "; ".join(ev), rule)
    return Claim(SUPPORTED if other_r and max(off(x) for x in other_r) >= 2 else INCONCLUSIVE, "; ".join(ev), rule)


def trains_span(cells: list[Cell]) -> bool:
    """Whether a study has SpanNorm cells: only then does it judge SPANNORM.md's claims (each compares span)."""
    return any(c.cfg.model.scheme == "span" for c in cells)


def claims(cells: list[Cell], rows: list[dict], out: Path, init: list[dict]) -> list[tuple[str, Claim]]:
    """The six claims of SPANNORM.md, each with a verdict from an explicit rule over the study's data."""
    points = aggregate(cells, rows, lambda c: (c.series, *c.depth_lr))
    ok = {c.name for c, r in zip(cells, rows) if r.get("status") == "ok"}  # trained: neither diverged nor stalled
    dense = {}
    experts = [canonical(c.extras).get("model.moe.n_experts") for c in cells]
    moe_values = sorted({k for k in experts if isinstance(k, int) and k > 0})
    result = [
        ("Bounded forward signal", claim_signal(cells, out, init, ok)),
        ("Bounded gradients", claim_gradients(cells, out, init, ok)),
        ("Stability where PostNorm diverges or stalls", claim_stability(points, dense)),
        ("Quality: lower validation loss than PreNorm at equal compute", claim_quality(points, dense)),
        ("Less collapse after training", claim_collapse(cells, out, dense, ok)),
    ]
    moe_rule = (
        "claims 3–5 restricted to the MoE cells (a model.n_experts axis > 0; claim 3 only if the MoE cells "
        "include post): supported if all are, not supported if any is not, else inconclusive"
    )
    if not moe_values:
        result.append(("All of the above in MoE models", Claim(INCONCLUSIVE, "the study has no MoE cells", moe_rule)))
    else:
        sub = []
        for k in moe_values:
            ex = {"model.moe.n_experts": k}
            has_post = any(key[0] == series_label("post", ex) for key in points)
            sub += ([claim_stability(points, ex)] if has_post else []) + [
                claim_quality(points, ex),
                claim_collapse(cells, out, ex, ok),
            ]
        verdicts = [c.verdict for c in sub]
        verdict = (
            SUPPORTED
            if all(v == SUPPORTED for v in verdicts)
            else NOT_SUPPORTED
            if NOT_SUPPORTED in verdicts
            else INCONCLUSIVE
        )
        result.append(
            (
                "All of the above in MoE models",
                Claim(verdict, " | ".join(f"{c.verdict}: {c.evidence}" for c in sub), moe_rule),
            )
        )
    return result
