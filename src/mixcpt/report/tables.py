"""The report's tables, each built from results.json as (header, cells[, ...]) of plain strings:
the arms (and arm_summaries, what results["arms"] holds), results, retention, claims, data
mixture and time per stage, with the helpers that format their cells."""

from __future__ import annotations

from typing import Any

from mixcpt.config import Config
from mixcpt.config.arms import BUILTIN_ARMS
from mixcpt.pipeline import STAGES, arms, selection_owner, stage1_owner
from mixcpt.timing import rate

VERDICT_MARK = {"supported": "✔ supported", "contradicted": "✘ contradicted"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _stage_cell(row: dict) -> str:
    """A row's stage, saying whose model it is when the arm shares another's stage 1, or what
    it is the merge of."""
    stage = row.get("stage", "?")
    if row.get("merge"):
        return f"{stage} (= {_merge(row['merge']['of'], row['merge']['base_weight'])})"
    return f"{stage} (= {row['shared_with']})" if row.get("shared_with") else stage


def _merge(of: str, base_weight: float) -> str:
    """A merge in words: "0.75·mixcpt + 0.25·base"."""
    return f"{1 - base_weight:g}·{of} + {base_weight:g}·base"


def arm_order(results: dict) -> list[str]:
    """Arm names in the run's order (results["arms"], else the eval rows), then the built-in
    arms, so that every table and plot lists arms alike."""
    names = [a["arm"] for a in results.get("arms", [])]
    names += [r["arm"] for r in results.get("eval", {}).get("rows", []) if r.get("arm") != "base"]
    return list(dict.fromkeys([*names, *BUILTIN_ARMS]))


def _loss(summary: dict) -> str:
    ce, lssd, teacher = summary["ce_weight"], summary["lssd_weight"], summary["teacher"]
    terms = [f"{ce:g} CE"] if ce else []
    objective = summary.get("objective", "lssd").upper()  # results written before objectives: lssd
    terms += [f"{lssd:g} {objective} ({teacher} teacher)"] if lssd else []
    return " + ".join(terms)


def _budget(count, unit: str, steps) -> str:
    return "" if count is None else f"{count:,} {unit}, {steps} steps"


def _stage1_budget(summary: dict) -> str:
    """Stage 1's tokens and steps, then the passes over its stream and the domain tokens in them
    (what the budgets of the streams are matched on)."""
    budget = _budget(summary["stage1_tokens"], "tokens", summary["stage1_steps"])
    passes, domain = summary.get("stage1_passes"), summary.get("stage1_domain_tokens")
    if budget and passes is not None and domain is not None:
        budget += f" ({passes:.3g} passes, {domain:,} domain tokens)"
    return budget


def arms_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of results["arms"]: each arm's stage-1 stream and loss, what stage 2
    aligned on, and what each stage trained on (blank where the stage has not run)."""
    header = ["arm", "like", "stage 1", "stage-1 budget", "stage 2 on", "SFT budget", "DPO budget"]
    cells = []
    for a in results.get("arms", []):
        if a["like"] == "merge":
            what = f"no training: (1−λ)·{a['merge_of']} + λ·base, λ = {a['base_weight']:g}"
            cells.append([a["arm"], "merge", what, "none", "no stage 2", "", ""])
            continue
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
                _stage1_budget(a),
                stage2,
                _budget(a["sft_samples"], "samples", a["sft_steps"]),
                dpo,
            ]
        )
    return header, cells


def arm_summaries(cfg: Config, results: dict) -> list[dict]:
    """What results["arms"] holds, per arm of `cfg` in order: its name and the built-in it is or is
    like; stage 1's stream, loss weights and objective, teacher (None without one), the arm whose
    stage-1 model it uses when not its own, and that model's steps, tokens, passes over its stream
    and domain tokens trained; stage 2's selection ({k, strategy, score}, None on the whole pool)
    and whose it is when shared; SFT's samples and
    steps; whether it runs DPO, and DPO's pairs and steps. Counts are those results.json records
    (None for a stage not run yet). A merge arm's: its name, like "merge", merge_of (the arm it
    merges toward the base) and base_weight (λ)."""
    stages = results.get("stages", {})
    summaries = []
    for arm in arms(cfg):
        if arm.merge_of:
            summaries.append(
                {
                    "arm": arm.name,
                    "like": arm.like,
                    "merge_of": arm.merge_of,
                    "base_weight": arm.base_weight,
                }
            )
            continue
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
                "objective": cpt.objective,
                "teacher": cpt.teacher if cpt.lssd_weight > 0 else None,
                "stage1_shared_with": stage1 if stage1 != arm.name else None,
                "stage1_tokens": trained["cpt"].get("tokens"),
                "stage1_steps": trained["cpt"].get("steps"),
                "stage1_passes": trained["cpt"].get("passes"),
                "stage1_domain_tokens": trained["cpt"].get("domain_tokens"),
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


def with_ci(value: Any, ci: list[float] | None) -> str:
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
                line.append(with_ci(value, intervals.get(key, {}).get(name)))
            kl = row.get("retention", {}).get("kl_to_base")
            line.append(with_ci(kl, intervals.get("kl_to_base")))
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
                with_ci(r["retention"]["delta"].get(n), intervals.get("delta", {}).get(n))
                for n in general
            ]
            + [with_ci(r["retention"].get("kl_to_base"), intervals.get("kl_to_base"))]
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
                return f"{arm}: {with_ci(x['mean'], x['ci'])}" if x else arm

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
                    with_ci(diff["mean"], diff["ci"]) if diff else "",
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
