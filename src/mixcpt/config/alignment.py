"""Stage 2, format alignment, and the traditional arm's older switches (`select:`, `sft:`, `dpo:`,
`baseline:`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from mixcpt.chat_templates import CHAT_TEMPLATES, resolve_chat_template
from mixcpt.config.base import Strict
from mixcpt.config.training import TrainingConfig


class SelectConfig(Strict):
    """Stage 2a: choose the k samples of the general pool to align on."""

    k: int = Field(
        1000,
        ge=1,
        description="Samples kept of the instruction pool and of the preference pool (each); "
        "more than a pool holds keeps all of it.",
    )
    score: Literal["ppl", "fas", "fas_ratio"] = Field(
        "ppl",
        description="ppl: exp(mean response NLL) under the plain stage-1 rendering. fas: the "
        "format cost, mean NLL of the response's own tokens after the chat template's prompt "
        "minus the same after the plain prompt, chosen among the samples the model already knows "
        "(see fas_quantile). fas_ratio (an ablation; it favours long responses the model does "
        "not know): mean response NLL through the chat template / the same under the plain "
        "rendering. Lower is easier; a preference pair is scored by its chosen response.",
    )
    fas_quantile: float = Field(
        0.5,
        gt=0,
        le=1,
        description="With score fas: the share of the pool, by lowest plain response NLL (content "
        "the model already knows), among which `easiest` keeps the k with the lowest format cost "
        "(`hardest`: the share with the highest plain NLL, and the k highest costs); widened to "
        "k samples when it holds fewer. 1 ranks the whole pool by format cost.",
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


class SFTConfig(Strict):
    max_length: int = Field(
        1024,
        ge=8,
        description="Most tokens of prompt + response per sample; longer prompts are truncated "
        "from the left (a response longer than max_length - 1 is cut on the right).",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template when the tokenizer has none (its own always wins): a Jinja "
        f"template or the name of a shipped one ({', '.join(CHAT_TEMPLATES)}; see "
        "mixcpt.chat_templates). Used by fas selection, SFT, DPO and chat-format evaluation.",
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="Training settings of SFT, every arm's unless it overrides them.",
    )

    @field_validator("chat_template")
    @classmethod
    def _named_template(cls, value: str | None) -> str | None:
        # a name becomes its Jinja text here, so every stage (and every fingerprint) sees the text
        return None if value is None else resolve_chat_template(value)


class DPOTraining(TrainingConfig):
    """TrainingConfig with DPO's defaults, as TRL's DPOConfig changes TrainingArguments' own: a
    `dpo.training` mapping keeps them for every key it leaves out."""

    learning_rate: float = Field(
        5e-7,
        gt=0,
        description="Peak learning rate of DPO (TrainingArguments.learning_rate): 5e-7 unless "
        "set, far below SFT's; about 1e-6 at most for a real model.",
    )


class DPOConfig(Strict):
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
    training: DPOTraining = Field(
        default_factory=DPOTraining,
        description="Training settings of DPO, every arm's unless it overrides them (DPO's "
        "defaults for the keys left out).",
    )


class BaselineConfig(Strict):
    """The traditional recipe's older switches, from before `arms:` listed the arms."""

    enabled: bool = Field(
        True,
        description="When `arms` is not given: also train the baseline arm (CPT on D_K with plain "
        "cross-entropy, then SFT on the whole instruction pool, and DPO, see `dpo`). Off: only "
        "the mixcpt arm. With `arms`, list the baseline there or leave it out instead.",
    )
    dpo: bool = Field(
        True,
        description="The baseline arm (and arms like it that do not set run_dpo) also runs DPO "
        "on the full preference pool after SFT (when data.preferences is set).",
    )
