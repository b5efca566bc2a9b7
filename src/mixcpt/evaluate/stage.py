"""The eval stage: every model of the run (base, then each arm's cpt, sft, dpo) on every
configured benchmark and lm-eval task, plus retention against the base model.

Writes results["eval"]["rows"] (one row per arm and stage) and results["eval"]["benchmarks"]
(kind, tag and main metric of each column). A stage whose folder does not exist, or that this
config does not train, is a row with status "missing", so a partial run still gets a table. An
arm that shares another arm's stage-1 model gets that model's scores in its cpt row, marked
`shared_with`, without evaluating it twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mixcpt.config import Config
from mixcpt.evaluate.benchmarks import HIGHER_IS_BETTER, MAIN_METRIC, format_prompt, load_benchmark
from mixcpt.evaluate.lm_eval_bridge import lm_eval_scores, run_lm_eval
from mixcpt.evaluate.scoring import (
    generate_answers,
    kl_to_base,
    score_generation,
    score_multiple_choice,
    score_perplexity,
)
from mixcpt.fingerprints import begin, nodes
from mixcpt.models import load_tokenizer, model_from
from mixcpt.pipeline import arms, stage1_owner
from mixcpt.processes import process_state
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


def evaluate_model(
    cfg: Config,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    stage: str,
    benchmarks: list,
) -> dict[str, dict[str, float]]:
    """{benchmark or lm-eval task: {metric: value}} for one model; `benchmarks` holds
    (BenchmarkConfig, items) pairs, `stage` picks the prompt format of "auto" benchmarks."""
    ev, scores = cfg.eval, {}
    for bench, items in benchmarks:
        if bench.kind == "perplexity":
            scores[bench.name] = score_perplexity(
                model, tokenizer, [it["text"] for it in items], ev.batch_size, ev.max_length
            )
            continue
        question = "question" if bench.kind == "multiple_choice" else "prompt"
        prompts = [
            format_prompt(it[question], bench, stage, tokenizer, cfg.data.template) for it in items
        ]
        if bench.kind == "multiple_choice":
            scores[bench.name] = score_multiple_choice(
                model, tokenizer, prompts, items, ev.batch_size, ev.max_length
            )
        else:
            predictions = generate_answers(
                model, tokenizer, prompts, bench.max_new_tokens, bench.stop, ev.batch_size
            )
            scores[bench.name] = score_generation(predictions, [it["answers"] for it in items])
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
        scores.update(lm_eval_scores(output))
    return scores


def _describe_benchmarks(cfg: Config, base_scores: dict) -> dict[str, dict[str, Any]]:
    """{name: {kind, tag, main_metric, higher_is_better}} for every column of the table."""
    info = {}
    for b in cfg.eval.benchmarks:
        main = MAIN_METRIC[b.kind]
        info[b.name] = {
            "kind": b.kind,
            "tag": b.tag,
            "main_metric": main,
            "higher_is_better": main in HIGHER_IS_BETTER,
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
        }
    return info


def run_eval(cfg: Config, run: RunDir, force: bool = False) -> dict[str, Any]:
    """Evaluate the base model and every stage folder of every arm; write and return
    {"rows": [...], "benchmarks": {...}} (also stored as results["eval"]). The table recorded
    is returned as it is when it was computed from the same inputs (models, benchmarks, settings;
    mixcpt.fingerprints), unless `force`.

    Each row: {arm, stage, status ("ok" | "missing"), model (folder), scores {bench: {metric: v}},
    retention {kl_to_base, delta {general bench: main score - base's}}}, plus shared_with (the
    arm whose stage-1 model it is) in the cpt row of an arm that shares one.
    Raises `InputError` for a malformed benchmark file before any model is loaded.
    """
    benchmarks = [(b, load_benchmark(b)) for b in cfg.eval.benchmarks]
    record = begin(cfg, run, "eval", force)
    if record is None:
        done = run.read_results()["eval"]
        return {"rows": done["rows"], "benchmarks": done["benchmarks"]}
    trained = set(nodes(cfg))  # a folder left by another config is not this run's
    probe = [Path(cfg.eval.probe).read_text(encoding="utf-8")] if cfg.eval.probe else None

    base_path = base_model_path(cfg.model, run.base)
    tokenizer_path = base_path if run.base.exists() else (cfg.model.tokenizer or cfg.model.path)
    base, base_tokenizer = _load(cfg, base_path, tokenizer_path)
    base_scores = evaluate_model(cfg, base, base_tokenizer, "base", benchmarks)
    info = _describe_benchmarks(cfg, base_scores)
    general = [name for name, b in info.items() if b["tag"] == "general" and b["main_metric"]]

    def retention(scores: dict, kl: float | None) -> dict[str, Any]:
        delta = {
            n: scores[n][info[n]["main_metric"]] - base_scores[n][info[n]["main_metric"]]
            for n in general
        }
        return {"kl_to_base": kl, "delta": delta}

    rows = [
        {
            "arm": "base",
            "stage": "base",
            "status": "ok",
            "model": base_path,
            "scores": base_scores,
            "retention": retention(base_scores, 0.0 if probe else None),
        }
    ]
    evaluated: dict[str, tuple[dict, dict]] = {}  # node -> (scores, retention): once per model
    for arm in [a.name for a in arms(cfg)]:
        for stage in TRAINED_STAGES:
            owner = stage1_owner(cfg, arm) if stage == "cpt" else arm
            folder, node = run.stage(owner, stage), f"{stage}/{owner}"
            row = {
                "arm": arm,
                "stage": stage,
                "status": "missing",
                "model": str(folder),
                "scores": {},
                "retention": {},
            }
            if owner != arm:
                row["shared_with"] = owner
            if node not in evaluated and folder.is_dir() and node in trained:
                model, tokenizer = _load(cfg, str(folder), str(folder))
                scores = evaluate_model(cfg, model, tokenizer, stage, benchmarks)
                kl = (
                    kl_to_base(
                        base, model, tokenizer, probe, cfg.eval.batch_size, cfg.eval.max_length
                    )
                    if probe
                    else None
                )
                evaluated[node] = scores, retention(scores, kl)
                del model  # one stage model in memory at a time, beside the base
            if node in evaluated:
                row.update(status="ok", scores=evaluated[node][0], retention=evaluated[node][1])
            rows.append(row)
    run.update_results("eval", "rows", rows)
    run.update_results("eval", "benchmarks", info)
    run.update_results("eval", "fingerprint", record)  # last: the table is complete
    return {"rows": rows, "benchmarks": info}
