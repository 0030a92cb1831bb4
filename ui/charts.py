"""Charts as inline SVG drawn on the server: no script, nothing for the CSP to allow."""

from __future__ import annotations

import html
from collections.abc import Sequence


def columns(
    points: Sequence[tuple[str, float, float]],
    unit: str,
    height: int = 160,
    part_name: str = "errors",
    money: bool = False,
) -> str:
    """One column per point (label, total, part): the part (errors) drawn inside the total.
    An empty bucket is a point with total 0: its place on the axis is kept."""
    if not points:
        return ""
    width, left, bottom = 900, 56, 26  # as wide as the latency lines below it
    top = max(total for _, total, _ in points) or 1.0
    step = (width - left - 10) / len(points)
    shown = "${:,.2f}" if money else "{:,.0f}"
    bar_width = step * 0.8
    plot = height - bottom - 10
    parts = [
        f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(unit)}"'
        ' class="columns">',
        f'<text x="4" y="14">{shown.format(top)}</text><text x="4" y="{height - bottom}">0</text>',
    ]
    for i, (label, total, part) in enumerate(points):
        x = left + i * step
        h, e = plot * total / top, plot * part / top
        y = height - bottom - h
        bar = f'x="{x:.1f}" y="{y:.1f}" width="{bar_width:.1f}" height="{h:.1f}"'
        parts.append(
            f'<rect class="total" {bar}>'
            f"<title>{html.escape(label)}: {shown.format(total)} {html.escape(unit)}"
            f"{f', {part:,.0f} {part_name}' if part else ''}</title></rect>"
        )
        if part:
            parts.append(
                f'<rect class="part" x="{x:.1f}" y="{height - bottom - e:.1f}" '
                f'width="{bar_width:.1f}" height="{e:.1f}"/>'
            )
        if len(points) <= 14 or i % max(1, len(points) // 7) == 0:
            parts.append(
                f'<text x="{x:.1f}" y="{height - 8}" class="tick">{html.escape(label)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


def lines(
    series: dict[str, list[tuple[float, float | None]]],
    width: int = 560,
    height: int = 220,
    labels: Sequence[str] = (),
) -> str:
    """One line per series (say train and validation loss over steps), with a legend.

    A point whose value is None (an hour with no calls) breaks its line there.
    ``labels``: names for x = 0, 1, 2 ... (time buckets), a few of them drawn as ticks."""
    points = [(x, y) for values in series.values() for x, y in values if y is not None]
    if len(points) < 2:
        return ""
    left, right, top, bottom = 52, 130, 12, 28
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1 = (0.0, float(len(labels) - 1)) if labels else (min(xs), max(xs) or 1.0)
    y0, y1 = 0.0, max(ys) or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def at(x: float, y: float) -> str:
        px = left + (x - x0) / ((x1 - x0) or 1.0) * plot_w
        py = top + plot_h - (y - y0) / ((y1 - y0) or 1.0) * plot_h
        return f"{px:.1f},{py:.1f}"

    parts = [
        f'<svg width="{width}" height="{height}" role="img" aria-label="loss" class="lines">',
        f'<text x="4" y="{top + 10}">{f"{y1:,.0f}" if y1 >= 1000 else f"{y1:.3g}"}</text>'
        f'<text x="4" y="{top + plot_h}">0</text>',
    ]
    if labels:
        every = max(1, len(labels) // 6)
        for i in range(0, len(labels), every):
            tick_x = at(i, 0).split(",")[0]
            parts.append(
                f'<text x="{tick_x}" y="{height - 8}" class="tick">{html.escape(labels[i])}</text>'
            )
    else:
        parts.append(
            f'<text x="{left}" y="{height - 8}">{x0:g}</text>'
            f'<text x="{left + plot_w - 20}" y="{height - 8}">{x1:g}</text>'
        )
    for i, (name, values) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        runs: list[list[str]] = [[]]
        for x, y in sorted(values, key=lambda point: point[0]):
            if y is None:
                runs.append([])
            else:
                runs[-1].append(at(x, y))
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{colour}"/>')
            elif run:
                parts.append(
                    f'<polyline points="{" ".join(run)}" fill="none" stroke="{colour}" '
                    'stroke-width="2"/>'
                )
        legend_y = top + 14 + 18 * i
        parts.append(
            f'<rect x="{width - right + 10}" y="{legend_y - 9}" width="10" height="10" '
            f'fill="{colour}"/><text x="{width - right + 26}" y="{legend_y}">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
