"""results.json -> report.html (self-contained: inline CSS, plots as base64 PNG) and report.md.

Sections: the arms (each one's stage-1 stream and loss, what stage 2 aligned on and the budget
each stage used: results["arms"], written by the report stage), the results table (arm x stage,
each benchmark's main metric and KL to base), a domain-versus-general plot (what was gained
against what was kept), training loss curves, the data mixture's token shares, and the time each
stage took (mixcpt.timing). Each section says so when its part of results.json is absent, so a
partial run still gets a report.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from mixcpt.atomic import write_text_atomic  # noqa: E402
from mixcpt.config import Config  # noqa: E402
from mixcpt.config.arms import BUILTIN_ARMS  # noqa: E402
from mixcpt.fingerprints import begin  # noqa: E402
from mixcpt.pipeline import STAGES, arms, selection_owner, stage1_owner  # noqa: E402
from mixcpt.rundir import RunDir  # noqa: E402
from mixcpt.timing import rate  # noqa: E402

STAGE_ORDER = ("base", "cpt", "sft", "dpo")
STAGE_DASH = {"cpt": "-", "sft": "--", "dpo": ":"}
# the built-in arms keep their colours whatever the config lists; other arms take the rest
ARM_COLORS = {
    "mixcpt": "tab:blue",
    "baseline": "tab:orange",
    "mixture-ce": "tab:green",
    "random-k": "tab:red",
    "whole-pool": "tab:purple",
}
OTHER_COLORS = ("tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
ARM_LABELS = {"mixcpt": "Mix-CPT", "baseline": "baseline (CPT, SFT, DPO)"}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; }
h2 { font-size: 1.25rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child, td:nth-child(2) { text-align: left; }
tr.missing td { color: #999; font-style: italic; }
table.words th, table.words td { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0; }
.note { color: #666; font-size: .9rem; }
"""


# ---- data extracted from results.json ------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _stage_cell(row: dict) -> str:
    """A row's stage, saying whose model it is when the arm shares another's stage 1."""
    stage = row.get("stage", "?")
    return f"{stage} (= {row['shared_with']})" if row.get("shared_with") else stage


def arm_order(results: dict) -> list[str]:
    """Arm names in the run's order (results["arms"], else the eval rows), then the built-in
    arms, so that every table and plot lists arms alike."""
    names = [a["arm"] for a in results.get("arms", [])]
    names += [r["arm"] for r in results.get("eval", {}).get("rows", []) if r.get("arm") != "base"]
    return list(dict.fromkeys([*names, *BUILTIN_ARMS]))


def arm_colors(results: dict) -> dict[str, str]:
    """A colour per arm: the built-ins' own, the others in turn."""
    others = (name for name in arm_order(results) if name not in ARM_COLORS)
    return {**ARM_COLORS, **dict(zip(others, itertools.cycle(OTHER_COLORS)))}


def _loss(summary: dict) -> str:
    ce, lssd, teacher = summary["ce_weight"], summary["lssd_weight"], summary["teacher"]
    terms = [f"{ce:g} CE"] if ce else []
    terms += [f"{lssd:g} LSSD ({teacher} teacher)"] if lssd else []
    return " + ".join(terms)


def _budget(count, unit: str, steps) -> str:
    return "" if count is None else f"{count:,} {unit}, {steps} steps"


def arms_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of results["arms"]: each arm's stage-1 stream and loss, what stage 2
    aligned on, and what each stage trained on (blank where the stage has not run)."""
    header = ["arm", "like", "stage 1", "stage-1 budget", "stage 2 on", "SFT budget", "DPO budget"]
    cells = []
    for a in results.get("arms", []):
        stage1 = f"{a['stream']} stream, {_loss(a)}"
        if a["stage1_shared_with"]:
            stage1 += f" (the model of {a['stage1_shared_with']})"
        select = a["select"]
        if select is None:
            stage2 = "the whole pool"
        else:
            stage2 = f"k={select['k']} {select['strategy']} by {select['score']}"
            if select["strategy"] == "random":  # scored all the same, but not chosen by score
                stage2 = f"k={select['k']} at random"
            if a["selection_shared_with"]:
                stage2 += f" (the selection of {a['selection_shared_with']})"
        dpo = _budget(a["dpo_pairs"], "pairs", a["dpo_steps"]) if a["run_dpo"] else "no DPO"
        cells.append(
            [
                a["arm"],
                a["like"],
                stage1,
                _budget(a["stage1_tokens"], "tokens", a["stage1_steps"]),
                stage2,
                _budget(a["sft_samples"], "samples", a["sft_steps"]),
                dpo,
            ]
        )
    return header, cells


def arm_summaries(cfg: Config, results: dict) -> list[dict]:
    """What results["arms"] holds, per arm of `cfg` in order: its name and the built-in it is or is
    like; stage 1's stream, loss weights, teacher (None without LSSD), the arm whose stage-1 model
    it uses when not its own, and that model's steps and tokens; stage 2's selection ({k,
    strategy, score}, None on the whole pool) and whose it is when shared; SFT's samples and
    steps; whether it runs DPO, and DPO's pairs and steps. Counts are those results.json records
    (None for a stage not run yet)."""
    stages = results.get("stages", {})
    summaries = []
    for arm in arms(cfg):
        cpt, select = arm.config.cpt, arm.config.select
        stage1, selection = stage1_owner(cfg, arm.name), selection_owner(cfg, arm.name)
        trained = {s: stages.get(f"{arm.name}/{s}", {}) for s in ("sft", "dpo")}
        trained["cpt"] = stages.get(f"{stage1}/cpt", {})
        summaries.append(
            {
                "arm": arm.name,
                "like": arm.like,
                "stream": arm.stream,
                "ce_weight": cpt.ce_weight,
                "lssd_weight": cpt.lssd_weight,
                "teacher": cpt.teacher if cpt.lssd_weight > 0 else None,
                "stage1_shared_with": stage1 if stage1 != arm.name else None,
                "stage1_tokens": trained["cpt"].get("tokens"),
                "stage1_steps": trained["cpt"].get("steps"),
                "select": None
                if selection is None
                else {"k": select.k, "strategy": select.strategy, "score": select.score},
                "selection_shared_with": selection if selection not in (None, arm.name) else None,
                "sft_samples": trained["sft"].get("n_samples"),
                "sft_steps": trained["sft"].get("steps"),
                "run_dpo": arm.run_dpo and bool(cfg.data.preferences),
                "dpo_pairs": trained["dpo"].get("n_pairs"),
                "dpo_steps": trained["dpo"].get("steps"),
            }
        )
    return summaries


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
        line = [row.get("arm", "?"), _stage_cell(row)]
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
        [r["arm"], _stage_cell(r)]
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


def _build_order(node: str, order: list[str]) -> tuple[int, int]:
    stage, _, arm = node.partition("/")
    stages = ("data", "cache", *STAGES[1:])  # `mixcpt cache` runs between data and cpt
    return stages.index(stage), order.index(arm) if arm in order else len(order)


def timing_table(results: dict) -> tuple[list[str], list[list[str]], float]:
    """(header, cells, seconds in all) of the time each stage took, in build order. The report
    stage itself is left out: it is timed after this table is written."""
    timing = results.get("timing", {})
    header = ["stage", "wall time", "processed", "throughput", "this run"]
    cells, total = [], 0.0
    order = arm_order(results)
    nodes = sorted((n for n in timing if n != "report"), key=lambda n: _build_order(n, order))
    for node in nodes:
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
    colors = arm_colors(results)
    for arm in arm_order(results):
        color, label = colors[arm], ARM_LABELS.get(arm, arm)
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
    colors = arm_colors(results)
    for key, points in curves.items():
        arm, _, stage = key.partition("/")  # keys are "arm/stage": colour = arm, dash = stage
        style = {"color": colors[arm]} if arm in colors else {}
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
    header: list[str],
    cells: list[list[str]],
    missing: list[bool] | None = None,
    words: bool = False,
) -> str:
    """An HTML table; numbers are right-aligned, and `words` left-aligns every column."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = ""
    for i, line in enumerate(cells):
        cls = ' class="missing"' if missing and missing[i] else ""
        body += f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>\n"
    table = "<table class='words'>" if words else "<table>"
    return f"{table}<thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def _md_table(header: list[str], cells: list[list[str]]) -> str:
    esc = lambda s: html.escape(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in line) + " |" for line in cells]
    return "\n".join(lines)


def write_report(run: RunDir) -> tuple[Path, Path]:
    """Write `report.html` and `report.md` into the run folder from its results.json; return both
    paths."""
    results = run.read_results()
    arm_header, arm_cells = arms_table(results)
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
    no_arms = "The arms are listed once the report stage has run (`mixcpt report`)."
    arms_note = (
        "Stage 1 trains on the mix stream (D_MIX: domain corpus and general samples) or the "
        "domain stream (D_K). Arms with the same stage-1 settings share one stage-1 model, and "
        "arms with the same model and select settings one selection. Budgets: the tokens stage 1 "
        "trained on (repeats and padding counted), the distinct samples SFT and pairs DPO trained "
        "on, each with its optimizer steps."
    )

    parts = [
        f"<h1>Mix-CPT report</h1><p class='note'>Run folder: {html.escape(str(run.root))}</p>",
        "<h2>Arms</h2>",
        _html_table(arm_header, arm_cells, words=True)
        if arm_cells
        else f"<p class='note'>{html.escape(no_arms)}</p>",
        f"<p class='note'>{html.escape(arms_note)}</p>" if arm_cells else "",
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
        "## Arms",
        "",
        _md_table(arm_header, arm_cells) + "\n\n" + arms_note if arm_cells else no_arms,
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
        run.set_results("arms", arm_summaries(cfg, run.read_results()))
        write_report(run)
        run.update_results("report", "fingerprint", record)
    return run.root / "report.html", run.root / "report.md"
