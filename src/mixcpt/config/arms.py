"""The arms of a run (`arms:`): the recipes trained side by side from the same base and data and
evaluated in one table.

An arm is a name plus what makes it differ from the run's top-level sections: the stream stage 1
trains on (`stream`), what stage 2 aligns on (`align_on`), whether DPO follows SFT (`run_dpo`),
and partial `cpt:`, `select:`, `sft:`, `dpo:` mappings merged over the top-level sections of the
same names and validated by the same models. The built-in arms are `BUILTIN_ARMS`; a new name
says which of them it is `like:` and overrides what differs. `baseline`, the traditional arm's
older name, is an alias (`ALIASES`): an arm listed as `baseline` is the `traditional` built-in
under that name. Without `arms:` a run trains [mixcpt, baseline] as it always has, or [mixcpt]
alone with the older `baseline: {enabled: false}`.

A merge arm (`{name: mixcpt-merge-0.25, like: merge, of: mixcpt, base_weight: 0.25}`) trains
nothing: its stage-1 model is the stage-1 model of the arm it is `of`, interpolated toward the base,
θ = (1 − λ)·θ_arm + λ·θ_base with λ = `base_weight` (mixcpt.merge). Stage 1 is where forgetting
happens, so the merged model is one more stage-1 point between domain knowledge and what the base
knew; a merge arm has no stage 2. One arm per λ: each is one model, one folder DIR/<name>/cpt and
one row of the eval table, like any other arm's stage 1. The names `mixcpt demo --arms` accepts
(`all`, `mixcpt-merge-0.25`, ...) are in mixcpt.config.arm_names.

`resolve_arms` turns the entries into `Arm`s, each holding the run's config with the arm's
sections in place (`Arm.config`), which is what the stages of that arm read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from mixcpt.config.base import Strict

if TYPE_CHECKING:
    from mixcpt.config import Config

# The config sections an arm may override, in the order the stages read them.
ARM_SECTIONS = ("cpt", "select", "sft", "dpo")
# Names an arm cannot take: they are other entries of the run folder (DIR/<arm>/ holds an arm's
# models) or the eval table's row of the base model.
RESERVED_NAMES = ("base", "data", "logs", "teacher_cache", "world")


@dataclass(frozen=True)
class BuiltinArm:
    """A built-in arm's settings before any user override."""

    stream: Literal["mix", "domain", "replay"]
    align_on: Literal["selection", "pool"]
    overrides: dict[str, dict] = field(default_factory=dict)  # section -> partial mapping


# alpha None: a user alpha would otherwise contradict these weights
PLAIN_CE = {"ce_weight": 1.0, "lssd_weight": 0.0, "alpha": None}

BUILTIN_ARMS: dict[str, BuiltinArm] = {
    # Mix-CPT: D_MIX with the cpt section's loss (CE + LSSD), then SFT and DPO on the k samples
    # `select` keeps
    "mixcpt": BuiltinArm("mix", "selection"),
    # the traditional recipe: plain CE on D_K (no teacher), then SFT and DPO on the whole pool
    # (DPO as baseline.dpo says)
    "traditional": BuiltinArm("domain", "pool", {"cpt": PLAIN_CE}),
    # the LSSD-off ablation: D_MIX with plain CE (no teacher), then Mix-CPT's stage 2
    "mixture-ce": BuiltinArm("mix", "selection", {"cpt": PLAIN_CE}),
    # Mix-CPT with k samples drawn at random (seeded by `seed`) instead of the easiest
    "random-k": BuiltinArm("mix", "selection", {"select": {"strategy": "random"}}),
    # Mix-CPT's stage 1, then SFT and DPO on the whole pool: no selection
    "whole-pool": BuiltinArm("mix", "pool"),
    # Mix-CPT with another corrected teacher (design §1; the weights as mixcpt's): plain
    # distillation to the frozen base, and Minifinetuning
    "mixture-kl": BuiltinArm("mix", "selection", {"cpt": {"objective": "kl"}}),
    "mixture-mft": BuiltinArm("mix", "selection", {"cpt": {"objective": "mft"}}),
    # the standard anti-forgetting baseline: D_K's documents with general pre-training text
    # replayed among them (data.replay), plain CE, then Mix-CPT's stage 2 like mixture-ce's, so
    # that against mixture-ce it differs only in what fills the general share: replayed
    # pre-training text instead of the rendered instructions
    "replay": BuiltinArm("replay", "selection", {"cpt": PLAIN_CE}),
    # Mix-CPT training LoRA adapters only: the base with its adapters disabled is the teacher, and
    # the adapters are merged into the saved weights (cpt.lora sets them). At cpt.training's rate:
    # on the demo, 2.5 to 20 times it taught no more of the domain and forgot more (README, LoRA);
    # an arm entry sets its own, e.g. {name: lora, cpt: {training: {learning_rate: 2.0e-4}}}
    "lora": BuiltinArm("mix", "selection", {"cpt": {"teacher": "lora"}}),
}
# older names of built-in arms: an arm listed under one is the built-in it names, under that name
ALIASES = {"baseline": "traditional"}
# what `like` accepts: the names above and the older ones (a new built-in needs no second list),
# or a merge
BuiltinName = Literal[(*BUILTIN_ARMS, *ALIASES)]
MERGE = "merge"


def builtin_of(name: str) -> str | None:
    """The built-in arm `name` names (itself, or the one an alias stands for); None for another
    name."""
    name = ALIASES.get(name, name)
    return name if name in BUILTIN_ARMS else None


class ArmConfig(Strict):
    """One entry of `arms:`; a bare name (`- random-k`) is the same as `{name: random-k}`."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The arm's name: its folder DIR/<name>/ and its rows in the results. A "
        f"built-in ({', '.join(BUILTIN_ARMS)}; baseline is the traditional arm's older name) or a "
        "new name with `like`.",
    )
    like: BuiltinName | Literal["merge"] | None = Field(
        None,
        description="For a new name: the built-in arm it starts from, before its own overrides, "
        "or `merge`: no training, the stage-1 model of the arm named by `of` interpolated toward "
        "the base by `base_weight` (a stage-1 model only: a merge arm has no SFT or DPO). Not "
        "given for a built-in name.",
    )
    stream: Literal["mix", "domain", "replay"] | None = Field(
        None,
        description="What stage 1 trains on: mix (D_MIX, the domain corpus mixed with the general "
        "samples), domain (D_K, the domain corpus alone) or replay (D_K's documents interleaved "
        "with general pre-training text from data.replay). Default: the built-in's.",
    )
    align_on: Literal["selection", "pool"] | None = Field(
        None,
        description="What SFT and DPO train on: selection (the k samples `select` keeps, scored "
        "with this arm's stage-1 model) or pool (every general sample). Default: the built-in's.",
    )
    run_dpo: bool | None = Field(
        None,
        description="Run DPO after SFT (when data.preferences is set). Default: true, but "
        "baseline.dpo for the traditional arm (or baseline) and arms like it.",
    )
    cpt: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys of the top-level `cpt:` that differ for this arm (e.g. {lssd_weight: "
        "0}, {training: {max_steps: 200}}), merged over it and validated the same way.",
    )
    select: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys of the top-level `select:` that differ for this arm (e.g. {k: 50}).",
    )
    sft: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys of the top-level `sft:` that differ for this arm.",
    )
    dpo: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys of the top-level `dpo:` that differ for this arm.",
    )
    of: str | None = Field(
        None,
        description="A merge arm only: the arm (another entry of `arms`, not a merge) whose "
        "stage-1 model is merged toward the base. Its model is built first, and a rebuild of it "
        "rebuilds the merge.",
    )
    base_weight: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="A merge arm only: λ, the base model's weight in θ = (1 − λ)·θ_arm + λ·θ_base, "
        "tensor by tensor, in float32, saved in model.dtype: 0 is the arm's model, 1 the base. "
        "`mixcpt demo --arms all` merges at 0.25, 0.5 and 0.75, one arm each.",
    )

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_NAMES:
            raise ValueError(f"{name!r} is taken by the run folder; use another name")
        return name


@dataclass(frozen=True)
class Arm:
    """A resolved arm: its name, the built-in it is (or is like), its stage-1 stream, what stage 2
    aligns on, whether it runs DPO, and the run's config with its own sections in place."""

    name: str
    like: str
    stream: str
    align_on: str
    run_dpo: bool
    config: Config
    # a merge arm (like "merge"): the arm whose stage-1 model it merges, and λ
    merge_of: str | None = None
    base_weight: float | None = None


def merged(base: dict, override: dict) -> dict:
    """`base` with `override`'s keys set; mappings present in both are merged the same way."""
    out = dict(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def arm_entries(cfg: Config) -> list[ArmConfig]:
    """The configured arms, or the default: [mixcpt, baseline], or [mixcpt] alone when
    `baseline.enabled` is false."""
    if cfg.arms is not None:
        return cfg.arms
    names = ["mixcpt", "baseline"] if cfg.baseline.enabled else ["mixcpt"]
    return [ArmConfig(name=name) for name in names]


def _error(loc: tuple, message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("arm", message), loc=loc, input=value)


def resolve_arm(cfg: Config, entry: ArmConfig) -> Arm:
    """`entry` with its built-in's settings and the top-level sections filled in. Raises a
    ValidationError whose keys start with arms.<name>. for an override its section refuses."""
    if entry.like == MERGE:  # trains nothing: the top-level sections, unused, and no stage 2
        return Arm(
            name=entry.name,
            like=MERGE,
            stream="",
            align_on="",
            run_dpo=False,
            config=cfg,
            merge_of=entry.of,
            base_weight=entry.base_weight,
        )
    builtin_name = builtin_of(entry.like or entry.name)
    builtin = BUILTIN_ARMS[builtin_name]
    sections, errors = {}, []
    for section in ARM_SECTIONS:
        top = getattr(cfg, section)
        override = merged(builtin.overrides.get(section, {}), getattr(entry, section))
        if not override:
            sections[section] = top
            continue
        # over the keys the user set, so that defaults stay defaults (DPO's own learning rate)
        try:
            sections[section] = type(top).model_validate(
                merged(top.model_dump(exclude_unset=True), override)
            )
        except ValidationError as err:
            for e in err.errors():
                message = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
                message = message.removeprefix("Value error, ")
                errors.append(_error(("arms", entry.name, section, *e["loc"]), message, e["input"]))
    if errors:
        raise ValidationError.from_exception_data("Config", errors)
    run_dpo = entry.run_dpo
    if run_dpo is None:
        run_dpo = cfg.baseline.dpo if builtin_name == "traditional" else True
    return Arm(
        name=entry.name,
        like=builtin_name,
        stream=entry.stream or builtin.stream,
        align_on=entry.align_on or builtin.align_on,
        run_dpo=run_dpo,
        config=cfg.model_copy(update=sections),
    )


def check_entries(entries: list[ArmConfig]) -> None:
    """Names are unique; a new name says what it is like, a built-in one does not. Raises a
    ValidationError naming the arm."""
    errors, seen = [], set()
    for i, entry in enumerate(entries):
        if entry.name in seen:
            message = f"{entry.name!r} is listed twice"
            errors.append(_error(("arms", i, "name"), message, entry.name))
        seen.add(entry.name)
        if builtin_of(entry.name) and entry.like is not None:
            message = f"{entry.name!r} is a built-in arm; `like` is for a new name"
            errors.append(_error(("arms", entry.name, "like"), message, entry.like))
        if not builtin_of(entry.name) and entry.like is None:
            message = (
                f"{entry.name!r} is not a built-in arm ({', '.join(BUILTIN_ARMS)}); a new arm "
                "says which one it is like: {name: ..., like: mixcpt, ...}"
            )
            errors.append(_error(("arms", entry.name, "like"), message, None))
        errors += _merge_errors(entry, entries)
    if errors:
        raise ValidationError.from_exception_data("Config", errors)


# what a merge arm cannot set: it trains nothing
TRAINING_FIELDS = ("stream", "align_on", "run_dpo", *ARM_SECTIONS)


def _merge_errors(entry: ArmConfig, entries: list[ArmConfig]) -> list[InitErrorDetails]:
    """A merge arm names a trained arm of the list (`of`) and λ (`base_weight`), and nothing a
    trained arm sets; any other arm sets neither."""
    loc = ("arms", entry.name)
    if entry.like != MERGE:
        return [
            _error((*loc, key), "only a merge arm (like: merge) sets it", getattr(entry, key))
            for key in ("of", "base_weight")
            if getattr(entry, key) is not None
        ]
    errors = [
        _error((*loc, key), "a merge arm trains nothing; leave it out", getattr(entry, key))
        for key in TRAINING_FIELDS
        if key in entry.model_fields_set
    ]
    if entry.base_weight is None:
        errors.append(_error((*loc, "base_weight"), "a merge arm needs λ (0 to 1)", None))
    trained = [e.name for e in entries if e.like != MERGE]
    if entry.of not in trained:
        message = f"a merge arm names the trained arm it merges, one of: {', '.join(trained)}"
        errors.append(_error((*loc, "of"), message, entry.of))
    return errors


def resolve_arms(cfg: Config) -> list[Arm]:
    """Every arm of the run, in the configured order."""
    return [resolve_arm(cfg, entry) for entry in arm_entries(cfg)]


def find_arm(cfg: Config, name: str) -> Arm:
    """The arm called `name`; a ConfigError naming the configured arms when there is none."""
    from mixcpt.errors import ConfigError

    for entry in arm_entries(cfg):
        if entry.name == name:
            return resolve_arm(cfg, entry)
    names = ", ".join(entry.name for entry in arm_entries(cfg))
    raise ConfigError(f"arm {name!r}: this config trains no such arm (its arms: {names})")
