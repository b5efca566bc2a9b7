"""Tokens and disk for `mixcpt plan`: D_MIX's and D_K's tokens, the teacher cache, the training
stages' checkpoints and the model folders a run writes."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixcpt.config import Config
from mixcpt.pipeline import stage_arms
from mixcpt.plan.launch import Launch, detect_launch
from mixcpt.plan.memory import ADAM, DTYPE_BYTES, MASTER, Workload, workloads
from mixcpt.plan.shapes import ModelShape, model_shape
from mixcpt.rundir import RunDir
from mixcpt.train.teacher_cache import CACHE_FILES, cache_layout

# Bytes of text per token, to estimate tokens from file sizes (English BPE; JSON keys count too).
TEXT_BYTES_PER_TOKEN = 4
RNG_STATE_BYTES = 16 * 2**10  # each process's rng_state_N.pth in a checkpoint


@dataclass(frozen=True)
class Tokens:
    mix: int | None  # D_MIX, the Mix-CPT arm's stage-1 stream (None: cannot be told)
    domain: int | None  # D_K, the traditional arm's
    source: str


def _packed_tokens(folder: Path) -> int | None:
    meta = folder / "meta.json"
    return int(json.loads(meta.read_text())["n_tokens"]) if meta.is_file() else None


def _estimated_tokens(path: str) -> int | None:
    """Tokens of a local source from its size on disk; None for a hub dataset."""
    p = Path(path)
    if not p.exists():
        return None
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) // TEXT_BYTES_PER_TOKEN


def count_tokens(cfg: Config, run: RunDir | None = None) -> Tokens:
    """D_MIX's and D_K's tokens: the data stage's output when it exists, else D_MIX from
    data.total_tokens or estimated from the sources' sizes with the mixture's rule (the scarcest
    weighted source bounds D_MIX, or with `oversample` the most plentiful), and D_K as the domain
    sources' weight share of D_MIX (D_K is D_MIX's domain part, mixcpt.data.stage)."""
    if run is not None and (mix := _packed_tokens(run.data / "mix")) is not None:
        return Tokens(mix, _packed_tokens(run.data / "domain"), f"{run.data} (the data stage)")
    all_sources = (*cfg.data.domain, *cfg.data.instructions, *cfg.data.preferences)
    total_weight = sum(s.weight for s in all_sources)
    domain_share = sum(s.weight for s in cfg.data.domain) / total_weight
    if cfg.data.total_tokens:
        mix = cfg.data.total_tokens
        return Tokens(mix, int(mix * domain_share), "D_MIX from data.total_tokens")
    sources = [s for s in all_sources if s.weight]
    sizes = [_estimated_tokens(s.path) for s in sources]
    if None in sizes:
        return Tokens(None, None, "unknown: hub datasets and no data.total_tokens")
    bounds = [size * total_weight / s.weight for s, size in zip(sources, sizes)]
    mix = max(bounds) if cfg.data.oversample else min(bounds)
    estimated = f"estimated from file sizes, ~{TEXT_BYTES_PER_TOKEN} bytes per token"
    return Tokens(int(mix), int(mix * domain_share), estimated)


def teacher_cache_bytes(
    cfg: Config, shape: ModelShape, tokens: Tokens, run: RunDir | None = None
) -> int | None:
    """Bytes of the `cache` teacher's files (teacher_cache.cache_layout) for D_MIX: the files'
    sizes when the cache exists, 0 without a cache teacher, None when D_MIX's tokens are unknown."""
    if cfg.cpt.teacher != "cache" or cfg.cpt.lssd_weight == 0:
        return 0
    folder = run.root / "teacher_cache" if run is not None else None
    if folder is not None and (folder / "meta.json").is_file():
        return sum((folder / name).stat().st_size for name in CACHE_FILES)
    if tokens.mix is None:
        return None
    block = cfg.data.block_size
    layout = cache_layout(
        math.ceil(tokens.mix / block),
        block,
        min(cfg.cpt.cache_top_k, shape.vocab),
        cfg.cpt.cache_dtype,
    )
    return sum(np.dtype(dtype).itemsize * math.prod(dims) for dtype, dims in layout.values())


def checkpoint_bytes(shape: ModelShape, work: Workload, launch: Launch) -> int:
    """One Trainer checkpoint of a training stage: the trained weights (float32 masters; LoRA:
    the adapters only; DeepSpeed: the 16-bit module), the optimizer (AdamW's moments; DeepSpeed
    also its float32 masters) and each process's RNG state."""
    trained = shape.lora_params if work.lora else shape.params
    if launch.mode.startswith("zero"):
        weights, optimizer = trained * work.storage, trained * (MASTER + ADAM)
    else:
        weights, optimizer = trained * MASTER, trained * ADAM
    return weights + optimizer + RNG_STATE_BYTES * launch.processes


def model_folders(cfg: Config, shape: ModelShape) -> dict[str, int]:
    """Bytes of every model folder the run writes (weights in model.dtype): each arm's cpt, sft
    and dpo, and base/ for a GGUF model converted once per run."""
    size = shape.params * DTYPE_BYTES[cfg.model.dtype]
    folders = {
        f"{arm}/{stage}": size for stage in ("cpt", "sft", "dpo") for arm in stage_arms(cfg, stage)
    }
    if cfg.model.gguf_file:
        folders["base"] = size
    return folders


@dataclass(frozen=True)
class Disk:
    """What the run writes, in bytes."""

    teacher_cache: int | None  # None: D_MIX's tokens cannot be told
    checkpoints: dict[str, int]  # training stage -> one checkpoint
    kept_checkpoints: int  # at most this many of a stage's exist at once (while rotating)
    folders: dict[str, int]  # model folder -> its size

    @property
    def total(self) -> int:
        """The most the run holds at once: the teacher cache, the largest stage's checkpoints
        (a stage deletes its own when done) and every model folder."""
        checkpoints = self.kept_checkpoints * max(self.checkpoints.values(), default=0)
        return (self.teacher_cache or 0) + checkpoints + sum(self.folders.values())


def disk_estimate(
    cfg: Config, shape: ModelShape, tokens: Tokens, launch: Launch, run: RunDir | None = None
) -> Disk:
    """The teacher cache, each training stage's checkpoint and the model folders of `cfg`."""
    checkpoints = {
        work.stage: checkpoint_bytes(shape, work, launch) for work in workloads(cfg) if work.train
    }
    save_limits = [cfg.cpt.training, cfg.sft.training, cfg.dpo.training]
    return Disk(
        teacher_cache=teacher_cache_bytes(cfg, shape, tokens, run),
        checkpoints=checkpoints,
        # transformers writes a new checkpoint before deleting the oldest of save_total_limit
        kept_checkpoints=max(t.save_total_limit for t in save_limits) + 1,
        folders=model_folders(cfg, shape),
    )


def disk_bytes(cfg: Config, run: RunDir | None = None) -> int:
    """The most bytes the run will hold on disk at once (`Disk.total`), for the launch the
    environment says (`detect_launch`); a teacher cache whose tokens cannot be told counts 0.
    Reads the model's config.json (as `model_shape`)."""
    shape, tokens = model_shape(cfg, run), count_tokens(cfg, run)
    return disk_estimate(cfg, shape, tokens, detect_launch(), run).total
