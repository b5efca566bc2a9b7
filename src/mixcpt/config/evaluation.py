"""The eval stage (`eval:`): benchmarks as files, lm-eval tasks, the retention probe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mixcpt.config.base import Strict
from mixcpt.rundir import TRAINED_STAGES


class BenchmarkConfig(Strict):
    name: str = Field(
        description="Column name in the results table; unique among benchmarks and "
        "eval.lm_eval_tasks."
    )
    path: str = Field(
        description="JSONL file of the benchmark, one item per line shaped by `kind`; relative "
        "to the YAML's folder."
    )
    kind: Literal["multiple_choice", "generation", "perplexity"] = Field(
        description="multiple_choice {question, choices, answer}: acc, acc_norm; generation "
        "{prompt, answers}: exact_match, contains; perplexity {text}: perplexity, bits_per_byte."
    )
    tag: Literal["domain", "general"] = Field(
        description="Report axis (domain or general) the benchmark counts on; general "
        "benchmarks also get retention deltas against the base model."
    )
    prompt_format: Literal["auto", "plain", "chat"] = Field(
        "auto",
        description="auto: every stage in the plain rendering (data.template), and the aligned "
        "stages (sft, dpo) also through the chat template, in separate columns; plain or chat: "
        "that format alone at every stage. Perplexity ignores it.",
    )
    max_new_tokens: int = Field(
        32, ge=1, description="Most tokens generated per prompt (greedy; generation only)."
    )
    stop: list[str] = Field(
        default_factory=lambda: ["\n"],
        description="Strings that end a generated answer, which is cut before the first; []: only "
        "EOS or max_new_tokens end it. Generation only.",
    )
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N items.")


class EvalConfig(Strict):
    benchmarks: list[BenchmarkConfig] = Field(
        default_factory=list,
        description="JSONL benchmarks scored on the base model and every stage of every arm.",
    )
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness task names, run on the same models as the benchmarks; "
        "each is a column of the results table.",
    )
    lm_eval_include_path: str | None = Field(
        None,
        description="Folder of local lm-eval task YAMLs (lm-eval's include_path), relative to "
        "the YAML's folder.",
    )
    lm_eval_domain_tasks: list[str] = Field(
        default_factory=list,
        description="Names in lm_eval_tasks that measure the domain; the others are general.",
    )
    lm_eval_limit: int | None = Field(
        None, ge=1, description="Evaluate only the first N items of each lm-eval task."
    )
    lm_eval_num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples; None: each task's default."
    )
    probe: str | None = Field(
        None,
        description="Text file of general text; each stage's retention then includes the mean "
        "per-token KL(base || stage) over it.",
    )
    stages: list[Literal["cpt", "sft", "dpo"]] = Field(
        default_factory=lambda: list(TRAINED_STAGES),
        min_length=1,
        description="Which trained stages of each arm are evaluated (the base always is). "
        "Leaving out sft saves one model's evaluation per arm when DPO follows it: the claims "
        "and the plots after alignment read an arm's last aligned stage evaluated. Without cpt "
        "the stage-1 claims, the stage-1 Pareto plot and merge arms have no rows.",
    )
    batch_size: int = Field(
        8,
        ge=1,
        description="Sequences per forward pass in evaluation (a multiple-choice option, a "
        "generation prompt, a perplexity or probe window, an lm-eval request).",
    )
    max_length: int = Field(
        1024,
        ge=8,
        description="Most tokens per scored sequence: multiple-choice contexts are left-truncated, "
        "texts scored in windows of it; lm-eval's max_length. Generation prompts are not cut.",
    )

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, stages: list[str]) -> list[str]:
        # one spelling per set of stages: the list is part of the eval's fingerprint
        if len(set(stages)) < len(stages):
            raise ValueError(f"{stages} names a stage twice")
        return sorted(stages, key=TRAINED_STAGES.index)

    @model_validator(mode="after")
    def _names_unique(self) -> EvalConfig:
        # benchmark names and lm-eval task names are the columns of one results table
        names = [b.name for b in self.benchmarks] + self.lm_eval_tasks
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"benchmark/task names must be unique; repeated: {duplicates}")
        stray = [t for t in self.lm_eval_domain_tasks if t not in self.lm_eval_tasks]
        if stray:
            raise ValueError(f"lm_eval_domain_tasks: {stray} not in lm_eval_tasks")
        return self
