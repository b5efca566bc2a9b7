"""Loading and saving models and tokenizers as standard Hugging Face folders."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mixcpt.config import ModelConfig
from mixcpt.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer from a folder or hub id, with a pad token (EOS when the tokenizer has none)."""
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str | Path, dtype: str = "float32", trust_remote_code: bool = False, attn_implementation: str | None = None
) -> PreTrainedModel:
    """A causal LM from a folder or hub id, weights from safetensors only (never pickles)."""
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (ValueError, OSError) as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(f"{path}: this model needs its own code; set model.trust_remote_code: true "
                              "only if you trust its authors") from None
        if "safetensors" in str(err):
            raise ConfigError(f"{path}: no safetensors weights (mixcpt never loads pickled weights); "
                              "convert the checkpoint to safetensors first") from None
        raise


def base_model_path(model_cfg: ModelConfig, run_base: Path) -> str:
    """Where the base model is read from: the run's own `base/` folder when mixcpt built or
    converted one there (demo, GGUF), else the configured path or hub id."""
    return str(run_base) if run_base.exists() else model_cfg.path


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> None:
    """Write a standard HF folder (config, safetensors weights, tokenizer) loadable by from_pretrained."""
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
