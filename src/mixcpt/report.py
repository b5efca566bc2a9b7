"""results.json -> report.html (self-contained: inline CSS, plots as base64 PNG) and report.md.

Sections: the results table (arm x stage, each benchmark's main metric and KL to base), a
domain-versus-general plot (what was gained against what was kept), training loss curves, the
data mixture's token shares, and the time each stage took (mixcpt.timing). Each section says so
when its part of results.json is absent, so a partial run still gets a report.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from mixcpt.atomic import write_text_atomic  # noqa: E402
from mixcpt.config import Config  # noqa: E402
from mixcpt.fingerprints import begin  # noqa: E402
from mixcpt.pipeline import STAGES  # noqa: E402
from mixcpt.rundir import ARMS, RunDir  # noqa: E402
from mixcpt.timing import rate  # noqa: E402

STAGE_ORDER = ("base", "cpt", "sft", "dpo")
STAGE_DASH = {"cpt": "-", "sft": "--", "dpo": ":"}
ARM_STYLE = {
    "mixcpt": ("tab:blue", "Mix-CPT"),
    "baseline": ("tab:orange", "baseline (CPT, SFT, DPO)"),
}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; }
h2 { font-size: 1.25rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child, td:nth-child(2) { text-align: left; }
tr.missing td { color: #999; font-style: italic; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0; }
.note { color: #666; font-size: .9rem; }
"""


# ---- data extracted from results.json ------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def results_table(results: dict) -> tuple[list[str], list[list[str]], list[bool]]:
    """(header, cells, row is missing) of the arm x stage table: one column per benchmark's
    main metric, then KL to base."""
    ev = results.get("eval", {})
    benchmarks, rows = ev.get("benchmarks", {}), ev.get("rows", [])
    header = ["arm", "stage"] + [
        f"{name} ({b.get('tag', '?')}, {b.get('main_metric')})" for name, b in benchmarks.items()
    ]
    header.append("KL to base")
    cells, missing = [], []
    for row in rows:
        line = [row.get("arm", "?"), row.get("stage", "?")]
        if row.get("status") != "ok":
            line += ["missing"] + [""] * len(benchmarks)
        else:
            for name, b in benchmarks.items():
                line.append(_fmt(row.get("scores", {}).get(name, {}).get(b.get("main_metric"))))
            line.append(_fmt(row.get("retention", {}).get("kl_to_base")))
        cells.append(line)
        missing.append(row.get("status") != "ok")
    return header, cells, missing


def _axis(benchmarks: dict, tag: str) -> tuple[list[str], str]:
    """Benchmarks averaged on the `tag` axis: the higher-is-better ones when there are any
    (scores on one scale), else the lower-is-better ones; and the axis label."""
    tagged = {n: b for n, b in benchmarks.items() if b.get("tag") == tag and b.get("main_metric")}
    better = [n for n, b in tagged.items() if b.get("higher_is_better", True)]
    if better:
        return better, f"mean {tag} score (higher is better)"
    return (
        list(tagged),
        f"mean {tag} {', '.join(sorted({tagged[n]['main_metric'] for n in tagged}))} "
        "(lower is better)",
    )


def retention_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, cells): for each evaluated stage, the change of every general benchmark's main
    score against the base model, and KL to base."""
    ev = results.get("eval", {})
    rows = [r for r in ev.get("rows", []) if r.get("status") == "ok" and r.get("arm") != "base"]
    general = sorted({n for r in rows for n in r.get("retention", {}).get("delta", {})})
    metric = {n: ev.get("benchmarks", {}).get(n, {}).get("main_metric", "") for n in general}
    header = ["arm", "stage"] + [f"Δ {n} ({metric[n]})" for n in general] + ["KL to base"]
    cells = [
        [r["arm"], r["stage"]]
        + [_fmt(r["retention"]["delta"].get(n)) for n in general]
        + [_fmt(r["retention"].get("kl_to_base"))]
        for r in rows
    ]
    return header, cells


def mixture_table(results: dict) -> tuple[list[str], list[list[str]]]:
    sources = results.get("data", {}).get("mix", {}).get("sources", {})
    header = ["source", "group", "documents", "tokens", "share", "target share"]
    cells = [
        [
            label,
            s.get("group", ""),
            _fmt(s.get("documents")),
            _fmt(s.get("tokens")),
            f"{s.get('share', 0):.1%}",
            f"{s.get('target_share', 0):.1%}",
        ]
        for label, s in sources.items()
    ]
    return header, cells


def _build_order(node: str) -> tuple[int, int]:
    stage, _, arm = node.partition("/")
    order = ("data", "cache", *STAGES[1:])  # `mixcpt cache` runs between data and cpt
    return order.index(stage), ARMS.index(arm) if arm else 0


def timing_table(results: dict) -> tuple[list[str], list[list[str]], float]:
    """(header, cells, seconds in all) of the time each stage took, in build order. The report
    stage itself is left out: it is timed after this table is written."""
    timing = results.get("timing", {})
    header = ["stage", "wall time", "processed", "throughput", "this run"]
    cells, total = [], 0.0
    for node in sorted((n for n in timing if n != "report"), key=_build_order):
        entry = timing[node]
        if entry.get("reused"):
            this_run = "reused"
        elif "resumed_at_step" in entry:
            this_run = f"resumed at step {entry['resumed_at_step']}"
        else:
            this_run = "built"
        if "wall_s" not in entry:  # reused from a build that recorded no timing
            cells.append([node, "not recorded", "", "", this_run])
            continue
        unit = entry["unit"]
        total += entry["wall_s"]
        cells.append(
            [
                node,
                f"{entry['wall_s']:.1f} s",
                f"{entry['processed']:,} {unit}",
                f"{rate(entry['per_s'])} {unit}/s",
                this_run,
            ]
        )
    return header, cells, total


# ---- plots ---------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_domain_vs_general(results: dict) -> str | None:
    """Base64 PNG: each ok stage a point at (mean domain score, mean general score), each arm a
    line base -> cpt -> sft -> dpo. None when there is nothing to plot."""
    ev = results.get("eval", {})
    benchmarks, rows = (
        ev.get("benchmarks", {}),
        [r for r in ev.get("rows", []) if r.get("status") == "ok"],
    )
    (domain, xlabel), (general, ylabel) = _axis(benchmarks, "domain"), _axis(benchmarks, "general")
    if not rows or not domain or not general:
        return None

    def mean_main(row, names):
        values = [row["scores"].get(n, {}).get(benchmarks[n]["main_metric"]) for n in names]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    points = {(r["arm"], r["stage"]): (mean_main(r, domain), mean_main(r, general)) for r in rows}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm, (color, label) in ARM_STYLE.items():
        path = [
            (s, points.get((arm, s), points.get(("base", "base")) if s == "base" else None))
            for s in STAGE_ORDER
        ]
        path = [(s, p) for s, p in path if p and None not in p]
        if len(path) < 2:
            continue  # the base point alone is drawn below
        ax.plot([p[0] for _, p in path], [p[1] for _, p in path], "-o", color=color, label=label)
        for stage, (x, y) in path[1:]:
            ax.annotate(
                stage, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9, color=color
            )
    if None not in points.get(("base", "base"), (None,)):
        ax.plot(*points[("base", "base")], "ks", markersize=8, label="base", zorder=3)
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.grid(alpha=0.3), ax.legend()
    ax.set_title("Domain gained vs general kept"), ax.margins(0.12)  # room for the stage labels
    return _png(fig)


def plot_losses(results: dict) -> str | None:
    """Base64 PNG of the training loss against step for every stage with a log history."""
    curves = {}
    for key, stage in sorted(results.get("stages", {}).items()):
        history = stage.get("log_history", []) if isinstance(stage, dict) else []
        points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        if points:
            curves[key] = points
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, points in curves.items():
        arm, _, stage = key.partition("/")  # keys are "arm/stage": colour = arm, dash = stage
        style = {"color": ARM_STYLE[arm][0]} if arm in ARM_STYLE else {}
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            STAGE_DASH.get(stage, "-"),
            label=key,
            **style,
        )
    ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.grid(alpha=0.3), ax.legend()
    ax.set_title("Training loss per stage")
    return _png(fig)


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
    return _png(fig)


# ---- rendering -----------------------------------------------------------------------------


def _html_table(
    header: list[str], cells: list[list[str]], missing: list[bool] | None = None
) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = ""
    for i, line in enumerate(cells):
        cls = ' class="missing"' if missing and missing[i] else ""
        body += f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>\n"
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def _md_table(header: list[str], cells: list[list[str]]) -> str:
    esc = lambda s: html.escape(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in line) + " |" for line in cells]
    return "\n".join(lines)


def write_report(run: RunDir) -> tuple[Path, Path]:
    """Write `report.html` and `report.md` into the run folder from its results.json; return both
    paths."""
    results = run.read_results()
    header, cells, missing = results_table(results)
    mix_header, mix_cells = mixture_table(results)
    ret = retention_table(results)
    time_header, time_cells, total_s = timing_table(results)
    no_timing = "No stage has been timed yet."
    whole_run = (
        f"Whole run: {total_s:.1f} s, the sum of the stages above (reused ones at the time their "
        "build took; the report itself not included). Wall time of each stage from start to "
        "saved output: loading, teacher cache, training, scoring and saving included."
    )
    # (title, base64 PNG or None, why it may be absent, what follows the plot)
    plots = [
        (
            "Domain versus general",
            plot_domain_vs_general(results),
            "needs domain and general benchmarks evaluated",
            "<p class='note'>Each axis averages the main score of the benchmarks with that tag "
            "(the accuracy-type ones when there are any). Up and right is better.</p>",
        ),
        ("Training loss", plot_losses(results), "no training stage has logged a loss yet", ""),
        (
            "Data mixture",
            plot_mixture(results),
            "the data stage has not run yet",
            _html_table(mix_header, mix_cells) if mix_cells else "",
        ),
    ]
    no_eval = "No evaluation yet: run `mixcpt eval`."

    parts = [
        f"<h1>Mix-CPT report</h1><p class='note'>Run folder: {html.escape(str(run.root))}</p>",
        "<h2>Results</h2>",
        _html_table(header, cells, missing)
        if cells
        else f"<p class='note'>{html.escape(no_eval)}</p>",
        "<p class='note'>Main metric per benchmark; KL to base is the mean per-token "
        "KL(base || stage) on the general probe text (lower = more retained).</p>",
        "<h2>Retention</h2>",
        _html_table(*ret) if ret[1] else "<p class='note'>No trained stage evaluated yet.</p>",
        "<p class='note'>Change of each general benchmark's main score against the base model "
        "(for bits per byte and perplexity, a rise is a loss).</p>",
    ]
    for title, png, absent, after in plots:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if png:
            parts.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">')
        else:
            parts.append(f"<p class='note'>Not available: {html.escape(absent)}.</p>")
        parts.append(after)
    parts += [
        "<h2>Time per stage</h2>",
        _html_table(time_header, time_cells)
        if time_cells
        else f"<p class='note'>{html.escape(no_timing)}</p>",
        f"<p class='note'>{html.escape(whole_run)}</p>" if time_cells else "",
    ]
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>Mix-CPT report</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )

    md = [
        "# Mix-CPT report",
        "",
        "## Results",
        "",
        _md_table(header, cells) if cells else no_eval,
        "",
        "## Retention",
        "",
        _md_table(*ret) if ret[1] else "No trained stage evaluated yet.",
        "",
        "## Data mixture",
        "",
        _md_table(mix_header, mix_cells) if mix_cells else "The data stage has not run yet.",
        "",
        "## Time per stage",
        "",
        _md_table(time_header, time_cells) + "\n\n" + whole_run if time_cells else no_timing,
        "",
        "Plots (domain versus general, training loss, mixture shares) are in report.html.",
        "",
    ]

    html_path, md_path = run.root / "report.html", run.root / "report.md"
    run.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(html_path, page)
    write_text_atomic(md_path, "\n".join(md))
    return html_path, md_path


def run_report(cfg: Config, run: RunDir, force: bool = False) -> tuple[Path, Path]:
    """The report stage: `write_report`, unless the report there was made from the same outputs
    (mixcpt.fingerprints) and not `force`; returns the two paths either way."""
    record = begin(cfg, run, "report", force)
    if record is not None:
        write_report(run)
        run.update_results("report", "fingerprint", record)
    return run.root / "report.html", run.root / "report.md"
