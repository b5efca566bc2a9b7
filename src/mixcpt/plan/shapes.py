"""The base model's shape for `mixcpt plan`: parameters, decoder layers and LoRA adapters, counted
exactly from its config.json (the model is built on the `meta` device), and mixcpt's copy of the
paper's models' config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mixcpt.config import Config
from mixcpt.errors import ConfigError
from mixcpt.rundir import RunDir

# The paper's base models (design §1): their published config.json, copied into PAPER_CONFIGS
# so that `mixcpt plan examples/paper/*.yaml` works with no hub access; a local or cached config
# wins.
PAPER_CONFIGS = Path(__file__).with_name("paper_configs")
KNOWN_CONFIGS = {
    "meta-llama/Meta-Llama-3-8B": "Meta-Llama-3-8B.json",
    "meta-llama/Meta-Llama-3-8B-Instruct": "Meta-Llama-3-8B.json",
    "Qwen/Qwen2-7B": "Qwen2-7B.json",
    "Qwen/Qwen2-7B-Instruct": "Qwen2-7B.json",
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of the base model's architecture."""

    params: int  # every parameter (tied embeddings once)
    layer_params: int  # one decoder layer's
    lora_params: int  # trainable with cfg.cpt.lora's adapters
    lora_per_layer: int  # adapted linear layers in one decoder layer
    lora_rank: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    source: str  # where its config came from


def _read_config(cfg: Config, run: RunDir | None):
    """(transformers config of the base model, where it came from). Order: the run's own base/
    folder (GGUF or demo conversions), the GGUF file, a local folder or the hub cache, mixcpt's
    copy for the paper's models, the hub."""
    from transformers import AutoConfig

    m, remote = cfg.model, cfg.model.trust_remote_code
    if run is not None and (run.base / "config.json").is_file():
        return AutoConfig.from_pretrained(run.base), f"{run.base}/config.json"
    if m.gguf_file:
        from mixcpt.gguf_model import resolve_gguf_path

        path = resolve_gguf_path(m.path, m.gguf_file)
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name), str(path)
    try:
        config = AutoConfig.from_pretrained(m.path, trust_remote_code=remote, local_files_only=True)
        return config, f"{m.path} (config.json)"
    except OSError:
        if m.path in KNOWN_CONFIGS:
            spec = json.loads((PAPER_CONFIGS / KNOWN_CONFIGS[m.path]).read_text())
            return AutoConfig.for_model(spec.pop("model_type"), **spec), (
                f"{m.path} (mixcpt's copy of its config.json; not on this machine)"
            )
    try:
        return AutoConfig.from_pretrained(m.path, trust_remote_code=remote), f"{m.path} (hub)"
    except OSError as err:
        raise ConfigError(f"model.path: {m.path}: cannot read its config.json: {err}") from None


def _lora_targets(model: torch.nn.Module, targets) -> list[torch.nn.Linear]:
    """The linear layers PEFT adapts for `targets` ("all-linear": all but the output layer; else
    module names or their last parts)."""
    head = model.get_output_embeddings()
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets == "all-linear" or any(name == t or name.endswith(f".{t}") for t in targets):
            found.append(module)
    return found


def model_shape(cfg: Config, run: RunDir | None = None) -> ModelShape:
    """The base model's shape, from its config.json only: the model is built on the `meta`
    device (no memory, no weights read) to count its parameters and LoRA adapters exactly."""
    from transformers import AutoModelForCausalLM

    config, source = _read_config(cfg, run)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=cfg.model.trust_remote_code
        )
    text = config.get_text_config()
    # the decoder layers: the module list as long as the config's layer count
    layers = next(
        m
        for m in model.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == text.num_hidden_layers
    )
    layer = layers[0]
    lora = cfg.cpt.lora
    adapted = _lora_targets(model, lora.target_modules)
    in_layer = {id(m) for m in layer.modules()}
    heads = text.num_attention_heads
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        layer_params=sum(p.numel() for p in layer.parameters()),
        lora_params=sum(lora.r * (m.in_features + m.out_features) for m in adapted),
        lora_per_layer=sum(id(m) in in_layer for m in adapted),
        lora_rank=lora.r,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        source=source,
    )
