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


def refuse_remote_code(err: Exception, name: str) -> None:
    """Raise a ConfigError naming `name` (the model as the message shows it) when `err` is
    transformers refusing to run a model's own code without `trust_remote_code`; return when it
    is any other error."""
    if "trust_remote_code" in str(err):
        raise ConfigError(
            f"{name}: this model needs its own code; set model.trust_remote_code: true only if "
            "you trust its authors"
        ) from None


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
        refuse_remote_code(err, str(path))
        if "safetensors" in str(err):
            raise ConfigError(
                f"{path}: no safetensors weights (mixcpt never loads pickled weights); "
                "convert the checkpoint to safetensors first"
            ) from None
        raise


def model_from(settings: ModelConfig, path: str | Path, trained: bool = False) -> PreTrainedModel:
    """`load_model` of `path` with the run's `model:` settings (remote code, attention), in
    `model.dtype`, or in float32 when the model is `trained`.

    A trained model's weights are the optimizer's float32 masters whatever `model.dtype` says:
    bf16 keeps 8 significant bits, so AdamW steps of lr 1e-5 would mostly round to nothing. The
    Trainer computes in `model.dtype` under autocast (`training_arguments`), and the saved folder
    is cast back (`save_trained_model`). Frozen models (selection, evaluation, the DPO reference,
    a LoRA base) are stored in `model.dtype`.
    """
    dtype = "float32" if trained else settings.dtype
    return load_model(path, dtype, settings.trust_remote_code, settings.attn_implementation)


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
    dtype: str = "float32",
    merge_lora: bool = False,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the trained model (safetensors, weights in `dtype`: the run's `model.dtype`),
    tokenizer and the `extra` JSON files (name -> object) to `final` atomically. Call on EVERY
    process.

    The weights are gathered into one full state dict first (a collective under FSDP and ZeRO-3,
    where each process holds a shard; a plain `state_dict()` otherwise), then the main process
    casts them to `dtype` and writes them; config.json records `dtype`. `merge_lora` folds PEFT
    adapters into the weights (DDP/ZeRO-2 only: there each process holds the whole model).
    """
    state_dict = None if merge_lora else trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.is_world_process_zero():
        trained = trainer.accelerator.unwrap_model(trainer.model)
        if merge_lora:
            # In float32: the adapters' product is added to the base weights exactly, and the sum
            # is rounded to `dtype` once, below. A plain model folder, loadable without PEFT. On
            # the CPU: a float32 copy of the base would not fit beside it on the GPU (training is
            # over; nothing runs on this model again).
            trained = trained.to("cpu").float().merge_and_unload()
        state_dict = in_dtype(state_dict or trained.state_dict(), DTYPES[dtype])
        trained.config.use_cache = True  # for whoever generates with the saved model
        size = sum(t.numel() * t.element_size() for t in state_dict.values())  # for a full disk
        with atomic_dir(final, size) as tmp:
            trained.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            # save_pretrained records the dtype of the model's parameters (float32 masters)
            trained.config.dtype = dtype
            trained.config.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            for name, obj in (extra or {}).items():
                write_json_atomic(tmp / name, obj)
    trainer.accelerator.wait_for_everyone()


def in_dtype(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state_dict` on the CPU with its floating-point tensors in `dtype`. Tensors that share
    memory (tied embeddings) still do, so that save_pretrained writes them once."""
    cast: dict[tuple, torch.Tensor] = {}

    def one(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in cast:
            cast[key] = tensor.to("cpu", dtype)
        return cast[key]

    return {name: one(tensor) for name, tensor in state_dict.items()}
