"""Tiny inline-SVG charts (scatter with Pareto front, grouped bars, stacked bars): no JS, no network."""
from __future__ import annotations

import math
from html import escape
from typing import Optional, Sequence

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
W, H = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 70, 150, 30, 50


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)  # ticks enclose [lo, hi]
    return [round(i * step, 10) for i in range(first, max(last, first + 1) + 1)]


class Axes:
    """Linear x/y scales over the plot area, with gridlines, tick labels and axis titles."""

    def __init__(self, xlo: float, xhi: float, ylo: float, yhi: float, title: str, xlabel: str, ylabel: str,
                 width: int = W, height: int = H, xticks: bool = True) -> None:
        self.xt, self.yt = nice_ticks(xlo, xhi), nice_ticks(ylo, yhi)
        self.x0, self.x1, self.y0, self.y1 = self.xt[0], self.xt[-1], self.yt[0], self.yt[-1]
        self.w, self.h = width, height
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                      f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" '
                      'font-family="sans-serif" font-size="11">',
                      f'<title>{escape(title)}</title>',
                      f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{escape(title)}</text>']
        for t in self.xt if xticks else []:
            x = self.sx(t)
            self.parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{height - BOTTOM}" stroke="#eee"/>'
                              f'<text x="{x:.1f}" y="{height - BOTTOM + 14}" text-anchor="middle">{t:g}</text>')
        for t in self.yt:
            y = self.sy(t)
            self.parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{width - RIGHT}" y2="{y:.1f}" stroke="#eee"/>'
                              f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
        self.parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{width - LEFT - RIGHT}" height="{height - TOP - BOTTOM}" '
                          'fill="none" stroke="#888"/>')
        self.parts.append(f'<text x="{(LEFT + width - RIGHT) / 2}" y="{height - 12}" text-anchor="middle">{escape(xlabel)}</text>')
        self.parts.append(f'<text x="14" y="{(TOP + height - BOTTOM) / 2}" text-anchor="middle" '
                          f'transform="rotate(-90 14 {(TOP + height - BOTTOM) / 2})">{escape(ylabel)}</text>')
        self.legend_y = TOP + 4

    def sx(self, v: float) -> float:
        return LEFT + (v - self.x0) / ((self.x1 - self.x0) or 1) * (self.w - LEFT - RIGHT)

    def sy(self, v: float) -> float:
        return self.h - BOTTOM - (v - self.y0) / ((self.y1 - self.y0) or 1) * (self.h - TOP - BOTTOM)

    def legend(self, label: str, color: str, dash: bool = False) -> None:
        x, y = self.w - RIGHT + 10, self.legend_y
        self.parts.append(f'<line x1="{x}" y1="{y + 5}" x2="{x + 14}" y2="{y + 5}" stroke="{color}" stroke-width="2" '
                          'stroke-dasharray="4 3"/>' if dash else f'<rect x="{x}" y="{y}" width="14" height="10" fill="{color}"/>')
        self.parts.append(f'<text x="{x + 18}" y="{y + 9}">{escape(label)}</text>')
        self.legend_y += 16

    def svg(self) -> str:
        return "\n".join(self.parts + ["</svg>"])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both lower x (latency) and higher y (accuracy), sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def error_bar_axis(lows: Sequence[float], highs: Sequence[float], extra: Sequence[float] = (),
                   fill: float = 1 / 3, min_span: float = 1.0) -> tuple[float, float]:
    """A value range that holds every interval and in which the widest interval spans at most `fill` of the
    axis: zooming in further would draw sampling noise as structure."""
    values = list(lows) + list(highs) + list(extra)
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    widest = max((h - l for l, h in zip(lows, highs)), default=0.0)
    span = max(hi - lo, widest / fill, min_span)
    mid = (lo + hi) / 2
    return mid - span / 2 * 1.1, mid + span / 2 * 1.1


def scatter(points: Sequence[tuple[float, float, str, str]], title: str, xlabel: str, ylabel: str,
            hline: Optional[tuple[float, str]] = None,
            errors: Optional[Sequence[Optional[tuple[float, float]]]] = None,
            bounds: Optional[tuple[float, float]] = None) -> str:
    """points: (x, y, label, series); errors: per point (low, high) of y, drawn as a vertical bar with caps.
    Draws the Pareto front (low x, high y) over all points. The y range holds every error bar and is never
    zoomed so far that the bars fill it (see error_bar_axis); `bounds` clips it (e.g. 0-100 %)."""
    errors = list(errors) if errors is not None else [None] * len(points)
    xs = [p[0] for p in points] or [0.0, 1.0]
    lows = [e[0] if e else p[1] for p, e in zip(points, errors)]
    highs = [e[1] if e else p[1] for p, e in zip(points, errors)]
    ylo, yhi = error_bar_axis(lows, highs, [hline[0]] if hline else [])
    if bounds:
        shift = max(0.0, bounds[0] - ylo) - max(0.0, yhi - bounds[1])
        ylo, yhi = max(bounds[0], ylo + shift), min(bounds[1], yhi + shift)
    ax = Axes(0.0, max(xs) * 1.1 or 1.0, ylo, yhi, title, xlabel, ylabel)
    series = list(dict.fromkeys(p[3] for p in points))
    colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(series)}
    if hline:
        y = ax.sy(hline[0])
        ax.parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{ax.w - RIGHT}" y2="{y:.1f}" stroke="#555" '
                        f'stroke-dasharray="2 3"/><text x="{LEFT + 4}" y="{y - 4:.1f}" fill="#555">{escape(hline[1])}</text>')
    front = pareto_front([(p[0], p[1]) for p in points])
    if len(front) > 1:
        d = " ".join(f"{ax.sx(x):.1f},{ax.sy(y):.1f}" for x, y in front)
        ax.parts.append(f'<polyline class="pareto" points="{d}" fill="none" stroke="#222" stroke-width="1.5" '
                        'stroke-dasharray="5 3"/>')
    for (x, y, label, s), err in zip(points, errors):
        if err:
            cx, y0, y1 = ax.sx(x), ax.sy(err[0]), ax.sy(err[1])
            ax.parts.append(f'<path class="errorbar" d="M{cx:.1f},{y0:.1f}V{y1:.1f}M{cx - 4:.1f},{y0:.1f}H{cx + 4:.1f}'
                            f'M{cx - 4:.1f},{y1:.1f}H{cx + 4:.1f}" stroke="{colors[s]}" stroke-width="1.5" fill="none">'
                            f'<title>{escape(f"{s} {label}: 95% interval {err[0]:g}-{err[1]:g}")}</title></path>')
    for x, y, label, s in points:
        on = (x, y) in front
        ax.parts.append(f'<circle cx="{ax.sx(x):.1f}" cy="{ax.sy(y):.1f}" r="{6 if on else 5}" fill="{colors[s]}" '
                        f'stroke="{"#000" if on else "none"}" stroke-width="1.5"><title>{escape(f"{s} {label}: {x:g}, {y:g}")}'
                        f'</title></circle><text x="{ax.sx(x) + 8:.1f}" y="{ax.sy(y) + 4:.1f}">{escape(label)}</text>')
    for s in series:
        ax.legend(s, colors[s])
    ax.legend("Pareto front", "#222", dash=True)
    if any(errors):
        ax.legend("95% interval: bars", "#fff")
    return ax.svg()


def grouped_bars(groups: Sequence[str], series: Sequence[str], values: dict[tuple[str, str], float],
                 title: str, ylabel: str) -> str:
    """Bars per group (e.g. target), one bar per series (e.g. precision); missing pairs leave a gap."""
    top = max(values.values(), default=1.0) * 1.1 or 1.0
    ax = Axes(0, len(groups) or 1, 0, top, title, "", ylabel, xticks=False)
    colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(series)}
    slot = (ax.w - LEFT - RIGHT) / max(len(groups), 1)
    bw = slot * 0.8 / max(len(series), 1)
    for gi, g in enumerate(groups):
        gx = LEFT + gi * slot + slot * 0.1
        ax.parts.append(f'<text x="{LEFT + (gi + 0.5) * slot:.1f}" y="{ax.h - BOTTOM + 28}" text-anchor="middle" '
                        f'font-weight="bold">{escape(g)}</text>')
        for si, s in enumerate(series):
            v = values.get((g, s))
            if v is None:
                continue
            y = ax.sy(v)
            ax.parts.append(f'<rect x="{gx + si * bw:.1f}" y="{y:.1f}" width="{bw * 0.9:.1f}" '
                            f'height="{ax.sy(ax.y0) - y:.1f}" fill="{colors[s]}"><title>{escape(f"{g} {s}: {v:g}")}</title></rect>'
                            f'<text x="{gx + (si + 0.45) * bw:.1f}" y="{y - 3:.1f}" text-anchor="middle" font-size="9">{v:.3g}</text>')
    for s in series:
        ax.legend(s, colors[s])
    return ax.svg()


def layer_bars(costs: Sequence[float], kinds: Sequence[str], names: Sequence[str], title: str, ylabel: str,
               kind_order: Sequence[str]) -> str:
    """One bar per layer in network order, coloured by op type."""
    top = max(costs, default=1.0) * 1.1 or 1.0
    ax = Axes(0, max(len(costs), 1), 0, top, title, "layer (network order)", ylabel, width=W + 120)
    colors = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(kind_order)}
    slot = (ax.w - LEFT - RIGHT) / max(len(costs), 1)
    for i, (c, k, n) in enumerate(zip(costs, kinds, names)):
        y = ax.sy(c)
        ax.parts.append(f'<rect x="{LEFT + i * slot + slot * 0.1:.1f}" y="{y:.1f}" width="{slot * 0.8:.1f}" '
                        f'height="{ax.sy(0) - y:.1f}" fill="{colors.get(k, "#999")}"><title>{escape(f"{i}: {n} ({k}) {c:.4g}")}'
                        '</title></rect>')
    for k in kind_order:
        if k in kinds:
            ax.legend(k, colors[k])
    return ax.svg()


def stacked_shares(shares: dict[str, dict[str, float]], labels: dict[str, str], kind_order: Sequence[str],
                   title: str) -> str:
    """One horizontal 100% bar per device: the share of estimated cost per op type (the paper's Figure 3)."""
    height = TOP + 40 * len(shares) + 50
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" '
             f'role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="11"><title>{escape(title)}</title>',
             f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{escape(title)}</text>']
    colors = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(kind_order)}
    x0, width = 170, W - 170 - 20
    for row, (dev, share) in enumerate(shares.items()):
        y, x = TOP + row * 40, float(x0)
        parts.append(f'<text x="{x0 - 6}" y="{y + 17}" text-anchor="end">{escape(labels.get(dev, dev))}</text>')
        for k in kind_order:
            f = share.get(k, 0.0)
            if f <= 0:
                continue
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{f * width:.1f}" height="26" fill="{colors[k]}">'
                         f'<title>{escape(f"{k}: {100 * f:.1f}%")}</title></rect>')
            if f > 0.06:
                parts.append(f'<text x="{x + f * width / 2:.1f}" y="{y + 17}" text-anchor="middle" fill="#fff">{100 * f:.0f}%</text>')
            x += f * width
    lx = x0
    for k in kind_order:
        if any(s.get(k) for s in shares.values()):
            parts.append(f'<rect x="{lx}" y="{height - 30}" width="12" height="10" fill="{colors[k]}"/>'
                         f'<text x="{lx + 16}" y="{height - 21}">{escape(k)}</text>')
            lx += 22 + 6.5 * len(k)
    return "\n".join(parts + ["</svg>"])
