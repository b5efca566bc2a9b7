"""The report's plots (matplotlib, no display), as base64 PNGs for the HTML page: domain versus
general with interval error bars, training loss per stage (beside it the forgetting monitor's
kl_to_base), the data mixture's token shares; and the colour and label each arm has in every plot
(the Pareto plots are mixcpt.report.pareto's)."""

from __future__ import annotations

import base64
import io
import itertools

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from mixcpt.evaluate.intervals import axis  # noqa: E402
from mixcpt.report.tables import arm_order  # noqa: E402

STAGE_ORDER = ("base", "cpt", "sft", "dpo")
STAGE_DASH = {"cpt": "-", "sft": "--", "dpo": ":"}
# the built-in arms keep their colours whatever the config lists; other arms take the rest
ARM_COLORS = {
    "mixcpt": "tab:blue",
    "traditional": "tab:orange",
    "baseline": "tab:orange",  # the traditional arm's older name
    "mixture-ce": "tab:green",
    "random-k": "tab:red",
    "whole-pool": "tab:purple",
}
# the rest of matplotlib's tab20 palette, so that 15 or so arms (`demo --arms all`) stay apart
OTHER_COLORS = (
    "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip
# How the built-in arms are named in plots; any other arm is named as it is.
ARM_LABEL = {
    "mixcpt": "Mix-CPT",
    "traditional": "traditional (CPT, SFT, DPO)",
    "baseline": "baseline (CPT, SFT, DPO)",
    "mixture-ce": "mixture, CE only",
    "random-k": "random k",
    "whole-pool": "whole pool",
}


def arm_colors(results: dict) -> dict[str, str]:
    """A colour per arm: the built-ins' own, the others in turn."""
    others = (name for name in arm_order(results) if name not in ARM_COLORS)
    return {**ARM_COLORS, **dict(zip(others, itertools.cycle(OTHER_COLORS)))}


def figure_png(fig) -> str:
    """The figure as a base64 PNG (then closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_domain_vs_general(results: dict) -> str | None:
    """Base64 PNG of `domain_vs_general_figure`, or None when there is nothing to plot."""
    fig = domain_vs_general_figure(results)
    return figure_png(fig) if fig is not None else None


def domain_vs_general_figure(results: dict):
    """Matplotlib figure: each ok stage a point at (mean domain score, mean general score), plain
    format, each arm a line base -> cpt -> sft -> dpo, with 95% interval error bars on both axes
    when the results have them. None when there is nothing to plot."""
    ev = results.get("eval", {})
    benchmarks, rows = (
        ev.get("benchmarks", {}),
        [r for r in ev.get("rows", []) if r.get("status") == "ok"],
    )
    (domain, xlabel), (general, ylabel) = axis(benchmarks, "domain"), axis(benchmarks, "general")
    if not rows or not domain or not general:
        return None

    def mean_main(row, names):
        values = [row["scores"].get(n, {}).get(benchmarks[n]["main_metric"]) for n in names]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    def errors(row, tag, value):
        ci = row.get("intervals", {}).get("axes", {}).get(tag, {}).get("ci")
        return (value - ci[0], ci[1] - value) if ci else (0.0, 0.0)

    points, bars = {}, {}
    for r in rows:
        x, y = mean_main(r, domain), mean_main(r, general)
        points[(r["arm"], r["stage"])] = (x, y)
        if None not in (x, y):
            bars[(r["arm"], r["stage"])] = (errors(r, "domain", x), errors(r, "general", y))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = arm_colors(results)
    for arm in arm_order(results):
        color = colors[arm]
        path = [
            (s, points.get((arm, s), points.get(("base", "base")) if s == "base" else None))
            for s in STAGE_ORDER
        ]
        path = [(s, p) for s, p in path if p and None not in p]
        if len(path) < 2:
            continue  # the base point alone is drawn below
        ax.plot(
            [p[0] for _, p in path],
            [p[1] for _, p in path],
            "-o",
            color=color,
            label=ARM_LABEL.get(arm, arm),
        )
        for stage, (x, y) in path[1:]:
            (xerr, yerr) = bars[(arm, stage)]
            ax.errorbar(
                x,
                y,
                xerr=[[xerr[0]], [xerr[1]]],
                yerr=[[yerr[0]], [yerr[1]]],
                color=color,
                capsize=3,
                alpha=0.6,
                linestyle="none",
            )
            ax.annotate(
                stage, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9, color=color
            )
    if None not in points.get(("base", "base"), (None,)):
        (xerr, yerr) = bars[("base", "base")]
        ax.errorbar(
            *points[("base", "base")],
            xerr=[[xerr[0]], [xerr[1]]],
            yerr=[[yerr[0]], [yerr[1]]],
            fmt="ks",
            markersize=8,
            capsize=3,
            label="base",
            zorder=3,
        )
    ax.set_xlabel(f"{xlabel}, plain format"), ax.set_ylabel(f"{ylabel}, plain format")
    # beside the axes, where it covers no point however many arms there are
    ax.grid(alpha=0.3), ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    ax.set_title("Domain gained vs general kept (bars: 95% intervals)"), ax.margins(0.12)
    return fig


def plot_losses(results: dict) -> str | None:
    """Base64 PNG of the training loss against step for every stage with a log history and,
    beside it when any stage logged one, `kl_to_base` against step: KL(base || model) on the
    training tokens (arms with a teacher) or on the probe (arms without,
    mixcpt.train.forgetting_monitor)."""
    curves, kls = {}, {}
    for key, stage in sorted(results.get("stages", {}).items()):
        history = stage.get("log_history", []) if isinstance(stage, dict) else []
        points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        if points:
            curves[key] = points
        kl = [(h["step"], h["kl_to_base"]) for h in history if "kl_to_base" in h and "step" in h]
        if kl:  # on the probe when the stage trained without a teacher
            kls[key] = kl, "probe" if stage.get("teacher") is None else "training tokens"
    if not curves:
        return None
    panels = [("training loss", {key: (points, "") for key, points in curves.items()})]
    if kls:
        panels.append(("KL(base ‖ model) while training", kls))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    colors = arm_colors(results)
    for ax, (ylabel, lines) in zip(axes[0], panels):
        for key, (points, measured_on) in lines.items():
            arm, _, stage = key.partition("/")  # keys are "arm/stage": colour = arm, dash = stage
            style = {"color": colors[arm]} if arm in colors else {}
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                STAGE_DASH.get(stage, "-"),
                label=f"{key} ({measured_on})" if measured_on else key,
                **style,
            )
        ax.set_xlabel("step"), ax.set_ylabel(ylabel), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    axes[0][0].set_title("Training loss per stage")
    if kls:
        axes[0][1].set_title("Forgetting monitor: kl_to_base per stage-1 arm")
    return figure_png(fig)


def plot_mixture(results: dict) -> str | None:
    """Base64 PNG of each source's achieved and target token share in D_MIX."""
    sources = results.get("data", {}).get("mix", {}).get("sources", {})
    if not sources:
        return None
    labels = list(sources)
    fig, ax = plt.subplots(figsize=(6.5, 0.5 + 0.45 * len(labels)))
    y = range(len(labels))
    ax.barh(
        [i - 0.2 for i in y],
        [sources[s].get("share", 0) for s in labels],
        height=0.4,
        label="achieved",
    )
    ax.barh(
        [i + 0.2 for i in y],
        [sources[s].get("target_share", 0) for s in labels],
        height=0.4,
        label="target",
    )
    ax.set_yticks(list(y), [f"{s} ({sources[s].get('group', '')})" for s in labels])
    (
        ax.invert_yaxis(),
        ax.set_xlabel("share of D_MIX tokens"),
        ax.legend(),
        ax.grid(axis="x", alpha=0.3),
    )
    return figure_png(fig)
