"""The run configuration: one YAML file validated into typed, frozen-by-convention objects.

Configs are data. Every key has a type, a default where one is sensible, and a description;
an unknown key, a wrong type or a value out of range is a `ConfigError` that names the key.
Relative paths are resolved against the folder of the YAML file.

One module per part of the run: `data` (model, sources, rendering), `training` (Trainer settings,
stage 1), `alignment` (selection, SFT, DPO, the older `baseline:` switch), `arms` (the recipes
trained side by side), `evaluation`; this module holds the whole `Config` and reads it from YAML.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from mixcpt.config.alignment import BaselineConfig, DPOConfig, SelectConfig, SFTConfig
from mixcpt.config.arms import BUILTIN_ARMS, ArmConfig, builtin_of, check_entries, resolve_arms
from mixcpt.config.base import Strict
from mixcpt.config.data import SOURCE_GROUPS, DataConfig, ModelConfig, SourceConfig, TemplateConfig
from mixcpt.config.evaluation import BenchmarkConfig, EvalConfig
from mixcpt.config.training import CPTConfig, LoraSettings, TrainingConfig
from mixcpt.errors import ConfigError

__all__ = [
    "ArmConfig",
    "BaselineConfig",
    "BenchmarkConfig",
    "CPTConfig",
    "Config",
    "DPOConfig",
    "DataConfig",
    "EvalConfig",
    "LoraSettings",
    "ModelConfig",
    "SFTConfig",
    "SelectConfig",
    "SourceConfig",
    "TemplateConfig",
    "TrainingConfig",
    "config_from_dict",
    "hub_references",
    "load_config",
]


class Config(Strict):
    seed: int = Field(
        0,
        description="Seed of the mixture's draw and order, D_K's order, random selection and "
        "TrainingArguments seed/data_seed. Changing it rebuilds the data.",
    )
    model: ModelConfig = Field(description="The base model every arm starts from.")
    data: DataConfig = Field(description="Sources, mixture and packing of the data stage.")
    cpt: CPTConfig = Field(
        default_factory=CPTConfig, description="Stage 1: continual pre-training."
    )
    select: SelectConfig = Field(
        default_factory=SelectConfig,
        description="Stage 2a: choosing the samples an arm aligns on from the general pool.",
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
        description="The older switch of the traditional arm (when `arms` is not given): whether "
        "it is trained, and whether it runs DPO.",
    )
    arms: list[ArmConfig] | None = Field(
        None,
        description="The recipes trained side by side, each a name (built in: "
        f"{', '.join(BUILTIN_ARMS)}; baseline is the older name of traditional) or a mapping "
        "{name, like, stream, align_on, run_dpo, cpt, select, sft, dpo}, or a merge arm {name, "
        "like: merge, of: ARM, base_weight: λ}: ARM's stage-1 model interpolated toward the "
        "base, no training (mixcpt.config.arms). Default: [mixcpt, baseline], or [mixcpt] with "
        "baseline.enabled: false.",
    )
    eval: EvalConfig = Field(
        default_factory=EvalConfig,
        description="Benchmarks, lm-eval tasks and retention probe of the eval stage.",
    )

    @field_validator("arms", mode="before")
    @classmethod
    def _bare_names(cls, value):
        """`- random-k` is short for `- {name: random-k}`."""
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _arms_resolve(self) -> Config:
        """Every arm's overrides are valid over the top-level sections (errors name the arm)."""
        if self.arms is not None:
            listed = any(builtin_of(entry.name) == "traditional" for entry in self.arms)
            if "enabled" in self.baseline.model_fields_set and listed != self.baseline.enabled:
                message = (
                    f"{str(self.baseline.enabled).lower()}, but `arms` "
                    f"{'lists' if listed else 'does not list'} the traditional arm (baseline); "
                    "`arms` alone decides the arms trained (leave baseline.enabled out)"
                )
                error = InitErrorDetails(
                    type=PydanticCustomError("arms", message), loc=("baseline", "enabled")
                )
                raise ValidationError.from_exception_data("Config", [error])
            check_entries(self.arms)
        replaying = [arm.name for arm in resolve_arms(self) if arm.stream == "replay"]
        if replaying and not self.data.replay:
            message = (
                f"arm {replaying[0]!r} trains on the replay stream, which needs general "
                "pre-training text: set data.replay to one or more plain-text sources"
            )
            error = InitErrorDetails(
                type=PydanticCustomError("arms", message), loc=("data", "replay")
            )
            raise ValidationError.from_exception_data("Config", [error])
        return self


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
    for group in SOURCE_GROUPS:
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
    """Every Hugging Face hub resource the config needs: model or tokenizer ids, `format: hf`
    datasets and lm-eval tasks that are not local paths or local task files after `load_config`
    resolved them. Empty when the whole run can work offline."""
    names = [cfg.model.path, *([cfg.model.tokenizer] if cfg.model.tokenizer else [])]
    for group in SOURCE_GROUPS:
        names += [s.path for s in getattr(cfg.data, group) if s.format == "hf"]
    local = lambda name: name.startswith("pkg://") or Path(name).exists()  # noqa: E731
    needed = [name for name in names if not local(name)]
    offline_tasks = _local_lm_eval_tasks(cfg.eval.lm_eval_include_path)
    needed += [f"lm-eval task {t}" for t in cfg.eval.lm_eval_tasks if t not in offline_tasks]
    return needed


# lm-eval task YAMLs whose `dataset_path` is one of these read local files (`data_files`).
LOCAL_DATASET_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def _local_lm_eval_tasks(include_path: str | None) -> set[str]:
    """Names of the tasks defined in `include_path` whose data is on disk: a local builder
    (`dataset_path: json` with `data_files`, ...) or an existing folder."""
    tasks = set()
    for file in sorted(Path(include_path).rglob("*.yaml")) if include_path else []:
        try:
            spec = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            continue  # lm-eval reports its own task files' errors
        if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
            continue
        source = str(spec.get("dataset_path", ""))
        if source in LOCAL_DATASET_BUILDERS or (file.parent / source).exists():
            tasks.add(spec["task"])
    return tasks
