"""The Pareto plot: which way of training gives the most domain for the least loss of general
ability. Every arm of the eval table is a point, whatever it is (a trained recipe, a merge at some
λ, ...): x = domain gain, the mean plain-format accuracy of the domain benchmarks minus the base's
(higher is better); y = general loss, the base's mean plain-format general accuracy minus the
arm's (lower is better); a second panel has y = KL(base || model) on the probe, from the eval
stage (lower is better). The benchmarks are `intervals.accuracy_axis`'s. Error bars are the 95%
bootstrap intervals the eval stage recorded (`intervals._pareto_intervals`: over items, and over
seeds in an aggregate of several); the non-dominated points are joined as the frontier.

One figure after stage 1 (every arm's cpt row) and one after alignment (each arm's last aligned
stage evaluated: dpo, else sft), each with a table of the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import matplotlib.pyplot as plt

from mixcpt.evaluate.intervals import accuracy_axis
from mixcpt.report.plots import arm_colors, figure_png
from mixcpt.report.tables import with_ci

STAGE_ONE = "after stage 1"
ALIGNED = "after alignment"
GAIN_LABEL = "domain gain: plain accuracy − base's (higher is better)"
LOSS_LABEL = "general loss: base's plain accuracy − model's (lower is better)"
KL_LABEL = "KL(base ‖ model) on the probe (lower is better)"


class Point(NamedTuple):
    """One model of the table on the Pareto axes; `arms` are the arms whose row it is (arms that
    share a stage-1 model, or that score exactly alike, are one point)."""

    arms: tuple[str, ...]
    stage: str
    gain: float
    gain_ci: list[float] | None
    loss: float
    loss_ci: list[float] | None
    kl: float | None
    kl_ci: list[float] | None


# the base model's point on every panel: no domain gain, no general loss, no KL to itself
BASE = (0.0, 0.0)


def pareto_front(
    points: Sequence[tuple[float, float]], base: tuple[float, float] | None = BASE
) -> list[int]:
    """Indices of the non-dominated points (x higher is better, y lower is better), by x then y.

    A point is dominated when another, or `base` (the base model: no gain, no loss; None for
    none), is at least as good on both axes and better on one: an arm worse than not training at
    all is not on the frontier. Two equal points do not dominate each other, so both are kept.
    Coordinates are compared rounded to 12 decimals: two means of the same scores can differ by
    float noise (1e-17), which must neither make nor break a tie."""
    points = [(round(x, 12), round(y, 12)) for x, y in points]
    others = [] if base is None else [base]

    def dominated(i: int) -> bool:
        x, y = points[i]
        return any(
            (ox >= x and oy <= y) and (ox > x or oy < y)
            for ox, oy in [*(p for j, p in enumerate(points) if j != i), *others]
        )

    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: points[i])


def _mean_accuracy(row: dict, names: list[str], benchmarks: dict) -> float | None:
    values = [row["scores"].get(n, {}).get(benchmarks[n]["main_metric"]) for n in names]
    return None if None in values or not values else sum(values) / len(values)


def pareto_points(results: dict, when: str) -> list[Point]:
    """The points of the eval table `when` (STAGE_ONE: each arm's cpt row; ALIGNED: each arm's dpo
    row, else its sft row), in the table's order; [] when the table has no base row or no domain
    and general accuracy benchmarks. Means come from the rows' scores; intervals from the rows'
    "intervals" (None where the eval table has none)."""
    ev = results.get("eval", {})
    benchmarks = ev.get("benchmarks", {})
    ok = {(r["arm"], r["stage"]): r for r in ev.get("rows", []) if r.get("status") == "ok"}
    domain, general = accuracy_axis(benchmarks, "domain"), accuracy_axis(benchmarks, "general")
    base = ok.get(("base", "base"))
    if base is None or not domain or not general:
        return []
    base_domain = _mean_accuracy(base, domain, benchmarks)
    base_general = _mean_accuracy(base, general, benchmarks)
    stages = ("cpt",) if when == STAGE_ONE else ("dpo", "sft")
    arms = list(dict.fromkeys(arm for arm, _ in ok if arm != "base"))
    merged: dict[tuple, Point] = {}  # equal numbers -> one point
    for arm in arms:
        stage = next((s for s in stages if (arm, s) in ok), None)
        row = ok.get((arm, stage))
        domain_score = None if row is None else _mean_accuracy(row, domain, benchmarks)
        general_score = None if row is None else _mean_accuracy(row, general, benchmarks)
        if None in (domain_score, general_score, base_domain, base_general):
            continue
        pareto = row.get("intervals", {}).get("pareto", {})
        kl = row.get("retention", {}).get("kl_to_base")
        point = Point(
            (arm,),
            stage,
            domain_score - base_domain,
            pareto.get("domain_gain", {}).get("ci"),
            base_general - general_score,
            pareto.get("general_loss", {}).get("ci"),
            kl,
            row.get("intervals", {}).get("kl_to_base"),
        )
        key = (stage, *(round(v, 12) if v is not None else None for v in point[2::2]))
        if key in merged:
            point = merged[key]._replace(arms=(*merged[key].arms, arm))
        merged[key] = point
    return list(merged.values())


def _errors(value: float, ci: list[float] | None) -> list[list[float]]:
    return [[value - ci[0]], [ci[1] - value]] if ci else [[0.0], [0.0]]


def _separate(fig, labels: list) -> None:
    """Move each annotation of `labels` down a few points at a time until its box overlaps no
    earlier one's, so that the names of close points do not print over each other. Call once
    the figure is laid out (its boxes are in display space)."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for label in labels:
        for _ in range(30):
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            dx, dy = label.xyann
            label.xyann = (dx, dy - 3)
        placed.append(label.get_window_extent(renderer))


def _panel(ax, points: list[Point], colors: dict[str, str], y: str, ylabel: str) -> list:
    """One panel: x = gain, y = the points' `y` field ("loss" or "kl"), with error bars, names,
    the base at the origin and the frontier. Returns the names' annotations."""
    shown = [p for p in points if getattr(p, y) is not None]
    labels = []
    for p in shown:
        value, ci = getattr(p, y), getattr(p, f"{y}_ci")
        color = colors.get(p.arms[0], "tab:gray")
        ax.errorbar(
            p.gain,
            value,
            xerr=_errors(p.gain, p.gain_ci),
            yerr=_errors(value, ci),
            fmt="o",
            color=color,
            capsize=3,
            markersize=6,
            zorder=3,
        )
        names = ", ".join(p.arms[:3]) + (f" +{len(p.arms) - 3} more" if len(p.arms) > 3 else "")
        label = ax.annotate(
            names,
            (p.gain, value),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
            color=color,
        )
        labels.append(label)
    front = pareto_front([(p.gain, getattr(p, y)) for p in shown])
    if front:
        # a ring on each frontier point (a frontier of one point draws no line) and the line
        ax.plot(
            [shown[i].gain for i in front],
            [getattr(shown[i], y) for i in front],
            "--o",
            color="0.35",
            markersize=12,
            markerfacecolor="none",
            linewidth=1.2,
            label="frontier (non-dominated)",
            zorder=2,
        )
    ax.plot(0, 0, "k+", markersize=12, markeredgewidth=2, label="base", zorder=4)
    ax.axhline(0, color="0.8", linewidth=0.8, zorder=1)
    ax.axvline(0, color="0.8", linewidth=0.8, zorder=1)
    ax.set_xlabel(GAIN_LABEL, fontsize=9), ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3), ax.legend(fontsize=8, loc="best"), ax.margins(0.15)
    return labels


def pareto_figure(results: dict, when: str):
    """Matplotlib figure of `pareto_points(results, when)`: general loss against domain gain,
    and beside it KL to base against domain gain when any point has a KL; None without points."""
    points = pareto_points(results, when)
    if not points:
        return None
    with_kl = any(p.kl is not None for p in points)
    fig, axes = plt.subplots(1, 2 if with_kl else 1, figsize=(13 if with_kl else 6.5, 5.2))
    axes = list(axes) if with_kl else [axes]
    colors = arm_colors(results)
    labels = _panel(axes[0], points, colors, "loss", LOSS_LABEL)
    axes[0].set_title("Domain gained vs general accuracy lost", fontsize=10)
    if with_kl:
        labels += _panel(axes[1], points, colors, "kl", KL_LABEL)
        axes[1].set_title("Domain gained vs KL to base", fontsize=10)
    fig.suptitle(f"Pareto plot {when} (bars: 95% intervals; dashed: the frontier)", fontsize=11)
    fig.tight_layout()
    _separate(fig, labels)
    return fig


def pareto_table(results: dict, when: str) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of `pareto_points(results, when)`: each point's arms, stage, domain gain,
    general loss and KL to base with their 95% intervals, and whether it is on each panel's
    frontier."""
    points = pareto_points(results, when)
    front_loss = set(pareto_front([(p.gain, p.loss) for p in points]))
    with_kl = [i for i, p in enumerate(points) if p.kl is not None]
    front_kl = {with_kl[i] for i in pareto_front([(points[j].gain, points[j].kl) for j in with_kl])}
    header = [
        "arm",
        "stage",
        "domain gain",
        "general loss",
        "KL to base",
        "frontier (loss)",
        "frontier (KL)",
    ]
    cells = [
        [
            ", ".join(p.arms),
            p.stage,
            with_ci(p.gain, p.gain_ci),
            with_ci(p.loss, p.loss_ci),
            with_ci(p.kl, p.kl_ci),
            "✔" if i in front_loss else "",
            "✔" if i in front_kl else "",
        ]
        for i, p in enumerate(points)
    ]
    return header, cells


def plot_pareto(results: dict, when: str) -> str | None:
    """Base64 PNG of `pareto_figure(results, when)`, or None when there is nothing to plot."""
    fig = pareto_figure(results, when)
    return figure_png(fig) if fig is not None else None
