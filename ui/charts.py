"""Charts as inline SVG drawn on the server: no script, nothing for the CSP to allow."""

from __future__ import annotations

import html
from collections.abc import Sequence


def columns(points: Sequence[tuple[str, float, float]], unit: str, height: int = 160) -> str:
    """One column per point (label, total, part): the part (errors) drawn inside the total."""
    if not points:
        return ""
    width, left, bottom = max(360, 22 * len(points) + 60), 48, 26
    top = max(total for _, total, _ in points) or 1.0
    step = min((width - left - 10) / len(points), 36.0)
    bar_width = step * 0.8
    plot = height - bottom - 10
    parts = [
        f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(unit)}"'
        ' class="columns">',
        f'<text x="4" y="14">{top:,.0f}</text><text x="4" y="{height - bottom}">0</text>',
    ]
    for i, (label, total, part) in enumerate(points):
        x = left + i * step
        h, e = plot * total / top, plot * part / top
        y = height - bottom - h
        bar = f'x="{x:.1f}" y="{y:.1f}" width="{bar_width:.1f}" height="{h:.1f}"'
        parts.append(
            f'<rect class="total" {bar}>'
            f"<title>{html.escape(label)}: {total:,.0f} {html.escape(unit)}"
            f"{f', {part:,.0f} errors' if part else ''}</title></rect>"
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
