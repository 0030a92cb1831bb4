"""A self-contained HTML report of an eval run: no scripts, no network, inline SVG."""

from __future__ import annotations

import html
from typing import Any

from distillery.curation.eval_items import Item

COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


def _bars(grader: str, candidates: dict[str, Any]) -> str:
    """Mean score per candidate with its 95% interval as a whisker."""
    labels = list(candidates)
    stats = [candidates[c]["graders"][grader] for c in labels]
    top = max([s["ci_high"] for s in stats if s["mean"] is not None] + [1.0])
    width, row, left = 640, 34, 180
    height = row * len(labels) + 30
    scale = (width - left - 60) / top
    parts = [
        f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(grader)}">'
    ]
    for i, (label, s) in enumerate(zip(labels, stats, strict=True)):
        y = 10 + i * row
        colour = COLOURS[i % len(COLOURS)]
        parts.append(
            f'<text x="{left - 8}" y="{y + 17}" text-anchor="end">{html.escape(label)}</text>'
        )
        if s["mean"] is None:  # nothing was scored: no bar, never a zero
            parts.append(
                f'<text x="{left}" y="{y + 17}">no score ({s.get("errors", 0)} errors)</text>'
            )
            continue
        parts.append(
            f'<rect x="{left}" y="{y + 4}" width="{s["mean"] * scale:.1f}" height="18" fill="{colour}"/>'
        )
        lo, hi = left + s["ci_low"] * scale, left + s["ci_high"] * scale
        parts.append(
            f'<line x1="{lo:.1f}" x2="{hi:.1f}" y1="{y + 13}" y2="{y + 13}" stroke="#222" stroke-width="2"/>'
        )
        parts.append(
            f'<text x="{hi + 6:.1f}" y="{y + 17}">{s["mean"]:.3f} [{s["ci_low"]:.3f}, {s["ci_high"]:.3f}]</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _scatter(grader: str, candidates: dict[str, Any]) -> str:
    """Score against cost (or p50 latency when no prices are configured)."""
    use_cost = all(c["cost_usd"] is not None for c in candidates.values())
    key, unit = ("cost_usd", "cost, USD") if use_cost else ("latency_p50_ms", "p50 latency, ms")
    points = [
        (label, c[key] or 0.0, c["graders"][grader]["mean"])
        for label, c in candidates.items()
        if c["graders"][grader]["mean"] is not None
    ]
    width, height, pad = 640, 260, 50
    max_x = max([p[1] for p in points] + [1e-9])
    max_y = max([p[2] for p in points] + [1.0])
    parts = [
        f'<svg width="{width}" height="{height}" role="img">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - 20}" y2="{height - pad}" stroke="#888"/>',
        f'<line x1="{pad}" y1="20" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
        f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">{unit}</text>',
        f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">{html.escape(grader)}</text>',
    ]
    for i, (label, x, y) in enumerate(points):
        cx = pad + (width - pad - 160) * (x / max_x)  # room for the label on the right
        cy = height - pad - (height - pad - 30) * (y / max_y)
        parts.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="{COLOURS[i % len(COLOURS)]}"/>'
        )
        parts.append(
            f'<text x="{cx + 9:.1f}" y="{cy + 4:.1f}">{html.escape(label)} ({x:.4g})</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _interval(stats: dict[str, Any]) -> str:
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


def render(run: dict[str, Any], samples: list[dict[str, Any]], items: list[Item]) -> str:
    summary, config = run["summary"], run["config"]
    candidates = summary["candidates"]
    graders = list(next(iter(candidates.values()))["graders"]) if candidates else []
    rows = []
    for label, c in candidates.items():
        cost = "" if c["cost_usd"] is None else f"{c['cost_usd']:.4g}"
        for name, s in c["graders"].items():
            rows.append(
                f"<tr><td>{html.escape(label)}</td><td>{html.escape(name)}</td><td>{_number(s['mean'])}</td>"
                f"<td>{_interval(s)}</td><td>{s['pass_rate']}</td><td>{s['n']}</td><td>{s.get('errors', 0)}</td>"
                f"<td>{c['latency_p50_ms'] or 0:.0f} / {c['latency_p95_ms'] or 0:.0f}</td>"
                f"<td>{c['prompt_tokens']} / {c['completion_tokens']}</td>"
                f"<td>{cost}</td></tr>"
            )
    charts = "".join(
        f"<h3>{html.escape(g)}</h3>{_bars(g, candidates)}{_scatter(g, candidates)}" for g in graders
    )
    by_item: dict[int, dict[str, dict[str, Any]]] = {}
    for sample in samples:
        by_item.setdefault(sample["item"], {})[sample["candidate"]] = sample
    lookup = {item.index: item for item in items}
    disagreements = []
    for index, answers in sorted(by_item.items()):
        verdicts = {g: {a["grades"][g]["passed"] for a in answers.values()} for g in graders}
        if not any(len(v) > 1 for v in verdicts.values()):
            continue
        item = lookup.get(index)
        cells = "".join(
            f"<td><pre>{html.escape(_text(a['output']))}</pre><small>"
            + ", ".join(f"{html.escape(g)}: {a['grades'][g]['score']:.3g}" for g in graders)
            + "</small></td>"
            for a in answers.values()
        )
        disagreements.append(
            f"<tr><td><pre>{html.escape(item.input_text if item else '')}</pre></td>"
            f"<td><pre>{html.escape(item.reference_text if item else '')}</pre></td>{cells}</tr>"
        )
        if len(disagreements) >= 100:
            break
    heads = "".join(f"<th>{html.escape(label)}</th>" for label in candidates)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Distillery eval {html.escape(run["id"])}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }}
pre {{ white-space: pre-wrap; max-width: 40ch; margin: 0; font-size: 12px; }} svg text {{ font-size: 12px; }}
</style></head><body>
<h1>Eval {html.escape(run["id"])}</h1>
<p>{summary["items"]} items from {html.escape(str(config.get("source")))}; reference: the teacher's stored answer.
Means with 95% bootstrap confidence intervals.</p>
<table><tr><th>candidate</th><th>grader</th><th>mean</th><th>95% CI</th><th>pass rate</th><th>n</th><th>errors</th>
<th>latency p50/p95 ms</th><th>tokens in/out</th><th>cost USD</th></tr>{"".join(rows)}</table>
<h2>Scores</h2>{charts}
<h2>Where the candidates disagree ({len(disagreements)} items{", first 100" if len(disagreements) >= 100 else ""})</h2>
<table><tr><th>prompt</th><th>reference</th>{heads}</tr>{"".join(disagreements)}</table>
</body></html>
"""
