"""results.json -> report.html (self-contained: inline CSS, plots as base64 PNG) and report.md.

Sections: the arms (each one's stage-1 stream and loss, what stage 2 aligned on and the budget
each stage used: results["arms"], written by the report stage), the results table (arm x stage,
each benchmark's main metric in the plain format and, for aligned stages, through the chat
template, and KL to base; each with its 95% interval), the claims table (results["claims"],
mixcpt.evaluate.claims), retention against the base, a domain-versus-general plot with interval
error bars (what was gained against what was kept), training loss curves, the data mixture's
token shares, and the time each stage took (mixcpt.timing). Each section says so when its part of
results.json is absent, so a partial run still gets a report. The same code renders the aggregate
of several seeds (mixcpt.evaluate.seeds), whose results.json has the same "eval" and "claims" and
a "seeds" entry.
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
from mixcpt.evaluate.intervals import axis  # noqa: E402
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
# How the built-in arms are named in plots; any other arm is named as it is.
ARM_LABEL = {
    "mixcpt": "Mix-CPT",
    "baseline": "baseline (CPT, SFT, DPO)",
    "mixture-ce": "mixture, CE only",
    "random-k": "random k",
    "whole-pool": "whole pool",
}
VERDICT_MARK = {"supported": "✔ supported", "contradicted": "✘ contradicted"}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; }
h2 { font-size: 1.25rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; display: block;
        overflow-x: auto; }
table.text td, table.text th { text-align: left; vertical-align: top; }
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


def _with_ci(value: Any, ci: list[float] | None) -> str:
    """ "0.75 [0.70, 0.80]": a value and its 95% interval, or the value alone when it has none."""
    if value is None or ci is None:
        return _fmt(value)
    return f"{_fmt(value)} [{ci[0]:.3g}, {ci[1]:.3g}]"


def _columns(benchmarks: dict) -> list[tuple[str, str, str]]:
    """(row key, benchmark, header) of every score column: each benchmark's main metric in its
    format ("scores": plain unless the benchmark forces chat), then through the chat template
    for the benchmarks that aligned stages are also scored in ("chat_scores")."""
    columns = []
    for name, b in benchmarks.items():
        fmt = f", {b['format']}" if b.get("format") else ""
        columns.append(
            ("scores", name, f"{name} ({b.get('tag', '?')}, {b.get('main_metric')}{fmt})")
        )
    for name, b in benchmarks.items():
        if b.get("chat_when_aligned"):
            columns.append(
                ("chat_scores", name, f"{name} ({b.get('tag', '?')}, {b.get('main_metric')}, chat)")
            )
    return columns


def results_table(results: dict) -> tuple[list[str], list[list[str]], list[bool]]:
    """(header, cells, row is missing) of the arm x stage table: one column per benchmark's
    main metric in the plain format, one per benchmark scored through the chat template (aligned
    stages only; blank elsewhere), then KL to base; each cell with its 95% interval when the
    results have one."""
    ev = results.get("eval", {})
    benchmarks, rows = ev.get("benchmarks", {}), ev.get("rows", [])
    columns = _columns(benchmarks)
    header = ["arm", "stage"] + [h for _, _, h in columns] + ["KL to base"]
    cells, missing = [], []
    for row in rows:
        line = [row.get("arm", "?"), _stage_cell(row)]
        if row.get("status") != "ok":
            line += ["missing"] + [""] * len(columns)
        else:
            intervals = row.get("intervals", {})
            for key, name, _ in columns:
                value = row.get(key, {}).get(name, {}).get(benchmarks[name].get("main_metric"))
                line.append(_with_ci(value, intervals.get(key, {}).get(name)))
            kl = row.get("retention", {}).get("kl_to_base")
            line.append(_with_ci(kl, intervals.get("kl_to_base")))
        cells.append(line)
        missing.append(row.get("status") != "ok")
    return header, cells, missing


def retention_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, cells): for each evaluated stage, the change of every general benchmark's main
    score (plain format) against the base model, and KL to base, with 95% intervals (paired with
    the base) when the results have them."""
    ev = results.get("eval", {})
    rows = [r for r in ev.get("rows", []) if r.get("status") == "ok" and r.get("arm") != "base"]
    general = sorted({n for r in rows for n in r.get("retention", {}).get("delta", {})})
    metric = {n: ev.get("benchmarks", {}).get(n, {}).get("main_metric", "") for n in general}
    header = ["arm", "stage"] + [f"Δ {n} ({metric[n]})" for n in general] + ["KL to base"]
    cells = []
    for r in rows:
        intervals = r.get("intervals", {})
        cells.append(
            [r["arm"], _stage_cell(r)]
            + [
                _with_ci(r["retention"]["delta"].get(n), intervals.get("delta", {}).get(n))
                for n in general
            ]
            + [_with_ci(r["retention"].get("kl_to_base"), intervals.get("kl_to_base"))]
        )
    return header, cells


def claims_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, cells): one line per measure of each claim (results["claims"]), the claim's
    verdict on its first line; numbers are means with 95% intervals."""
    header = [
        "claim",
        "verdict",
        "measure",
        "stage",
        "format",
        "A",
        "B",
        "A − B",
        "measure verdict",
    ]
    cells = []
    for claim in results.get("claims", []):
        for i, m in enumerate(claim["measures"]):
            first = i == 0
            verdict = VERDICT_MARK.get(claim["verdict"], claim["verdict"])
            if first and claim.get("reason"):
                verdict += f" ({claim['reason']})"
            stage = ", ".join(f"{a}: {s}" for a, s in m.get("stage", {}).items()) or m["when"]

            def side(x: dict | None, arm: str) -> str:
                return f"{arm}: {_with_ci(x['mean'], x['ci'])}" if x else arm

            diff = m.get("difference")
            m_verdict = m["verdict"] + ("" if m["decides"] else " (shown, does not decide)")
            if m.get("reason"):
                m_verdict += f": {m['reason']}"
            cells.append(
                [
                    f"{claim['id']}. {claim['claim']}" if first else "",
                    verdict if first else "",
                    f"{m['measure']} ({', '.join(m['benchmarks'])})",
                    stage,
                    m["format"],
                    side(m.get("a"), claim["arms"][0]),
                    side(m.get("b"), claim["arms"][1]),
                    _with_ci(diff["mean"], diff["ci"]) if diff else "",
                    m_verdict,
                ]
            )
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
    """Base64 PNG of `domain_vs_general_figure`, or None when there is nothing to plot."""
    fig = domain_vs_general_figure(results)
    return _png(fig) if fig is not None else None


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
    ax.grid(alpha=0.3), ax.legend()
    ax.set_title("Domain gained vs general kept (bars: 95% intervals)"), ax.margins(0.12)
    return fig


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
    cls: str = "",
) -> str:
    """An HTML table (escaped); `missing` rows greyed; `cls` "text": every cell left-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = ""
    for i, line in enumerate(cells):
        row_cls = ' class="missing"' if missing and missing[i] else ""
        body += f"<tr{row_cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>\n"
    table = f'<table class="{cls}">' if cls else "<table>"
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
    claims = claims_table(results)
    seeds = results.get("seeds")  # an aggregate over seeds (mixcpt.evaluate.seeds)
    boot = results.get("eval", {}).get("bootstrap")
    intervals_note = (
        f"Cells: mean [{boot['level']:.0%} interval]; {boot['scheme']}. Seeds: "
        f"{', '.join(map(str, boot['seeds']))}"
        + (" (one seed: intervals over items only)." if len(boot["seeds"]) == 1 else ".")
        if boot
        else ""
    )
    claims_note = (
        "A and B are the two arms compared; each measure is the mean main score of the "
        "benchmarks named (or the KL to base on the probe, lower is better), at the stage named "
        "for each arm. Rules: "
        + "; ".join(sorted({f"{c['test']}: {c['rule']}" for c in results.get("claims", [])}))
        + ". Retention measures use the plain format; comparisons of two aligned arms are "
        "decided through the chat template (how an aligned model is used; both sides aligned)."
    )
    no_claims = "No claims yet: they are decided when the eval stage runs."
    seeds_note = (
        "Aggregate of one run per seed: "
        + ", ".join(f"seed {s} in {f}/" for s, f in zip(seeds["values"], seeds["folders"]))
        + ". Loss curves, data mixture and time per stage are in each seed's own report."
        if seeds
        else ""
    )
    per_seed = "in each seed's own report (seed-<s>/report.html)" if seeds else ""
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
        (
            "Training loss",
            plot_losses(results),
            per_seed or "no training stage has logged a loss yet",
            "",
        ),
        (
            "Data mixture",
            plot_mixture(results),
            per_seed or "the data stage has not run yet",
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
        _html_table(arm_header, arm_cells, cls="text")
        if arm_cells
        else f"<p class='note'>{html.escape(no_arms)}</p>",
        f"<p class='note'>{html.escape(arms_note)}</p>" if arm_cells else "",
        f"<p class='note'>{html.escape(seeds_note)}</p>" if seeds_note else "",
        "<h2>Results</h2>",
        _html_table(header, cells, missing)
        if cells
        else f"<p class='note'>{html.escape(no_eval)}</p>",
        "<p class='note'>Main metric per benchmark, every stage in the plain format the base "
        "and stage 1 saw; aligned stages (sft, dpo) also through the chat template, in the "
        "columns marked chat. KL to base is the mean per-token KL(base || stage) on the general "
        "probe text (lower = more retained).</p>",
        f"<p class='note'>{html.escape(intervals_note)}</p>" if intervals_note else "",
        "<h2>Claims</h2>",
        _html_table(*claims, cls="text")
        if claims[1]
        else f"<p class='note'>{html.escape(no_claims)}</p>",
        f"<p class='note'>{html.escape(claims_note)}</p>" if claims[1] else "",
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
        else f"<p class='note'>{html.escape(seeds_note or no_timing)}</p>",
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
        *([seeds_note, ""] if seeds_note else []),
        "## Results",
        "",
        _md_table(header, cells) if cells else no_eval,
        "",
        *([intervals_note, ""] if intervals_note else []),
        "## Claims",
        "",
        _md_table(*claims) + "\n\n" + claims_note if claims[1] else no_claims,
        "",
        "## Retention",
        "",
        _md_table(*ret) if ret[1] else "No trained stage evaluated yet.",
        "",
        "## Data mixture",
        "",
        _md_table(mix_header, mix_cells)
        if mix_cells
        else seeds_note or "The data stage has not run yet.",
        "",
        "## Time per stage",
        "",
        _md_table(time_header, time_cells) + "\n\n" + whole_run
        if time_cells
        else seeds_note or no_timing,
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
