"""results.json -> report.html (self-contained: inline CSS, plots as base64 PNG) and report.md.

Sections: the arms (each one's stage-1 stream and loss, what stage 2 aligned on and the budget
each stage used: results["arms"], written by the report stage), the results table (arm x stage,
each benchmark's main metric in the plain format and, for aligned stages, through the chat
template, and KL to base; each with its 95% interval), the claims table (results["claims"],
mixcpt.evaluate.claims), retention against the base, a domain-versus-general plot with interval
error bars (what was gained against what was kept), the Pareto plots of domain gained against
general ability lost after stage 1 and after alignment with their tables (mixcpt.report.pareto),
training loss curves with the forgetting monitor's kl_to_base, the data mixture's token shares,
and the time each stage took (mixcpt.timing). Each section says so when its part of results.json
is absent, so a partial run still gets a report. The same code renders the aggregate
of several seeds (mixcpt.evaluate.seeds), whose results.json has the same "eval" and "claims" and
a "seeds" entry.

The cells come from mixcpt.report.tables, the PNGs from mixcpt.report.plots (and both of the
Pareto section from mixcpt.report.pareto); this module
assembles the page and runs the report stage.
"""

from __future__ import annotations

import html
from pathlib import Path

from mixcpt.atomic import write_text_atomic
from mixcpt.config import Config
from mixcpt.fingerprints import begin
from mixcpt.report.pareto import ALIGNED, STAGE_ONE, pareto_table, plot_pareto
from mixcpt.report.plots import plot_domain_vs_general, plot_losses, plot_mixture
from mixcpt.report.tables import (
    arm_summaries,
    arms_table,
    claims_table,
    mixture_table,
    results_table,
    retention_table,
    timing_table,
)
from mixcpt.rundir import RunDir

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
    pareto = {when: pareto_table(results, when) for when in (STAGE_ONE, ALIGNED)}
    pareto_note = (
        "Every arm is a point: domain gain = its mean plain-format accuracy on the domain "
        "benchmarks minus the base's; general loss = the base's mean plain-format accuracy on the "
        "general benchmarks minus its (perplexity benchmarks are left out); KL to base on the "
        "probe as in the results table. Bars and cells: 95% intervals, paired with the base. "
        "Arms sharing one model are one point. On the frontier (dashed; ✔ in the table, for "
        "each panel): no other point is at least as good on both axes and better on one."
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
        *(
            (
                f"Pareto plot {when}",
                plot_pareto(results, when),
                "needs the base and an arm "
                + ("after stage 1" if when == STAGE_ONE else "with sft or dpo")
                + " evaluated on domain and general accuracy benchmarks",
                _html_table(*pareto[when]) + f"<p class='note'>{html.escape(pareto_note)}</p>"
                if pareto[when][1]
                else "",
            )
            for when in (STAGE_ONE, ALIGNED)
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
        "Stage 1 trains on the mix stream (D_MIX: domain corpus and general samples), the "
        "domain stream (D_K: D_MIX's domain documents) or the replay stream (D_K's documents "
        "with general pre-training text, about D_MIX's size). Arms with the same stage-1 "
        "settings share one stage-1 model, and arms with the same model and select settings one "
        "selection. Budgets: the tokens stage 1 trained on (repeats and padding counted), its "
        "steps, passes over its stream and domain tokens: arms on D_MIX train with cpt.training as "
        "set, arms on D_K and D_R make as many passes as over D_MIX, so every arm sees the same "
        "domain tokens; then the distinct samples SFT and pairs DPO trained on, each "
        "with its optimizer steps."
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
        *(
            line
            for when in (STAGE_ONE, ALIGNED)
            if pareto[when][1]
            for line in (f"## Pareto {when}", "", _md_table(*pareto[when]), "", pareto_note, "")
        ),
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
        "Plots (domain versus general, Pareto, training loss, mixture shares) are in report.html.",
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
