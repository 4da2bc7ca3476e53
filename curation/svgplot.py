"""The report's three plots as hand-written SVG: vertical bars, horizontal bars and a heatmap.

Why not matplotlib: importing it and laying out ~150 rotated tick labels cost the report about 2 s of a 10k-image
build's 40 (and its PNGs are blurry when zoomed). These plots need no more than rectangles and text.
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

FONT = "font-family='sans-serif'"
# viridis at 9 evenly spaced points (matplotlib's table), interpolated linearly in between
_VIRIDIS = np.array([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141), (39, 173, 129),
                     (92, 200, 99), (170, 220, 50), (253, 231, 37)], float)


def viridis(x: float) -> str:
    """x in [0, 1] -> '#rrggbb'."""
    pos = min(max(x, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    lo = min(int(pos), len(_VIRIDIS) - 2)
    rgb = _VIRIDIS[lo] + (_VIRIDIS[lo + 1] - _VIRIDIS[lo]) * (pos - lo)
    return "#" + "".join(f"{round(c):02x}" for c in rgb)


def _text(x: float, y: float, text: str, size: int = 11, anchor: str = "start", rotate: bool = False,
          weight: str = "normal") -> str:
    transform = f" transform='rotate(-90 {x:.1f} {y:.1f})'" if rotate else ""
    return (f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' font-weight='{weight}' "
            f"{FONT}{transform}>{html.escape(text)}</text>")


def _svg(width: float, height: float, body: list[str]) -> bytes:
    head = (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
            f"viewBox='0 0 {width:.0f} {height:.0f}'><rect width='100%' height='100%' fill='white'/>")
    return (head + "".join(body) + "</svg>").encode("utf-8")


def _nice_ticks(top: float, n: int = 5) -> list[float]:
    if top <= 0:
        return [0.0]
    step = 10 ** math.floor(math.log10(top / n))
    step *= next(m for m in (1, 2, 5, 10) if top / (step * m) <= n)
    return [i * step for i in range(int(top // step) + 1)]


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str, color: str) -> bytes:
    """Vertical bars, one per label, labels rotated under the axis."""
    bar, left, top, plot_h = 14.0, 60.0, 30.0, 260.0
    label_h = 8 + 6.5 * max((len(s) for s in labels), default=1)
    width = left + bar * max(len(labels), 1) + 20
    peak = max(values, default=0) or 1
    body = [_text(width / 2, 18, title, 13, "middle", weight="bold"),
            _text(14, top + plot_h / 2, ylabel, 11, "middle", rotate=True)]
    for tick in _nice_ticks(peak):
        y = top + plot_h * (1 - tick / peak)
        body.append(f"<line x1='{left - 4}' y1='{y:.1f}' x2='{width - 20}' y2='{y:.1f}' stroke='#ddd'/>")
        body.append(_text(left - 6, y + 4, f"{tick:g}", 10, "end"))
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        x, h = left + i * bar, plot_h * value / peak
        body.append(f"<rect x='{x + 1:.1f}' y='{top + plot_h - h:.1f}' width='{bar - 2:.1f}' height='{h:.1f}' "
                    f"fill='{color}'><title>{html.escape(label)}: {value:g}</title></rect>")
        body.append(_text(x + bar / 2 + 3, top + plot_h + 6, label, 9, "end", rotate=True))
    body.append(f"<line x1='{left}' y1='{top + plot_h}' x2='{width - 20}' y2='{top + plot_h}' stroke='#333'/>")
    return _svg(width, top + plot_h + label_h, body)


def hbar_chart(labels: Sequence[str], values: Sequence[float], colors: Sequence[str], title: str,
               xlabel: str) -> bytes:
    """Horizontal bars with their values written at the end."""
    row, plot_w = 24.0, 420.0
    left = 16 + 6.5 * max((len(s) for s in labels), default=1)
    top = 30.0
    width = left + plot_w + 80
    peak = max(values, default=0) or 1
    body = [_text(width / 2, 18, title, 13, "middle", weight="bold")]
    for i, (label, value, color) in enumerate(zip(labels, values, colors, strict=True)):
        y, w = top + i * row, plot_w * value / peak
        body.append(f"<rect x='{left:.1f}' y='{y + 3:.1f}' width='{w:.1f}' height='{row - 6:.1f}' fill='{color}'/>")
        body.append(_text(left - 6, y + row / 2 + 4, label, 11, "end"))
        body.append(_text(left + w + 4, y + row / 2 + 4, f"{value:g}", 10))
    bottom = top + row * max(len(labels), 1)
    body.append(_text(left + plot_w / 2, bottom + 22, xlabel, 11, "middle"))
    return _svg(width, bottom + 32, body)


def heatmap(labels: Sequence[str], matrix: np.ndarray, title: str, scale_label: str) -> bytes:
    """A square matrix in viridis (0 = darkest, the maximum = brightest), labels on both axes, and a colour scale."""
    cell = 9.0
    margin = 8 + 5.5 * max((len(s) for s in labels), default=1)
    n = len(labels)
    top, left = 30.0 + margin, margin
    peak = float(matrix.max()) if matrix.size else 0.0
    body = [_text((left + n * cell) / 2, 18, title, 13, "middle", weight="bold")]
    for i in range(n):
        for j in range(n):
            value = matrix[i, j]
            body.append(f"<rect x='{left + j * cell:.1f}' y='{top + i * cell:.1f}' width='{cell}' height='{cell}' "
                        f"fill='{viridis(value / peak if peak else 0)}'/>")
    for i, label in enumerate(labels):
        body.append(_text(left - 3, top + i * cell + cell - 1.5, label, 8, "end"))
        body.append(_text(left + i * cell + cell - 1.5, top - 3, label, 8, "start", rotate=True))
    scale_x, steps = left + n * cell + 20, 50
    for k in range(steps):
        y = top + n * cell * (1 - (k + 1) / steps)
        body.append(f"<rect x='{scale_x}' y='{y:.1f}' width='14' height='{n * cell / steps + 0.5:.1f}' "
                    f"fill='{viridis(k / (steps - 1))}'/>")
    body.append(_text(scale_x + 18, top + n * cell, "0", 10))
    body.append(_text(scale_x + 18, top + 8, f"{peak:.3g}", 10))
    body.append(_text(scale_x + 44, top + n * cell / 2, scale_label, 10, "middle", rotate=True))
    return _svg(scale_x + 60, top + n * cell + 10, body)
