"""The eval stage: every model of the run (base, then each arm's cpt, sft, dpo, those of
eval.stages) on every configured benchmark and lm-eval task, plus retention against the base model.

Writes results["eval"]["rows"] (one row per arm and stage), results["eval"]["benchmarks"]
(kind, tag, main metric and prompt format of each column), results["eval"]["bootstrap"] (how the
intervals were made) and results["claims"] (mixcpt.evaluate.claims). A stage whose folder does not
exist, or that this config does not train, is a row with status "missing", so a partial run still
gets a table.

Formats: every model, base included, is scored in the plain rendering the base and stage 1 saw
("scores"); aligned models (sft, dpo) are also scored through the chat template ("chat_scores").
Retention deltas and KL use the plain scores, so a change of format is never read as forgetting.
An arm that shares another arm's stage-1 model gets that model's row as its cpt row, marked
`shared_with`, without evaluating it twice. A merge arm (mixcpt.merge) has a cpt row only, marked
`merge` ({of, base_weight}).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mixcpt.config import Config
from mixcpt.evaluate.benchmarks import (
    ALIGNED_STAGES,
    HIGHER_IS_BETTER,
    MAIN_METRIC,
    format_prompt,
    load_benchmark,
    prompt_formats,
)
from mixcpt.evaluate.intervals import summarise
from mixcpt.evaluate.lm_eval_bridge import lm_eval_scores, run_lm_eval
from mixcpt.evaluate.scoring import (
    generate_answers,
    generation_correct,
    kl_per_window,
    mean_kl,
    mean_scores,
    multiple_choice_correct,
    perplexity_per_text,
    perplexity_scores,
)
from mixcpt.fingerprints import begin, nodes
from mixcpt.models import load_tokenizer, model_from
from mixcpt.pipeline import arms, stage1_owner
from mixcpt.processes import gather_through_files, process_state
from mixcpt.rundir import TRAINED_STAGES, RunDir, base_model_path

# lm-eval tasks report many metrics; the first of these present is the one tables show
LM_EVAL_MAIN = ("acc_norm", "acc", "exact_match", "pass@1", "f1")


def _load(
    cfg: Config, model_path: str, tokenizer_path: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model on the GPU when there is one, in the configured dtype, with its tokenizer; a
    tokenizer without a chat template borrows `sft.chat_template` (what SFT trained with)."""
    m = cfg.model
    model = model_from(m, model_path)
    model.to(process_state().device).eval()
    tokenizer = load_tokenizer(tokenizer_path, m.trust_remote_code)
    if tokenizer.chat_template is None and cfg.sft.chat_template:
        tokenizer.chat_template = cfg.sft.chat_template
    return model, tokenizer


def _main_items(kind: str, per_item: dict[str, list]) -> list[int] | dict[str, list[float]]:
    """The per-item form of a benchmark's main metric, as results.json keeps it: the 0/1 list of
    acc_norm or exact_match (the score is its mean), or for bits per byte {"sum": bits of each
    text, "count": its bytes} (the score is sum / sum)."""
    if kind == "perplexity":
        bits = [round(nll / math.log(2), 6) for nll in per_item["nll"]]
        return {"sum": bits, "count": per_item["bytes"]}
    return per_item[MAIN_METRIC[kind]]


def evaluate_model(
    cfg: Config,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    stage: str,
    benchmarks: list,
) -> dict[str, dict]:
    """One model on every benchmark and lm-eval task. `benchmarks` holds (BenchmarkConfig, items)
    pairs; `stage` decides the prompt formats (`prompt_formats`).

    Returns {"scores": {benchmark or task: {metric: value}}, "chat_scores": {benchmark: {metric:
    value}} (aligned stages, through the chat template), "items": {"scores": {benchmark: per-item
    main metric (`_main_items`)}, "chat_scores": {...}}}. lm-eval tasks have no per-item form.
    """
    ev = cfg.eval
    out = {"scores": {}, "chat_scores": {}, "items": {"scores": {}, "chat_scores": {}}}
    for bench, items in benchmarks:
        if bench.kind == "perplexity":
            per_text = perplexity_per_text(
                model, tokenizer, [it["text"] for it in items], ev.batch_size, ev.max_length
            )
            out["scores"][bench.name] = perplexity_scores(per_text)
            out["items"]["scores"][bench.name] = _main_items(bench.kind, per_text)
            continue
        question = "question" if bench.kind == "multiple_choice" else "prompt"
        for key, fmt in prompt_formats(bench, stage).items():
            prompts = [
                format_prompt(it[question], fmt, tokenizer, cfg.data.template) for it in items
            ]
            if bench.kind == "multiple_choice":
                per_item = multiple_choice_correct(
                    model, tokenizer, prompts, items, ev.batch_size, ev.max_length
                )
            else:
                predictions = generate_answers(
                    model, tokenizer, prompts, bench.max_new_tokens, bench.stop, ev.batch_size
                )
                per_item = generation_correct(predictions, [it["answers"] for it in items])
            out[key][bench.name] = mean_scores(per_item)
            out["items"][key][bench.name] = _main_items(bench.kind, per_item)
    if ev.lm_eval_tasks:
        output = run_lm_eval(
            model,
            tokenizer,
            ev.lm_eval_tasks,
            ev.lm_eval_include_path,
            ev.batch_size,
            ev.max_length,
            ev.lm_eval_limit,
            ev.lm_eval_num_fewshot,
        )
        out["scores"].update(lm_eval_scores(output))
    return out


def _describe_benchmarks(cfg: Config, base_scores: dict) -> dict[str, dict[str, Any]]:
    """{name: {kind, tag, main_metric, higher_is_better}} for every column of the table."""
    info = {}
    for b in cfg.eval.benchmarks:
        main = MAIN_METRIC[b.kind]
        formats = prompt_formats(b, ALIGNED_STAGES[0])
        info[b.name] = {
            "kind": b.kind,
            "tag": b.tag,
            "main_metric": main,
            "higher_is_better": main in HIGHER_IS_BETTER,
            # the prompt format of "scores" (None: perplexity has no prompt); whether aligned
            # stages also have "chat_scores"
            "format": None if b.kind == "perplexity" else formats["scores"],
            "chat_when_aligned": "chat_scores" in formats,
        }
    for task in cfg.eval.lm_eval_tasks:
        metrics = base_scores.get(task, {})
        main = next((m for m in LM_EVAL_MAIN if m in metrics), next(iter(metrics), None))
        tag = "domain" if task in cfg.eval.lm_eval_domain_tasks else "general"
        info[task] = {
            "kind": "lm_eval",
            "tag": tag,
            "main_metric": main,
            "higher_is_better": main != "perplexity",
            "format": "lm_eval",  # the task's own prompts
            "chat_when_aligned": False,
        }
    return info


def run_eval(cfg: Config, run: RunDir, force: bool = False) -> dict[str, Any]:
    """Evaluate the base model and every stage folder (of the stages in eval.stages) of every
    arm; write and return
    {"rows": [...], "benchmarks": {...}, "bootstrap": {...}} (also stored as results["eval"]) and
    the claims (results["claims"], mixcpt.evaluate.claims). The table recorded is returned as it
    is when it was computed from the same inputs (models, benchmarks, settings;
    mixcpt.fingerprints), unless `force`.

    Each row: {arm, stage, status ("ok" | "missing"), model (folder), scores {bench: {metric: v}}
    (plain format unless the benchmark forces chat), chat_scores {bench: {metric: v}} (aligned
    stages through the chat template), retention {kl_to_base, delta {general bench: main score -
    base's, from "scores"}}, items {"scores"|"chat_scores": {bench: per-item main metric},
    "kl_to_base": {"sum", "count"} per probe window or None}, intervals (the 95% bootstrap
    interval of each main score, delta and KL; mixcpt.evaluate.intervals)}. The cpt row of an arm
    that shares another's stage-1 model also has shared_with (that arm); a merge arm's, merge
    ({of: the merged arm, base_weight: λ}).

    Raises `InputError` for a malformed benchmark file before any model is loaded.
    """
    benchmarks = [(b, load_benchmark(b)) for b in cfg.eval.benchmarks]
    record = begin(cfg, run, "eval", force)
    if record is None:
        done = run.read_results()["eval"]
        return {k: done.get(k) for k in ("rows", "benchmarks", "bootstrap")}
    trained = set(nodes(cfg))  # a folder left by another config is not this run's
    probe = [Path(cfg.eval.probe).read_text(encoding="utf-8")] if cfg.eval.probe else None

    base_path = base_model_path(cfg.model, run.base)
    tokenizer_path = base_path if run.base.exists() else (cfg.model.tokenizer or cfg.model.path)
    # every process holds the base: each model's KL is measured against it
    base, base_tokenizer = _load(cfg, base_path, tokenizer_path)

    def probe_kl(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict | None:
        if not probe:
            return None
        kl = kl_per_window(base, model, tokenizer, probe, cfg.eval.batch_size, cfg.eval.max_length)
        return {"sum": [round(v, 8) for v in kl["sum"]], "count": kl["count"]}

    # Each model once (an arm sharing another's stage 1 reuses its row), the base first. Under a
    # launch the models are dealt out to the processes in turn and the results gathered, so N
    # GPUs evaluate N models at a time and none waits for the whole table.
    # (arm, stage, the arm whose model it is, its folder, its node): one per row of the table
    # (a merge arm has stage 1 only; stages left out of eval.stages have no row)
    slots = [
        (arm.name, stage, owner, run.stage(owner, stage), f"{stage}/{owner}")
        for arm in arms(cfg)
        for stage in (("cpt",) if arm.merge_of else TRAINED_STAGES)
        if stage in cfg.eval.stages
        for owner in [stage1_owner(cfg, arm.name) if stage == "cpt" else arm.name]
    ]
    merges = {arm.name: arm for arm in arms(cfg) if arm.merge_of}
    models = {}  # node -> (stage, folder) of every model of the run that exists
    for _, stage, _, folder, node in slots:
        if folder.is_dir() and node in trained:
            models.setdefault(node, (stage, str(folder)))
    jobs = [("base", ("base", base_path)), *models.items()]
    state = process_state()
    mine = jobs[state.process_index :: state.num_processes]
    if state.num_processes > 1:
        where = f"process {state.process_index} of {state.num_processes}"
        print(f"mixcpt: eval: {where} scores {len(mine)} of the {len(jobs)} models", flush=True)

    def score_mine() -> dict:
        """node -> (the evaluate_model result, its KL items) of this process's models."""
        scored = {}
        for node, (stage, folder) in mine:
            if node == "base":  # the base against itself: zero in every window, kept for its shape
                model, tokenizer = base, base_tokenizer
            else:
                model, tokenizer = _load(cfg, folder, folder)
            result = evaluate_model(cfg, model, tokenizer, stage, benchmarks)
            scored[node] = result, probe_kl(model, tokenizer)
            del model  # one stage model in memory at a time, beside the base
        return scored

    # through files, not a collective: one process's share can take much longer than another's
    parts = gather_through_files(state, run.root / ".work", "eval", score_mine)
    if not state.is_main_process:
        return {}  # the main process writes the table
    evaluated = {node: scored for part in parts for node, scored in part.items()}

    base_eval = evaluated["base"][0]
    base_scores = base_eval["scores"]
    info = _describe_benchmarks(cfg, base_scores)
    general = [name for name, b in info.items() if b["tag"] == "general" and b["main_metric"]]

    def retention(scores: dict, kl: dict | None) -> dict[str, Any]:
        delta = {
            n: scores[n][info[n]["main_metric"]] - base_scores[n][info[n]["main_metric"]]
            for n in general
        }
        return {"kl_to_base": mean_kl(kl) if kl else None, "delta": delta}

    def ok_row(arm: str, stage: str, model: str, node: str) -> dict:
        result, kl = evaluated[node]
        return {
            "arm": arm,
            "stage": stage,
            "status": "ok",
            "model": model,
            "scores": result["scores"],
            "chat_scores": result["chat_scores"],
            "retention": retention(result["scores"], kl),
            "items": {**result["items"], "kl_to_base": kl},
        }

    rows = [ok_row("base", "base", base_path, "base")]
    for arm, stage, owner, folder, node in slots:
        row = {
            "arm": arm,
            "stage": stage,
            "status": "missing",
            "model": str(folder),
            "scores": {},
            "chat_scores": {},
            "retention": {},
            "items": {},
        }
        if node in evaluated:
            row = ok_row(arm, stage, str(folder), node)
        if owner != arm:
            row["shared_with"] = owner
        if arm in merges:
            row["merge"] = {"of": merges[arm].merge_of, "base_weight": merges[arm].base_weight}
        rows.append(row)
    table = summarise([{"rows": rows, "benchmarks": info}], [cfg.seed])
    run.update_results("eval", "rows", table["rows"])
    run.update_results("eval", "benchmarks", info)
    run.update_results("eval", "bootstrap", table["bootstrap"])
    run.set_results("claims", table["claims"])
    run.update_results("eval", "fingerprint", record)  # last: the table is complete
    return {k: table[k] for k in ("rows", "benchmarks", "bootstrap")}
