"""The verdicts of a searched study (fair-study.yaml's rules R1–R4), from its searches and confirmation cells.

R1 (recipes) is :func:`spannorm.study.search.recipe_gap` in the searches' table. This module applies:
  R2  SpanNorm against X at every point where both have finished confirmation cells: Δ = mean(X) − mean(span)
      over the confirm seeds, s = the larger seed std; "span better" if Δ > s and the searches' best cells (the
      search seed, the search budget) also have Δ > 0; "span worse" if Δ < −s and the search's Δ < 0; else "no
      difference". X is pre and the best peer (a grid's ``peer``).
  R3  claim 4 (quality): supported if span is better than pre at every point with a verdict, not supported if
      worse at any, else inconclusive (also while points are pending).
  R4  claim 3 (stability where PostNorm fails): over the lattice cells that post and span both ran at one point
      (same depth, lr and init scale), supported if span trained at every one where post diverged or stalled;
      inconclusive if there is none.
  R5  claims 1, 2 and 5 (signal, gradients, collapse): the rules of spannorm.study.claims, on the probes of the
      dense d_model-64 confirmation cells, each series at its own best (claim 5 compares them as one lr).
  R6  claim 6 (MoE): R3, R4 and R5's collapse rule on the MoE points (model.moe.n_experts > 0): supported if all
      are, not supported if any is not, else inconclusive.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from ..config import upgrade_key
from ..output import md_table
from .claims import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Claim, claim_collapse, claim_gradients, claim_signal
from .grid import Cell, Plan, build_cell, canonical, leaf
from .results import cell_result
from .search import FINISHED, Search, best_peer, confirm_follow, confirmed

BETTER, WORSE, SAME, PENDING = "span better", "span worse", "no difference", "pending"


def _vals(rows: list[dict]) -> list[float]:
    return [float(r["final_val_loss"]) for r in rows if r.get("status") == "ok"]


def _search_val(s: Search) -> float | None:
    return None if s.best is None else float(s.tried[s.best][1]["final_val_loss"])


def compare(plan: Plan, span: Search, other: Search, out: Path, failed: dict) -> dict:
    """Rule R2 for one pair of searches at the same point: the verdict and its numbers."""
    a, b = confirmed(plan, span, out, failed), confirmed(plan, other, out, failed)
    result = {"verdict": PENDING, "delta": None, "spread": None, "search_delta": None, "n": None}
    if a is None or b is None:
        return result
    va, vb = _vals(a), _vals(b)
    if len(va) < 2 or len(vb) < 2:  # a series that failed in most seeds: no spread to judge by
        return result | {"verdict": SAME if va or vb else PENDING, "n": (len(va), len(vb))}
    sa, sb = _search_val(span), _search_val(other)
    return judge(va, vb, None if sa is None or sb is None else sb - sa) | {"n": (len(va), len(vb))}


def judge(va: list[float], vb: list[float], search_delta: float | None) -> dict:
    """R2's arithmetic: span's confirmation losses ``va`` (2 or more) against the other's ``vb``, and the other's
    search-seed loss minus span's (``search_delta``; None: unknown): the verdict, Δ and the spread."""
    delta = statistics.fmean(vb) - statistics.fmean(va)
    spread = max(statistics.stdev(va), statistics.stdev(vb))
    verdict = SAME
    if search_delta is not None and delta > spread and search_delta > 0:
        verdict = BETTER
    elif search_delta is not None and delta < -spread and search_delta < 0:
        verdict = WORSE
    return {"verdict": verdict, "delta": delta, "spread": spread, "search_delta": search_delta}


def _key(s: Search) -> tuple:
    return tuple((k, v) for k, v in s.point.items() if k != "model.scheme")


def pairs(plan: Plan, found: list[Search], out: Path, failed: dict) -> list[tuple[str, Search, Search]]:
    """(role, span's search, X's search) for X = pre and X = the best peer, at every point of every grid; a point
    that two grids share (the same cells) once."""
    by = {(s.grid.name, _key(s), s.point.get("model.scheme")): s for s in found}
    out_pairs, seen = [], set()
    spec = next((g.peer for g in plan.study.grids if g.peer is not None), None)  # one best peer for the study
    peer = best_peer(plan, spec, found, out, failed) if spec is not None else None
    for grid in plan.study.grids:
        if not grid.search:
            continue
        for (g, key, scheme), span in by.items():
            if g != grid.name or scheme != "span" or span.state == "waiting":
                continue
            for role, name in (("pre", "pre"), ("best peer", peer)):
                other = by.get((g, key, name)) if name else None
                if other is None or other.state == "waiting":
                    continue
                same = (
                    tuple(sorted(c.name for c, _ in span.tried.values())),
                    tuple(sorted(c.name for c, _ in other.tried.values())),
                )
                if same in seen:  # the same cells in another grid
                    continue
                seen.add(same)
                out_pairs.append((role, span, other))
    return out_pairs


def _where(s: Search) -> str:
    return ", ".join(f"{leaf(k)}={v}" for k, v in s.point.items() if k not in ("model.scheme", "train.seed"))


def comparison_table(plan: Plan, found: list[Search], out: Path, failed: dict) -> tuple[str, list]:
    """Markdown of rule R2 at every point, and the (role, span, other, result) list behind it."""
    rows, results = [], []
    for role, span, other in pairs(plan, found, out, failed):
        r = compare(plan, span, other, out, failed)
        results.append((role, span, other, r))

        def f(x):
            return "—" if x is None else f"{x:+.3f}"

        rows.append(
            [
                _where(span),
                f"{other.point['model.scheme']} ({role})",
                f(r["delta"]),
                "—" if r["spread"] is None else f"{r['spread']:.3f}",
                f(r["search_delta"]),
                r["verdict"],
            ]
        )
    head = ["point", "X", "Δ = X − span, 4× tokens, 3 seeds", "larger seed std", "Δ at the search budget (seed 1)"]
    return (md_table(head + ["verdict (R2)"], rows) if rows else ""), results


def _moe(s: Search) -> bool:
    return bool(canonical(s.point).get("model.moe.n_experts"))


def claim_quality(results: list, moe: bool = False) -> Claim:
    """R3 on the dense points, or (``moe``) on the MoE points."""
    rule = (
        "R3: supported if span is better than pre (R2) at every point, not supported if worse at any, else inconclusive"
    )
    mine = [(span, r) for role, span, _, r in results if role == "pre" and _moe(span) is moe]
    if not mine:
        return Claim(INCONCLUSIVE, "no point with both span and pre searched yet", rule)
    verdicts = [r["verdict"] for _, r in mine]
    ev = "; ".join(f"{_where(s)}: {r['verdict']}" for s, r in mine)
    if WORSE in verdicts:
        return Claim(NOT_SUPPORTED, ev, rule)
    return Claim(SUPPORTED if all(v == BETTER for v in verdicts) else INCONCLUSIVE, ev, rule)


def claim_stability(found: list[Search], moe: bool = False) -> Claim:
    rule = (
        "R4: over the lattice cells post and span both ran at one point (depth, lr, init scale), supported if span "
        "trained wherever post diverged or stalled; inconclusive if post never did"
    )
    by = {(s.grid.name, _key(s), s.point.get("model.scheme")): s for s in found}
    bad, ev = [], []
    for (g, key, scheme), post in by.items():
        span = by.get((g, key, "span"))
        if scheme != "post" or span is None or _moe(post) is not moe:
            continue
        for c, (_, row) in post.tried.items():
            if c in span.tried and row.get("status") in ("diverged", "stalled"):
                s_row = span.tried[c][1]
                if s_row.get("status") not in FINISHED:
                    continue
                ok = s_row.get("status") == "ok"
                bad.append(ok)
                ev.append(f"{_where(post)} at {post.values(c)}: post {row['status']}, span {s_row['status']}")
    if not bad:
        return Claim(INCONCLUSIVE, "post neither diverged nor stalled at any lattice cell that span also ran", rule)
    return Claim(SUPPORTED if all(bad) else NOT_SUPPORTED, "; ".join(ev), rule)


def confirmation_views(plan: Plan, found: list[Search], out: Path, failed: dict) -> tuple[list[Cell], set[str]]:
    """The confirmation cells of every search, once each, seen as their scheme's plain series (extras other than
    model.moe.n_experts dropped, no budget label; cells of another width left out), and the names of those that trained,
    for the rules of spannorm.study.claims."""
    follow = [f for s in found for f in confirm_follow(s)]
    if not follow:
        return [], set()
    views, ok = {}, set()
    for c in (build_cell(plan, f) for f in follow):
        if "model.d_model" in c.extras:
            continue
        extras = {k: v for k, v in c.extras.items() if upgrade_key(k) == "model.moe.n_experts"}
        views[c.name] = dataclasses.replace(c, extras=extras, tokens=None)
        if cell_result(c, out, failed.get(c.name)).get("status") == "ok":
            ok.add(c.name)
    return list(views.values()), ok


def verdicts_report(plan: Plan, found: list[Search], out: Path, failed: dict, init: list[dict]) -> str:
    """Markdown: the R2 table and the six claims by R3–R6 (``init``: the study's init probe, for claims 1 and 2)."""
    table, results = comparison_table(plan, found, out, failed)
    views, ok = confirmation_views(plan, found, out, failed)
    collapse = claim_collapse(views, out, {}, ok, at_best=True)
    moe_values = sorted({v for s in found if (v := canonical(s.point).get("model.moe.n_experts"))})
    moe_rule = (
        "R6: R3, R4 (where the MoE points include post) and R5's collapse rule on the MoE points: supported if all "
        "are, not supported if any is not, else inconclusive"
    )
    if moe_values:
        has_post = any(_moe(s) and s.point.get("model.scheme") == "post" for s in found)
        sub = [claim_quality(results, moe=True)] + ([claim_stability(found, moe=True)] if has_post else [])
        sub += [claim_collapse(views, out, {"model.moe.n_experts": k}, ok, at_best=True) for k in moe_values]
        verdicts = [c.verdict for c in sub]
        verdict = (
            SUPPORTED
            if all(v == SUPPORTED for v in verdicts)
            else NOT_SUPPORTED
            if NOT_SUPPORTED in verdicts
            else INCONCLUSIVE
        )
        moe = Claim(verdict, " | ".join(f"{c.verdict}: {c.evidence}" for c in sub), moe_rule)
    else:
        moe = Claim(INCONCLUSIVE, "the study has no MoE points", moe_rule)
    claims = (
        ("Bounded forward signal (claim 1, R5)", claim_signal(views, out, init, ok)),
        ("Bounded gradients (claim 2, R5)", claim_gradients(views, out, init, ok)),
        ("Stability where PostNorm diverges or stalls (claim 3, R4)", claim_stability(found)),
        ("Quality: lower validation loss than PreNorm (claim 4, R3)", claim_quality(results)),
        ("Less collapse after training (claim 5, R5)", collapse),
        ("All of the above in MoE models (claim 6, R6)", moe),
    )
    lines = ["SpanNorm against pre and the best peer (rule R2 of the study file):", "", table or "(no pair yet)", ""]
    for title, c in claims:
        lines += [f"- **{title}: {c.verdict}.** {c.evidence}", f"  - Rule: {c.rule}."]
    return "\n".join(lines)
