"""A merge arm's stage-1 model (mixcpt.config.arms): no training, another arm's stage-1 model
interpolated toward the base model, tensor by tensor,

    θ = (1 − λ)·θ_arm + λ·θ_base        λ = the arm's `base_weight`

Each sum is computed in float32 and stored in `model.dtype`, and the result is saved as any stage's
model: a standard HF folder, written atomically with its fingerprint (node cpt/<merge arm>, whose
upstream is the merged arm's cpt node and whose files are the base's).

Memory: one model is loaded (the arm's, in `model.dtype`); the base's tensors are read one at a
time from its safetensors files (`safe_open`), so an 8B merge needs about one 8B model of memory.
A base whose files name its tensors otherwise than the model does (a checkpoint layout that
transformers converts when loading) is loaded as a second model instead, in float32 (the values
streaming would read). Tied tensors (input and output embeddings) are one tensor, merged once. A
LoRA-trained arm's folder holds whole weights (its adapters were merged when it was saved), so it
merges like any other.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mixcpt.atomic import atomic_dir
from mixcpt.config import Config
from mixcpt.config.arms import find_arm
from mixcpt.fingerprints import begin, write_record
from mixcpt.models import load_model, load_tokenizer, model_from, save_model
from mixcpt.pipeline import stage1_owner
from mixcpt.processes import main_process_runs, process_state
from mixcpt.rundir import RunDir, base_model_path


def interpolate(arm: torch.Tensor, base: torch.Tensor, base_weight: float) -> torch.Tensor:
    """(1 − λ)·arm + λ·base for λ = `base_weight`, computed in float32, in `arm`'s dtype."""
    if arm.shape != base.shape:
        raise ValueError(
            f"cannot merge a tensor of shape {tuple(arm.shape)} with {tuple(base.shape)}"
        )
    return ((1 - base_weight) * arm.float() + base_weight * base.float()).to(arm.dtype)


def tied_groups(model: PreTrainedModel) -> list[list[str]]:
    """The names of each floating-point tensor of `model`'s state dict, tied names together
    (["model.embed_tokens.weight", "lm_head.weight"] when the embeddings are tied)."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            groups.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    return list(groups.values())


def merge_into(
    model: PreTrainedModel, base_tensor: Callable[[list[str]], torch.Tensor], base_weight: float
) -> int:
    """Interpolate every floating-point tensor of `model` toward the base, in place.
    `base_tensor(names)` returns the base's tensor of one group of tied names. Returns the number
    of tensors merged."""
    state, groups = model.state_dict(), tied_groups(model)
    with torch.no_grad():
        for names in groups:
            tensor = state[names[0]]
            tensor.copy_(interpolate(tensor, base_tensor(names), base_weight))
    return len(groups)


def weight_files(path: str) -> list[Path]:
    """The safetensors files of a model folder or hub id (from the local cache when offline)."""
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, allow_patterns=["*.safetensors"]))
    return sorted(folder.glob("*.safetensors"))


def merged_model(
    cfg: Config, arm_path: Path, base_path: str, base_weight: float
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, int]:
    """(the model at `arm_path` merged with the base at `base_path` with weight `base_weight`,
    in `model.dtype`; the arm's tokenizer; the number of tensors merged)."""
    model = model_from(cfg.model, arm_path)
    tokenizer = load_tokenizer(arm_path, cfg.model.trust_remote_code)
    with ExitStack() as files:
        where = {}  # tensor name -> the open base file holding it
        for path in weight_files(base_path):
            f = files.enter_context(safe_open(str(path), framework="pt"))
            where.update(dict.fromkeys(f.keys(), f))
        if all(any(n in where for n in names) for names in tied_groups(model)):

            def base_tensor(names: list[str]) -> torch.Tensor:
                name = next(n for n in names if n in where)
                return where[name].get_tensor(name)

        else:  # another layout on disk: the base as transformers loads it, its values exact
            m = cfg.model
            base_state = load_model(
                base_path, "float32", m.trust_remote_code, m.attn_implementation
            ).state_dict()

            def base_tensor(names: list[str]) -> torch.Tensor:
                return base_state[names[0]]

        merged = merge_into(model, base_tensor, base_weight)
    return model, tokenizer, merged


def save_merged(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, final: Path, record: dict
) -> None:
    """Write `model` and `tokenizer` to `final` as an HF folder, atomically, with the fingerprint
    `record`."""
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with atomic_dir(final, size) as tmp:
        save_model(model, tokenizer, tmp)
        write_record(tmp, record)


def run_merge(cfg: Config, run: RunDir, arm: str, force: bool = False) -> dict:
    """Build the stage-1 model of merge arm `arm`: `run.stage(arm, "cpt")`, from the stage-1
    model of the arm it is `of` and the base. Reused (returning the recorded metrics) when built
    from the same models and λ, unless `force`. The main process merges; the others wait.

    Returns the metrics also written to results.json under stages/<arm>/cpt: {merge_of, model_of
    (the arm whose stage-1 folder was read: merge_of's, or the arm it shares it with),
    base_weight, tensors, runtime_s, steps 0, tokens 0 (nothing trained)}."""
    key, final = f"{arm}/cpt", run.stage(arm, "cpt")
    record = begin(cfg, run, f"cpt/{arm}", force)
    if record is None:
        return run.recorded_metrics(key)
    this = find_arm(cfg, arm)
    model_of = stage1_owner(cfg, this.merge_of)

    def build() -> None:
        start = time.perf_counter()
        source = run.finished_model(model_of, "cpt")
        base = base_model_path(cfg.model, run.base)
        model, tokenizer, tensors = merged_model(cfg, source, base, this.base_weight)
        metrics = {
            "merge_of": this.merge_of,
            "model_of": model_of,
            "base_weight": this.base_weight,
            "tensors": tensors,
            "runtime_s": round(time.perf_counter() - start, 3),
            "steps": 0,
            "tokens": 0,
        }
        # before the folder appears, as a trained stage's: a finished merge has its metrics
        run.update_results("stages", key, metrics)
        save_merged(model, tokenizer, final, record)
        shutil.rmtree(run.work(arm, "cpt"), ignore_errors=True)  # begin() made it; no checkpoints

    # the others wait without a collective: an 8B merge on the CPU may outlast its timeout
    main_process_runs(process_state(), run.root / ".work", f"merge-{arm}", build)
    return run.recorded_metrics(key)
