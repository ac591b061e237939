"""The live loss chart as inline SVG inside a gr.HTML: no plotting library, no Gradio plot component (those
differ between Gradio 3.41 and 4.x), cheap to redraw.

Series: the training loss of every step (thin), a running mean of it (bold), the epoch averages (dots at the
step each epoch ended) and, when the run measures it, the validation loss per epoch (squares).
"""
from __future__ import annotations

import html
import math
from typing import Callable, Sequence

MAX_POINTS = 400          # a long run's steps are averaged into this many points
COLORS = {"loss": "#9db4d8", "mean": "#2563eb", "epoch": "#f97316", "validation": "#16a34a"}


def _downsample(points: Sequence[tuple[float, float]], n: int = MAX_POINTS) -> list[tuple[float, float]]:
    if len(points) <= n:
        return [(float(x), float(y)) for x, y in points]
    size = len(points) / n
    out = []
    for i in range(n):
        chunk = points[int(i * size):max(int((i + 1) * size), int(i * size) + 1)]
        out.append((sum(p[0] for p in chunk) / len(chunk), sum(p[1] for p in chunk) / len(chunk)))
    return out


def running_mean(points: Sequence[tuple[float, float]], window: int = 20) -> list[tuple[float, float]]:
    out, acc = [], 0.0
    for i, (x, y) in enumerate(points):
        acc += y
        if i >= window:
            acc -= points[i - window][1]
        out.append((x, acc / min(i + 1, window)))
    return out


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    out, v = [], first
    while v <= hi + 1e-12:
        out.append(round(v, 12))
        v += step
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def loss_chart_svg(losses: Sequence[tuple[float, float]], epoch_losses: Sequence[tuple[float, float]] = (), *,
                   steps_per_epoch: float | None = None, validation: Sequence[tuple[float, float]] = (),
                   total_steps: int | None = None, width: int = 640, height: int = 240,
                   tr: Callable[[str], str] = lambda s: s) -> str:
    """SVG text. `losses`: (step, loss); `epoch_losses` / `validation`: (epoch, loss), drawn at
    epoch × steps_per_epoch."""
    losses = [(float(s), float(v)) for s, v in losses if v is not None and math.isfinite(float(v))]
    spe = steps_per_epoch or 0
    epochs = [(e * spe, float(v)) for e, v in epoch_losses if spe and v is not None and math.isfinite(float(v))]
    vals = [(e * spe, float(v)) for e, v in validation if spe and v is not None and math.isfinite(float(v))]
    pad_l, pad_r, pad_t, pad_b = 52, 12, 12, 40
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="lora-train-chart-svg" viewBox="0 0 {width} {height}" '
            f'width="100%" preserveAspectRatio="xMidYMid meet" role="img">')
    if not losses and not epochs and not vals:
        return (head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="lora-train-chart-empty">'
                f'{html.escape(tr("No loss values yet"))}</text></svg>')
    pts = _downsample(losses)
    mean = _downsample(running_mean(losses, max(1, min(50, len(losses) // 10 or 1))))
    ys = [y for _, y in pts] + [y for _, y in epochs] + [y for _, y in vals]
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5 * (abs(y_lo) or 1) * 0.1, y_hi + 0.5 * (abs(y_hi) or 1) * 0.1
    margin = (y_hi - y_lo) * 0.05
    y_lo, y_hi = y_lo - margin, y_hi + margin
    xs = [x for x, _ in pts] + [x for x, _ in epochs] + [x for x, _ in vals]
    x_lo, x_hi = 0.0, float(max(max(xs), total_steps or 0, 1))

    def X(x: float) -> float:
        return pad_l + (x - x_lo) / (x_hi - x_lo) * w

    def Y(y: float) -> float:
        return pad_t + (1 - (y - y_lo) / (y_hi - y_lo)) * h

    parts = [head, f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="none" stroke="#8885"/>']
    for t in _ticks(y_lo, y_hi):
        parts.append(f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#8883"/>'
                     f'<text x="{pad_l - 6}" y="{Y(t) + 4:.1f}" text-anchor="end" font-size="11" '
                     f'fill="currentColor">{_fmt(t)}</text>')
    for t in _ticks(x_lo, x_hi):
        parts.append(f'<text x="{X(t):.1f}" y="{pad_t + h + 14}" text-anchor="middle" font-size="11" '
                     f'fill="currentColor">{_fmt(t)}</text>')

    def line(points: list[tuple[float, float]], color: str, width_px: float) -> str:
        d = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in points)
        return f'<polyline fill="none" stroke="{color}" stroke-width="{width_px}" points="{d}"/>'

    if len(pts) > 1:
        parts.append(line(pts, COLORS["loss"], 1))
        parts.append(line(mean, COLORS["mean"], 2))
    elif pts:
        parts.append(f'<circle cx="{X(pts[0][0]):.1f}" cy="{Y(pts[0][1]):.1f}" r="2" fill="{COLORS["mean"]}"/>')
    for x, y in epochs:
        parts.append(f'<circle class="lora-train-epoch-point" cx="{X(x):.1f}" cy="{Y(y):.1f}" r="4" '
                     f'fill="{COLORS["epoch"]}"/>')
    if len(vals) > 1:
        parts.append(line(vals, COLORS["validation"], 1.5))
    for x, y in vals:
        parts.append(f'<rect class="lora-train-validation-point" x="{X(x) - 3.5:.1f}" y="{Y(y) - 3.5:.1f}" '
                     f'width="7" height="7" fill="{COLORS["validation"]}"/>')
    legend = [("training loss", COLORS["mean"])] + ([("epoch average", COLORS["epoch"])] if epochs else []) \
        + ([("validation loss", COLORS["validation"])] if vals else [])
    lx = pad_l
    for label, color in legend:
        text = html.escape(tr(label))
        parts.append(f'<rect x="{lx}" y="{height - 14}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{lx + 14}" y="{height - 5}" font-size="12" fill="currentColor">{text}</text>')
        lx += 24 + 7 * len(tr(label)) + (7 * len(tr(label)) if any(ord(ch) > 0x2e80 for ch in tr(label)) else 0)
    parts.append(f'<text x="{pad_l + w}" y="{height - 5}" text-anchor="end" font-size="11" '
                 f'fill="currentColor">{html.escape(tr("step"))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def chart_html(svg: str) -> str:
    return f'<div class="lora-train-chart">{svg}</div>'
