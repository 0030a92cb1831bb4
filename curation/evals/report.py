"""A self-contained HTML report of an eval run: no scripts, no network, inline SVG."""

from __future__ import annotations

import html
from typing import Any

from distillery.curation.evals.items import Item
from distillery.store.records import (
    CandidateSummary,
    EvalRunRecord,
    EvalSampleRecord,
    GraderStats,
    Summary,
)

COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


def bars(grader: str, candidates: dict[str, CandidateSummary]) -> str:
    """Mean score per candidate with its 95% interval as a whisker."""
    labels = list(candidates)
    stats = [candidates[c]["graders"][grader] for c in labels]
    scored = [_scored(s) for s in stats]
    top = max([v[2] for v in scored if v is not None] + [_scale_top(stats)])
    # Left: room for the longest (shortened) label; right: for "0.123 [0.100, 0.150]".
    left = 16 + CHAR_PX * max([len(_short(label)) for label in labels] + [8])
    right = 190
    width, row = left + 420 + right, 34
    height = row * len(labels) + 30
    scale = (width - left - right) / top
    parts = [
        f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(grader)}">'
    ]
    for i, (label, s, values) in enumerate(zip(labels, stats, scored, strict=True)):
        y = 10 + i * row
        colour = COLOURS[i % len(COLOURS)]
        parts.append(
            f'<text x="{left - 8}" y="{y + 17}" text-anchor="end">'
            f"<title>{html.escape(label)}</title>{html.escape(_short(label))}</text>"
        )
        if values is None:  # nothing was scored: no bar, never a zero
            parts.append(
                f'<text x="{left}" y="{y + 17}">no score ({s.get("errors", 0)} errors)</text>'
            )
            continue
        mean, low, high = values
        parts.append(
            f'<rect x="{left}" y="{y + 4}" width="{mean * scale:.1f}" height="18" fill="{colour}"/>'
        )
        lo, hi = left + low * scale, left + high * scale
        parts.append(
            f'<line x1="{lo:.1f}" x2="{hi:.1f}" y1="{y + 13}" y2="{y + 13}" stroke="#222" stroke-width="2"/>'
        )
        parts.append(
            f'<text x="{hi + 6:.1f}" y="{y + 17}">{mean:.3f} [{low:.3f}, {high:.3f}]</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _scatter(grader: str, candidates: dict[str, CandidateSummary]) -> str:
    """Score against cost (or p50 latency when no prices are configured)."""
    use_cost = all(c["cost_usd"] is not None for c in candidates.values())
    unit = "cost, USD" if use_cost else "p50 latency, ms"
    points = [
        (label, (c["cost_usd"] if use_cost else c["latency_p50_ms"]) or 0.0, mean)
        for label, c in candidates.items()
        if (mean := c["graders"][grader]["mean"]) is not None
    ]
    width, height, pad = 720, 280, 70
    max_x = max([p[1] for p in points] + [1e-9])
    max_y = max(
        [p[2] for p in points] + [_scale_top([c["graders"][grader] for c in candidates.values()])]
    )
    parts = [
        f'<svg width="{width}" height="{height}" role="img">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - 20}" y2="{height - pad}" stroke="#888"/>',
        f'<line x1="{pad}" y1="20" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
        f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle">{unit}</text>',
        f'<text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" text-anchor="middle">{html.escape(grader)}</text>',
    ]
    plot_w, plot_h = width - pad - 40, height - pad - 30
    for fraction in (0.0, 0.5, 1.0):  # tick values on both axes
        tx, ty = pad + plot_w * fraction, height - pad - plot_h * fraction
        parts.append(
            f'<line x1="{tx:.1f}" y1="{height - pad}" x2="{tx:.1f}" y2="{height - pad + 5}" stroke="#888"/>'
            f'<text x="{tx:.1f}" y="{height - pad + 18}" text-anchor="middle">{max_x * fraction:.3g}</text>'
            f'<line x1="{pad - 5}" y1="{ty:.1f}" x2="{pad}" y2="{ty:.1f}" stroke="#888"/>'
            f'<text x="{pad - 8}" y="{ty + 4:.1f}" text-anchor="end">{max_y * fraction:.3g}</text>'
        )
    order = list(candidates)
    for label, x, y in points:
        cx = pad + plot_w * (x / max_x)
        cy = height - pad - plot_h * (y / max_y)
        colour = COLOURS[order.index(label) % len(COLOURS)]  # the bars' colour for it
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="{colour}"/>')
        # Labels of points in the right half go to their left, so none runs off the edge.
        right_half = cx > pad + plot_w / 2
        tx, anchor = (cx - 9, "end") if right_half else (cx + 9, "start")
        parts.append(
            f'<text x="{tx:.1f}" y="{cy + 4:.1f}" text-anchor="{anchor}"><title>{html.escape(label)}</title>'
            f"{html.escape(_short(label))} ({x:.4g})</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


SHOWN = 100  # disagreeing items listed in full
CHAR_PX = 7  # width of a character at the charts' 12px font, roughly
LABEL_CHARS = 40  # longer labels are shortened in charts (the full one is the tooltip)


def _scored(stats: GraderStats) -> tuple[float, float, float] | None:
    """(mean, low, high), or ``None`` when nothing was scored."""
    mean, low, high = stats["mean"], stats["ci_low"], stats["ci_high"]
    if mean is None or low is None or high is None:
        return None
    return mean, low, high


def _short(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"


def _scale_top(stats: list[GraderStats]) -> float:
    """The top of the graders' scale (10 for a 0-10 judge), so charts show it whole."""
    return max([float(s["scale"][1]) for s in stats if s.get("scale")] + [1.0])


def _answer_cell(sample: EvalSampleRecord | None, graders: list[str]) -> str:
    if sample is None:
        return "<td></td>"
    grades = []
    for name in graders:
        grade = sample["grades"][name]
        if grade["score"] is None:
            grades.append(f'<span class="none">{html.escape(name)}: no score</span>')
        else:
            verdict = "pass" if grade["passed"] else "fail"
            grades.append(
                f'<span class="{verdict}">{html.escape(name)}: {grade["score"]:.3g}</span>'
            )
    return (
        f"<td><pre>{html.escape(_text(sample['output']))}</pre><small>"
        + ", ".join(grades)
        + "</small></td>"
    )


def disagreements(
    samples: list[EvalSampleRecord], graders: list[str]
) -> list[tuple[int, dict[str, EvalSampleRecord]]]:
    """The items where some grader passed one candidate and failed another, in item order,
    with every candidate's sample (what the report and the dashboard show side by side)."""
    by_item: dict[int, dict[str, EvalSampleRecord]] = {}
    for sample in samples:
        by_item.setdefault(sample["item"], {})[sample["candidate"]] = sample
    return [
        (index, answers)
        for index, answers in sorted(by_item.items())
        if any(len({a["grades"][g]["passed"] for a in answers.values()}) > 1 for g in graders)
    ]


def compare(
    a: Summary, b: Summary, a_samples: list[EvalSampleRecord], b_samples: list[EvalSampleRecord]
) -> tuple[list[dict[str, Any]], list[tuple[str, str, EvalSampleRecord, EvalSampleRecord]]]:
    """Two runs side by side: per candidate label and grader in both, each run's mean, n
    and the change; and every (prompt, candidate) both runs graded whose verdict changed
    (items are matched by their prompt's key, not their position)."""
    scores = []
    for label, entry in b["candidates"].items():
        before = a["candidates"].get(label)
        if before is None:
            continue
        for grader, stats in entry["graders"].items():
            old = before["graders"].get(grader)
            if old is None:
                continue
            change = (
                None
                if stats["mean"] is None or old["mean"] is None
                else stats["mean"] - old["mean"]
            )
            scores.append(
                {
                    "candidate": label,
                    "grader": grader,
                    "a": old["mean"],
                    "a_n": old["n"],
                    "b": stats["mean"],
                    "b_n": stats["n"],
                    "change": change,
                }
            )
    first = {(s["item_key"], s["candidate"]): s for s in a_samples}
    changed = []
    for sample in b_samples:
        old_sample = first.get((sample["item_key"], sample["candidate"]))
        if old_sample is None:
            continue
        graders = set(sample["grades"]) & set(old_sample["grades"])
        if any(sample["grades"][g]["passed"] != old_sample["grades"][g]["passed"] for g in graders):
            changed.append((sample["item_key"], sample["candidate"], old_sample, sample))
    return scores, changed


def _reference(config: dict[str, Any]) -> str:
    """Who wrote the answers the candidates are graded against."""
    models = config.get("reference_models") or {}
    if not models:
        return "the final assistant message of each item"
    named = ", ".join(f"{model} ({count} items)" for model, count in models.items())
    return f"the teacher's stored answers, by {named}"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _interval(stats: GraderStats) -> str:
    if stats["mean"] is None:
        return "—"
    return f"[{stats['ci_low']:.4f}, {stats['ci_high']:.4f}]"


def _text(message: dict[str, Any] | None) -> str:
    if not message:
        return "(no answer)"
    content = message.get("content") or ""
    calls = message.get("tool_calls") or []
    call_text = "\n".join(
        f"-> {c.get('function', {}).get('name')}({c.get('function', {}).get('arguments')})"
        for c in calls
    )
    return (str(content) + ("\n" + call_text if call_text else "")).strip()


def render(run: EvalRunRecord, samples: list[EvalSampleRecord], items: list[Item]) -> str:
    summary, config = run["summary"], run["config"]
    candidates = summary["candidates"]
    graders = list(next(iter(candidates.values()))["graders"]) if candidates else []
    rows = []
    for label, c in candidates.items():
        cost = "" if c["cost_usd"] is None else f"{c['cost_usd']:.4g}"
        for name, s in c["graders"].items():
            rows.append(
                f"<tr><td>{html.escape(label)}</td><td>{html.escape(name)}</td><td>{_number(s['mean'])}</td>"
                f"<td>{_interval(s)}</td><td>{_number(s['pass_rate'])}</td><td>{s['n']}</td><td>{s.get('errors', 0)}</td>"
                f"<td>{c['latency_p50_ms'] or 0:.0f} / {c['latency_p95_ms'] or 0:.0f}</td>"
                f"<td>{c['prompt_tokens']} / {c['completion_tokens']}</td>"
                f"<td>{cost}</td></tr>"
            )
    charts = "".join(
        f"<h3>{html.escape(g)}</h3>{bars(g, candidates)}{_scatter(g, candidates)}" for g in graders
    )
    # One ordered list of candidates makes every column: headers and cells cannot disagree.
    labels = list(candidates)
    lookup = {item.index: item for item in items}
    split = disagreements(samples, graders)
    disagreeing = len(split)
    rows_html: list[str] = []
    for index, answers in split[:SHOWN]:
        item = lookup.get(index)
        cells = "".join(_answer_cell(answers.get(label), graders) for label in labels)
        rows_html.append(
            f"<tr><td><pre>{html.escape(item.input_text if item else '')}</pre></td>"
            f"<td><pre>{html.escape(item.reference_text if item else '')}</pre></td>{cells}</tr>"
        )
    heads = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    shown = f", first {SHOWN} shown" if disagreeing > SHOWN else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Distillery eval {html.escape(run["id"])}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }}
pre {{ white-space: pre-wrap; max-width: 40ch; margin: 0; font-size: 12px; }} svg text {{ font-size: 12px; }}
.pass {{ color: #1a7f37; }} .fail {{ color: #cf222e; }} .none {{ color: #6e7781; }}
</style></head><body>
<h1>Eval {html.escape(run["id"])}</h1>
<p>{summary["items"]} items from {html.escape(str(config.get("source")))}; reference: {html.escape(_reference(config))}.
Means with 95% bootstrap confidence intervals.</p>
<table><tr><th>candidate</th><th>grader</th><th>mean</th><th>95% CI</th><th>pass rate</th><th>n</th><th>errors</th>
<th>latency p50/p95 ms</th><th>tokens in/out</th><th>cost USD</th></tr>{"".join(rows)}</table>
<h2>Scores</h2>{charts}
<h2>Where the candidates disagree ({disagreeing} items{shown})</h2>
<table><tr><th>prompt</th><th>reference</th>{heads}</tr>{"".join(rows_html)}</table>
</body></html>
"""
