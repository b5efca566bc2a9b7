"""What can be known about a run before it trains (design.md §3). `mixcpt check CONFIG` prints one
line per check; every stage, `run` and `demo` run them all first (mixcpt.pipeline, and the CLI
before it makes or locks the run folder), so that a run never fails hours in on something
knowable: a base model without a chat template found at SFT, a sequence longer than the model's
context, a tokenizer larger than the embedding table, a LoRA teacher under sharded weights, a
malformed data file.

A check is a function of the `RunInputs` that returns one line saying what it found right and
raises `UserError` (one line naming the key, and the file or value) when something is wrong.
`CHECKS` lists them in order: adding a check is writing one such function and naming it there.
Nothing here loads weights or reads a whole corpus.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

from mixcpt.config import Config, SourceConfig, TrainingConfig
from mixcpt.config.data import SOURCE_GROUPS
from mixcpt.errors import ConfigError, InputError, UserError
from mixcpt.pipeline import arms, stage_arms
from mixcpt.rundir import base_model_path
from mixcpt.runlock import is_rank_zero


class RunInputs:
    """A run's config and what it names, each read once, when a check first needs it: the base
    model's configuration (config.json, or a GGUF file's header; never the weights) and the
    tokenizer the stages will use."""

    def __init__(self, cfg: Config, run_base: Path | None = None):
        """`run_base`: the run folder's base/ (where the demo and GGUF conversion put the base
        model), or None when checking a config alone."""
        self.cfg = cfg
        self.run_base = run_base

    @cached_property
    def base_source(self) -> dict[str, str]:
        """from_pretrained arguments of the base model: the run's base/ when it has one, a GGUF
        file where it lies (its header holds the configuration and tokenizer), else model.path."""
        model = self.cfg.model
        path = base_model_path(model, self.run_base) if self.run_base else model.path
        if not model.gguf_file or path != model.path:
            return {"pretrained_model_name_or_path": path}
        from mixcpt.gguf_model import require_gguf_package, resolve_gguf_path

        require_gguf_package()
        gguf = resolve_gguf_path(model.path, model.gguf_file)
        return {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}

    @property
    def base_name(self) -> str:
        """The base model as messages name it: its folder, hub id or GGUF file."""
        source = self.base_source
        return str(Path(source["pretrained_model_name_or_path"]) / source.get("gguf_file", ""))

    @cached_property
    def model_config(self):
        """The base model's transformers configuration (its language model's, for a multimodal
        one). Raises ConfigError when there is none to read."""
        from transformers import AutoConfig

        trust = self.cfg.model.trust_remote_code
        try:
            config = AutoConfig.from_pretrained(**self.base_source, trust_remote_code=trust)
        except (OSError, ValueError) as err:
            from mixcpt.models import refuse_remote_code  # loads torch: only on this error

            refuse_remote_code(err, f"model.path: {self.base_name}")
            raise ConfigError(
                f"model.path: {self.base_name}: no model configuration to read ({_first_line(err)})"
            ) from None
        return config.get_text_config()

    @property
    def tokenizer_name(self) -> str:
        """Where the tokenizer comes from: model.tokenizer, else the base model."""
        return self.cfg.model.tokenizer or self.base_name

    @cached_property
    def tokenizer(self):
        """The tokenizer of the data stage and stage 1, saved with every later stage's model."""
        from transformers import AutoTokenizer

        configured = self.cfg.model.tokenizer
        source = {"pretrained_model_name_or_path": configured} if configured else self.base_source
        try:
            return AutoTokenizer.from_pretrained(
                **source, trust_remote_code=self.cfg.model.trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"{'model.tokenizer' if configured else 'model.path'}: {self.tokenizer_name}: "
                f"cannot load a tokenizer ({_first_line(err)})"
            ) from None


def _first_line(err: Exception) -> str:
    """The first line of an exception's message (transformers' run to several)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# ---- the checks --------------------------------------------------------------------------------


def check_model(inputs: RunInputs) -> str:
    """The base model's configuration can be read."""
    config = inputs.model_config
    context = getattr(config, "max_position_embeddings", None) or "unknown"
    where = inputs.base_name
    return f"{config.model_type}, vocabulary {config.vocab_size}, context {context} ({where})"


def check_tokenizer(inputs: RunInputs) -> str:
    """The tokenizer loads and has no id past the model's embedding table (such ids crash
    mid-training)."""
    tokens, embeddings = len(inputs.tokenizer), inputs.model_config.vocab_size
    if embeddings is not None and tokens > embeddings:
        raise ConfigError(
            f"model.tokenizer: the tokenizer has {tokens} tokens but the model "
            f"{inputs.base_name} only {embeddings} embeddings; use the model's own tokenizer"
        )
    return f"{tokens} tokens, within the model's {embeddings} embeddings"


def sequence_lengths(cfg: Config) -> dict[str, int]:
    """The sequence length of each stage this config runs, by config key (arms.NAME.SECTION.
    max_length where an arm overrides its section's)."""
    lengths = {"data.block_size": cfg.data.block_size}
    dpo = stage_arms(cfg, "dpo")
    for arm in arms(cfg):
        if arm.merge_of:  # trains and scores nothing
            continue
        for section in ("select", "sft", "dpo"):
            if section == "dpo" and arm.name not in dpo:
                continue
            length = getattr(arm.config, section).max_length
            key = f"{section}.max_length"
            if length != getattr(cfg, section).max_length:
                key = f"arms.{arm.name}.{key}"
            lengths[key] = length
    ev = cfg.eval
    if ev.benchmarks or ev.lm_eval_tasks or ev.probe:
        lengths["eval.max_length"] = ev.max_length
    return lengths


def _if_default(cfg: Config, key: str) -> str:
    """The suffix " (default)" when the config leaves `key` ("section.field") unset: the user
    may not know the key is there to set. An arm's override (arms.NAME.section.field) is set."""
    if key.startswith("arms."):
        return ""
    section, field = key.split(".")
    return "" if field in getattr(cfg, section).model_fields_set else " (default)"


def check_context_length(inputs: RunInputs) -> str:
    """No stage feeds the model more positions than it was trained on (max_position_embeddings;
    not checked when the configuration does not say)."""
    context = getattr(inputs.model_config, "max_position_embeddings", None)
    lengths = sequence_lengths(inputs.cfg)
    if context is None:
        return "the model states no max_position_embeddings: not checked"
    over = [
        f"{key} {value}{_if_default(inputs.cfg, key)}"
        for key, value in lengths.items()
        if value > context
    ]
    if over:
        raise ConfigError(
            f"{', '.join(over)}: longer than the model's context of {context} tokens "
            f"(max_position_embeddings of {inputs.base_name}); set at most {context}"
        )
    return f"{', '.join(lengths)} within the model's {context} positions"


# A user turn and its answer: what every chat-format stage renders, in the smallest form.
PROBE_QUESTION, PROBE_ANSWER = "What is the capital of France?", "Paris is the capital."


def check_chat_template(inputs: RunInputs) -> str:
    """SFT (and DPO, fas selection, chat-format evaluation) has a chat template, whose generation
    prompt is a prefix of the rendered chat and which renders the assistant's answer."""
    from mixcpt.responses import ensure_chat_template, render_chat

    tokenizer = inputs.tokenizer
    whose = "the tokenizer's own" if tokenizer.chat_template else "sft.chat_template"
    ensure_chat_template(tokenizer, inputs.cfg.sft.chat_template, inputs.tokenizer_name)
    try:
        _, answer = render_chat(
            tokenizer, [{"role": "user", "content": PROBE_QUESTION}], PROBE_ANSWER
        )
    except UserError:
        raise
    except Exception as err:  # a template is code: whatever it raises is the template's fault
        raise ConfigError(
            f"sft.chat_template: {whose} chat template fails on a user turn and its answer: "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from None
    if PROBE_ANSWER not in answer:
        raise ConfigError(
            f"sft.chat_template: {whose} chat template leaves out the assistant's answer"
        )
    return f"{whose}; its generation prompt is a prefix of the chat"


def weight_sharding(training: TrainingConfig) -> str | None:
    """What shards the model's weights across the processes of this launch (FSDP or DeepSpeed
    ZeRO-3), or None: as `accelerate launch` announces it in each process's environment
    (`processes.launched_mode`), or as the stage's own TrainingArguments keys `fsdp` / `deepspeed`
    set it where the config has them."""
    from mixcpt.processes import launched_mode, zero_stage

    launched = launched_mode()
    if launched is not None:
        return {
            "fsdp": "FSDP (accelerate launch)",
            "zero3": "DeepSpeed ZeRO-3 (accelerate launch)",
        }.get(launched[0])
    if getattr(training, "fsdp", None):
        return "FSDP (training.fsdp)"
    deepspeed = getattr(training, "deepspeed", None)
    if deepspeed and zero_stage(deepspeed, "training.deepspeed") == 3:
        return "DeepSpeed ZeRO-3 (training.deepspeed)"
    return None


def check_teacher(inputs: RunInputs) -> str:
    """The stage-1 teacher of every arm that trains stage 1 works under this launch: `lora`
    merges its adapters into whole weights, which no process holds under FSDP or ZeRO-3."""
    cfg = inputs.cfg
    for arm in arms(cfg):
        cpt = arm.config.cpt
        sharding = weight_sharding(cpt.training)
        trains = arm.name in stage_arms(cfg, "cpt") and not arm.merge_of
        if cpt.teacher == "lora" and sharding and trains:
            key = "cpt.teacher" if cfg.cpt.teacher == "lora" else f"arms.{arm.name}.cpt.teacher"
            raise ConfigError(
                f"{key}: lora is not supported under {sharding} (the adapters cannot be merged "
                "into sharded weights); use DDP or ZeRO-2, or teacher: cache"
            )
    cpt = cfg.cpt
    return f"{cpt.teacher}, {weight_sharding(cpt.training) or 'weights not sharded'}"


def _check_first_record(group: str, src: SourceConfig) -> None:
    """Read the first record of a data source (its first file only) as the data stage will."""
    from mixcpt.data.readers import (
        domain_text,
        instruction_messages,
        preference_fields,
        read_records,
    )

    record = next(read_records(src), None)
    if record is None:
        raise InputError(src.path, None, "holds no records")
    if group in ("domain", "replay"):
        domain_text(record, src.text_field)
    elif group == "instructions":
        instruction_messages(record)
    else:
        preference_fields(record)


def check_input_files(inputs: RunInputs) -> str:
    """Every local data source is readable and its first record well-formed (the data stage
    validates the rest as it streams); the benchmarks (small, read whole by the eval stage
    anyway) and the retention probe are valid throughout. Hub datasets are left to the data
    stage, which streams them."""
    from mixcpt.evaluate.benchmarks import load_benchmark

    cfg, read, hub = inputs.cfg, 0, 0
    for group in SOURCE_GROUPS:
        for src in getattr(cfg.data, group):
            if src.format == "hf" and not Path(src.path).exists():
                hub += 1
                continue
            _check_first_record(group, src)
            read += 1
    for bench in cfg.eval.benchmarks:
        load_benchmark(bench)
    if cfg.eval.probe:
        _check_first_record("domain", SourceConfig(path=cfg.eval.probe, format="txt"))
    found = [f"{read} data sources (first record)", f"{len(cfg.eval.benchmarks)} benchmarks"]
    found += ["the probe"] if cfg.eval.probe else []
    found += [f"{hub} from the hub, left to the data stage"] if hub else []
    return ", ".join(found)


def check_disk(inputs: RunInputs) -> str:
    """The disk the run will hold at its fullest (`mixcpt.plan.disk_bytes`: teacher cache,
    checkpoints, model folders), less what the run folder already holds, against the free space
    where it goes. Too little is a warning, not a failure: the estimate is approximate (the packed
    data streams are not in it), and space may be freed meanwhile."""
    from mixcpt.plan import disk_bytes
    from mixcpt.rundir import RunDir

    _ = inputs.model_config  # a model without a readable configuration failed above: skipped
    root = inputs.run_base.parent if inputs.run_base else None
    try:
        needed = disk_bytes(inputs.cfg, RunDir(root) if root else None)
    except (AttributeError, KeyError, RuntimeError, StopIteration, TypeError, UserError) as err:
        # the plan counts Llama-style decoders under the launch modes it knows
        return f"not estimated (mixcpt plan cannot count this run: {_first_line(err)})"
    if root is None:
        return f"the run holds up to {needed / 1e9:.3g} GB on disk at once (mixcpt plan)"
    held = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0
    more = max(0, needed - held)  # a rerun's outputs are on disk already
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if more > free:
        return (
            f"warning: the run may need {more / 1e9:.3g} GB more on disk (mixcpt plan) but "
            f"{existing} has {free / 1e9:.3g} GB free; free space, move the run folder, or "
            "lower cpt.cache_top_k / training.save_total_limit"
        )
    return f"{more / 1e9:.3g} GB more at most; {free / 1e9:.3g} GB free in {existing}"


CHECKS: list[tuple[str, Callable[[RunInputs], str]]] = [
    ("model", check_model),
    ("tokenizer", check_tokenizer),
    ("context length", check_context_length),
    ("chat template", check_chat_template),
    ("teacher", check_teacher),
    ("input files", check_input_files),
    ("disk", check_disk),
]


def run_checks(cfg: Config, run_base: Path | None = None) -> Iterator[tuple[str, bool, str]]:
    """Every check in order, as (name, passed, what it found or what is wrong), each yielded as
    soon as it is done. A check that needs what an earlier one could not read fails with the same
    message; it is then said to be skipped instead of repeating it."""
    inputs, failures = RunInputs(cfg, run_base), set()
    for name, check in CHECKS:
        try:
            found = check(inputs)
        except UserError as err:
            repeated = str(err) in failures
            failures.add(str(err))
            yield name, False, "skipped (see above)" if repeated else str(err)
            continue
        yield name, True, found


def check_config(cfg: Config, run_base: Path | None = None) -> None:
    """Run every check; raise the first failure's UserError (one line naming the key). A check's
    warning goes to stderr and the run goes on."""
    inputs = RunInputs(cfg, run_base)
    for _, check in CHECKS:
        found = check(inputs)
        if found.startswith("warning:") and is_rank_zero():  # once per launch, not per process
            print(f"mixcpt: {found}", file=sys.stderr, flush=True)
