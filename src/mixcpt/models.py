"""Loading and saving models and tokenizers as standard Hugging Face folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mixcpt.atomic import atomic_dir, write_json_atomic
from mixcpt.config import ModelConfig
from mixcpt.errors import ConfigError
from mixcpt.gguf_model import convert_gguf, resolve_gguf_path

if TYPE_CHECKING:  # importing the Trainer costs a second; the data stage never needs it
    from transformers import Trainer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output layer (what its logits' last dimension will be)."""
    return int(model.get_output_embeddings().weight.shape[0])


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer from a folder or hub id, with a pad token (EOS when the tokenizer has none)."""
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str | Path,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A causal LM from a folder or hub id, weights from safetensors only (never pickles)."""
    kwargs = {
        "dtype": DTYPES[dtype],
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (ValueError, OSError) as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"{path}: this model needs its own code; set model.trust_remote_code: true "
                "only if you trust its authors"
            ) from None
        if "safetensors" in str(err):
            raise ConfigError(
                f"{path}: no safetensors weights (mixcpt never loads pickled weights); "
                "convert the checkpoint to safetensors first"
            ) from None
        raise


def model_from(settings: ModelConfig, path: str | Path) -> PreTrainedModel:
    """`load_model` of `path` with the run's `model:` settings (dtype, remote code, attention)."""
    return load_model(
        path, settings.dtype, settings.trust_remote_code, settings.attn_implementation
    )


# In a base folder converted from GGUF: which file, so that a changed config is caught.
GGUF_SOURCE = "gguf_source.json"


def ensure_base_model(model_cfg: ModelConfig, run_base: Path) -> None:
    """Make the base model of a GGUF config (`model.gguf_file`) an HF folder at `run_base`, once.

    Call before the first stage: every stage then reads `rundir.base_model_path(...)`, which prefers
    `run_base`. A no-op without `gguf_file`, and when `run_base` already holds this GGUF's
    conversion. Raises `ConfigError` when the GGUF file or its package is missing, transformers
    cannot load it, or `run_base` holds another model (a run folder belongs to one base model).
    """
    if not model_cfg.gguf_file:
        return
    gguf_path = resolve_gguf_path(model_cfg.path, model_cfg.gguf_file)
    source = {"gguf_file": str(gguf_path), "bytes": gguf_path.stat().st_size}
    if run_base.exists():
        marker = run_base / GGUF_SOURCE
        recorded = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
        if recorded != source:
            raise ConfigError(
                f"model.gguf_file: {run_base} holds another base model "
                f"({recorded or 'not from GGUF'}); "
                f"use a new --output folder for {gguf_path}"
            )
        return
    print(
        f"mixcpt: converting {gguf_path} to a safetensors model folder at {run_base} (once per run)"
    )
    with atomic_dir(run_base) as tmp:
        convert_gguf(gguf_path, tmp, DTYPES[model_cfg.dtype])
        (tmp / GGUF_SOURCE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path
) -> None:
    """Write a standard HF folder (config, safetensors weights, tokenizer) loadable by
    `from_pretrained`."""
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def save_trained_model(
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    final,
    merge_lora: bool = False,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the trained model (safetensors), tokenizer and the `extra` JSON files (name ->
    object) to `final` atomically. Call on EVERY process.

    The weights are gathered into one full state dict first (a collective under FSDP and ZeRO-3,
    where each process holds a shard; a plain `state_dict()` otherwise), then the main process
    writes them. `merge_lora` folds PEFT adapters into the weights (DDP/ZeRO-2 only: there each
    process holds the whole model).
    """
    state_dict = None if merge_lora else trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.is_world_process_zero():
        trained = trainer.accelerator.unwrap_model(trainer.model)
        if merge_lora:
            trained = trained.merge_and_unload()  # a plain model folder, loadable without PEFT
        trained.config.use_cache = True  # for whoever generates with the saved model
        tensors = (state_dict or trained.state_dict()).values()
        size = sum(t.numel() * t.element_size() for t in tensors)  # for a full disk's message
        with atomic_dir(final, size) as tmp:
            trained.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            for name, obj in (extra or {}).items():
                write_json_atomic(tmp / name, obj)
    trainer.accelerator.wait_for_everyone()
