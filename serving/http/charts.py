"""Line charts as inline SVG, drawn on the server: the console's loss curves and canary metrics.

Nothing is fetched by the browser (no script, no library): each chart is an
``<svg>`` with one ``<polyline>`` per series, a ``<circle>`` per point with its
value as a tooltip (``<title>``), the axes' extremes labelled, and a legend.
Each series carries ``data-series`` and ``data-points`` so a test (or a
curious reader) can check what was drawn without reading pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

COLOURS = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2")
Series = dict[str, list[tuple[float, float]]]


@dataclass(frozen=True)
class Frame:
    """The plotting area and the data ranges it maps."""

    width: int = 640
    height: int = 240
    left: int = 56
    right: int = 16
    top: int = 16
    bottom: int = 36

    def x(self, value: float, low: float, high: float) -> float:
        span = high - low or 1.0
        return self.left + (value - low) / span * (self.width - self.left - self.right)

    def y(self, value: float, low: float, high: float) -> float:
        span = high - low or 1.0
        return self.height - self.bottom - (value - low) / span * (self.height - self.top - self.bottom)


def line_chart(series: Series, *, title: str, x_label: str, y_label: str, frame: Frame | None = None) -> Markup:
    """An SVG chart of ``series`` (name -> [(x, y)], non-finite points left out); an empty one says so."""
    frame = frame or Frame()
    clean = {
        name: [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)] for name, points in series.items()
    }
    every = [p for points in clean.values() for p in points]
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {frame.width} {frame.height}" '
        f'width="{frame.width}" height="{frame.height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{frame.width}" height="{frame.height}" fill="#ffffff"/>',
    ]
    if not every:
        parts.append(
            f'<text x="{frame.width / 2}" y="{frame.height / 2}" text-anchor="middle" fill="#6b7280">'
            "no points yet</text></svg>"
        )
        return Markup("".join(parts))
    x_low, x_high = min(x for x, _ in every), max(x for x, _ in every)
    y_low, y_high = min(y for _, y in every), max(y for _, y in every)
    if x_low == x_high:  # one point in time: drawn in the middle
        x_low, x_high = x_low - 0.5, x_high + 0.5
    if y_low == y_high:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    parts += _axes(frame, x_low, x_high, y_low, y_high, x_label, y_label)
    for i, (name, points) in enumerate(clean.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = [(frame.x(x, x_low, x_high), frame.y(y, y_low, y_high)) for x, y in points]
        parts.append(
            f'<g class="series" data-series="{escape(name)}" data-points="{len(points)}">'
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
            f'points="{" ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords)}"/>'
        )
        for (x, y), (cx, cy) in zip(points, coords, strict=True):
            parts.append(
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{colour}">'
                f"<title>{escape(name)}: {x:g}, {y:.4g}</title></circle>"
            )
        parts.append("</g>")
        legend_y = frame.top + 14 * i
        parts.append(
            f'<rect x="{frame.width - 150}" y="{legend_y}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{frame.width - 135}" y="{legend_y + 9}" font-size="11">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def _axes(
    frame: Frame, x_low: float, x_high: float, y_low: float, y_high: float, x_label: str, y_label: str
) -> list[str]:
    bottom, left = frame.height - frame.bottom, frame.left
    right = frame.width - frame.right
    middle_x, middle_y = (left + right) / 2, (frame.top + bottom) / 2
    return [
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#9ca3af"/>',
        f'<line x1="{left}" y1="{frame.top}" x2="{left}" y2="{bottom}" stroke="#9ca3af"/>',
        f'<text x="{left}" y="{bottom + 14}" font-size="11">{x_low:g}</text>',
        f'<text x="{right}" y="{bottom + 14}" font-size="11" text-anchor="end">{x_high:g}</text>',
        f'<text x="{middle_x}" y="{bottom + 30}" font-size="11" text-anchor="middle">{escape(x_label)}</text>',
        f'<text x="{left - 4}" y="{bottom}" font-size="11" text-anchor="end">{y_low:.3g}</text>',
        f'<text x="{left - 4}" y="{frame.top + 10}" font-size="11" text-anchor="end">{y_high:.3g}</text>',
        f'<text x="12" y="{middle_y}" font-size="11" transform="rotate(-90 12 {middle_y})" text-anchor="middle">'
        f"{escape(y_label)}</text>",
    ]
