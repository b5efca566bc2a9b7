"""What each output of a run depends on: the config keys that change it, and the contents of
the files outside the run folder that it reads (mixcpt.fingerprints records them).

Inputs are the settings that change an output. Performance knobs are not (batch sizes of scoring
and evaluation, loss_chunk_size, compile_loss, tokenize_batch_size, gradient checkpointing,
checkpoint intervals, on_nonfinite, dpo.precompute_ref), nor is where and how often training logs
(report_to, logging_steps, ...: `LOGGING_KEYS`), nor the number of processes (`mixcpt status` runs
in one). Every other TrainingArguments field passed through `training:` counts. Files (model,
tokenizer, data sources, benchmarks, probe, lm-eval task folder) count by content, hashed once
per size and modification time (`file_hash`); where they lie does not count. A hub id or pkg://
name stands for itself: a new hub revision goes unnoticed.

No torch here, so that `mixcpt status` answers at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from mixcpt.atomic import write_json_atomic
from mixcpt.config import Config
from mixcpt.config.arms import Arm, find_arm
from mixcpt.config.data import SOURCE_GROUPS
from mixcpt.config.training import LOGGING_KEYS
from mixcpt.rundir import RunDir, base_model_path

# TrainingConfig keys that change how a stage runs, not what it produces
TRAINING_KNOBS = LOGGING_KEYS | {
    "save_steps",
    "save_total_limit",
    "gradient_checkpointing",
    "on_nonfinite",
}


# ---- content hashes -----------------------------------------------------------------------

# Hashes of files this large are kept across processes; smaller ones cost less to rehash than to
# keep (a corpus of a million small files would make a huge cache).
REMEMBER_MIN_BYTES = 1 << 20
# A file modified this recently could change again within the clock's resolution without its
# size or time changing, so its hash is not remembered (git's "racily clean" rule).
RACY_SECONDS = 2.0
_known: dict[str, list] | None = None  # absolute path -> [size, mtime_ns, hash]


def _hash_cache_file() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mixcpt" / "file-hashes.json"


def _known_hashes() -> dict[str, list]:
    """The remembered hashes, read from disk on first use."""
    global _known
    if _known is None:
        try:
            _known = json.loads(_hash_cache_file().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            _known = None
        if not isinstance(_known, dict):  # none yet, or unreadable: it is only a cache
            _known = {}
    return _known


def file_hash(path: str | Path) -> str:
    """The sha256 of the file's bytes, as "sha256:HEX". Remembered by (path, size, modification
    time), on disk in ~/.cache/mixcpt/file-hashes.json for files of 1 MiB or more, so that a
    16 GB model is read once, not at every command."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    known = _known_hashes()
    hit = known.get(str(path))
    if hit is not None and hit[:2] == stamp:
        return hit[2]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    result = f"sha256:{digest.hexdigest()}"
    if time.time() - stat.st_mtime > RACY_SECONDS:
        known[str(path)] = [*stamp, result]
        if stat.st_size >= REMEMBER_MIN_BYTES:
            _save_known(known)
    return result


def _save_known(known: dict[str, list]) -> None:
    """Write the remembered hashes of large files that still exist."""
    keep = {p: v for p, v in known.items() if v[0] >= REMEMBER_MIN_BYTES and os.path.exists(p)}
    try:
        write_json_atomic(_hash_cache_file(), keep)
    except OSError:  # a read-only home only costs hashing again next time
        pass


def tree_hash(name: str, keep=None) -> str:
    """Content hash of a local file, or of the files under a local folder with their relative
    names (hidden entries, and names `keep` rejects, left out). A name that is no local path (a
    hub id, pkg://MODULE) stands for itself."""
    root = Path(name)
    if not root.exists():
        return f"name:{name}"
    if root.is_file():
        return file_hash(root)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        hidden = any(part.startswith(".") for part in rel.parts)
        if path.is_file() and not hidden and (keep is None or keep(path.name)):
            digest.update(f"{rel.as_posix()}\0{file_hash(path)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def is_tokenizer_file(name: str) -> bool:
    """Whether a file of a model folder belongs to the tokenizer (the data stage reads nothing
    else of the model)."""
    return "token" in name or "vocab" in name or name.endswith((".model", ".txt", ".tiktoken"))


def flat(prefix: str, value) -> dict:
    """A settings value as {dotted key: leaf}; lists of mappings (sources, benchmarks) become
    key[i].field, other lists stay whole."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flat(f"{prefix}.{key}", item))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(flat(f"{prefix}[{i}]", item))
        return out
    return {prefix: value}


# ---- what each output depends on ----------------------------------------------------------


def _training(prefix: str, training) -> dict:
    return flat(prefix, training.model_dump(mode="json", exclude=TRAINING_KNOBS))


def _model_settings(cfg: Config) -> dict:
    """How every stage loads a model (trust_remote_code changes nothing it computes)."""
    return {
        "model.dtype": cfg.model.dtype,
        "model.attn_implementation": cfg.model.attn_implementation,
    }


def _model_files(cfg: Config, run: RunDir) -> dict:
    files = {"model.path": tree_hash(base_model_path(cfg.model, run.base))}
    if cfg.model.tokenizer:
        files["model.tokenizer"] = tree_hash(cfg.model.tokenizer)
    return files


def _data_inputs(cfg: Config, run: RunDir) -> tuple[dict, dict]:
    """Sources by content and label (not by where they lie), the mixture, packing, rendering, the
    seed and the tokenizer's files; the replay stream's settings when there is one (without, a
    data build is the one it was before `data.replay` existed)."""
    unused = {"tokenize_batch_size"} | (set() if cfg.data.replay else {"replay", "replay_share"})
    data = cfg.data.model_dump(mode="json", exclude=unused)
    tokenizer = cfg.model.tokenizer or base_model_path(cfg.model, run.base)
    files = {"tokenizer": tree_hash(tokenizer, keep=is_tokenizer_file)}
    for group in SOURCE_GROUPS:
        for i, source in enumerate(getattr(cfg.data, group)):
            del data[group][i]["path"]
            data[group][i]["label"] = source.label  # names the pool's sample ids
            files[f"data.{group}[{i}].path"] = tree_hash(source.path)
    return {"seed": cfg.seed, **flat("data", data)}, files


def cpt_settings(arm: Arm) -> dict:
    """The settings that change `arm`'s stage-1 model: its stream and its cpt section, leaving out
    those of a teacher it does not use (plain CE is untouched by every LSSD setting), the seed and
    how models are loaded. Arms with equal settings share one stage-1 model (mixcpt.pipeline).
    A merge arm's: λ and the dtype it is saved in (the model it merges is an upstream node)."""
    cfg, cpt = arm.config, arm.config.cpt
    if arm.merge_of:
        return {"model.dtype": cfg.model.dtype, "merge.base_weight": arm.base_weight}
    # alpha is in the two weights it sets: alpha 0.5 and weights 0.5, 0.5 are one build
    unused = {"loss_chunk_size", "compile_loss", "training", "alpha"}
    if cpt.lssd_weight == 0:  # no teacher; `teacher: lora` still means training adapters
        unused |= {"temperature", "cache_top_k", "cache_dtype", "objective", "mft_threshold"}
        unused |= {"teacher"} if cpt.teacher != "lora" else set()
    if cpt.teacher != "cache":
        unused |= {"cache_top_k", "cache_dtype"}
    if cpt.objective != "mft":
        unused.add("mft_threshold")
    if cpt.teacher != "lora":
        unused.add("lora")
    return {
        "seed": cfg.seed,
        **_model_settings(cfg),
        "stream": arm.stream,
        **flat("cpt", cpt.model_dump(mode="json", exclude=unused)),
        **_training("cpt.training", cpt.training),
    }


def _cpt_inputs(cfg: Config, run: RunDir, arm: str) -> tuple[dict, dict]:
    """The arm's stage-1 settings (`cpt_settings`) and the base model's files."""
    return cpt_settings(find_arm(cfg, arm)), _model_files(cfg, run)


def select_settings(cfg: Config) -> dict:
    """The settings that change a selection made with a given stage-1 model (`cfg`: the arm's
    config). Arms with equal settings and stage-1 model share one selection."""
    unused = {"batch_size"} | ({"fas_quantile"} if cfg.select.score != "fas" else set())
    settings = cfg.select.model_dump(mode="json", exclude=unused)
    config = {**_model_settings(cfg), **flat("select", settings)}
    if cfg.select.strategy == "random":
        config["seed"] = cfg.seed
    if cfg.select.score in ("fas", "fas_ratio"):  # scores through the chat template
        config["sft.chat_template"] = cfg.sft.chat_template
    return config


def _alignment_inputs(cfg: Config, stage: str) -> dict:
    """SFT's or DPO's settings in `cfg` (an arm's config; DPO's reference is the same computed
    either way)."""
    section = getattr(cfg, stage)
    settings = section.model_dump(mode="json", exclude={"training", "precompute_ref"})
    return {
        "seed": cfg.seed,
        **_model_settings(cfg),
        "sft.chat_template": cfg.sft.chat_template,
        **flat(stage, settings),
        **_training(f"{stage}.training", section.training),
    }


def _eval_inputs(cfg: Config, run: RunDir) -> tuple[dict, dict]:
    """Benchmarks and probe by content, how prompts are formatted, and the base model (its row
    and the reference of every KL)."""
    ev = cfg.eval.model_dump(mode="json", exclude={"batch_size", "probe", "lm_eval_include_path"})
    files = _model_files(cfg, run)
    for i, bench in enumerate(cfg.eval.benchmarks):
        del ev["benchmarks"][i]["path"]
        files[f"eval.benchmarks[{i}].path"] = tree_hash(bench.path)
    if cfg.eval.probe:
        files["eval.probe"] = tree_hash(cfg.eval.probe)
    if cfg.eval.lm_eval_include_path:
        files["eval.lm_eval_include_path"] = tree_hash(cfg.eval.lm_eval_include_path)
    config = {
        **_model_settings(cfg),
        **flat("eval", ev),
        **flat("data.template", cfg.data.template.model_dump(mode="json")),
        "sft.chat_template": cfg.sft.chat_template,
    }
    return config, files


def config_and_files(cfg: Config, run: RunDir, node: str) -> tuple[dict, dict]:
    """({dotted config key: value}, {config key of a file or folder: content hash}) of what
    `node`'s output depends on, besides the outputs it reads."""
    stage, _, arm = node.partition("/")
    config, files = {}, {}
    if stage == "data":
        config, files = _data_inputs(cfg, run)
    elif stage == "cpt":
        config, files = _cpt_inputs(cfg, run, arm)
    elif stage == "select":
        config = select_settings(find_arm(cfg, arm).config)
    elif stage in ("sft", "dpo"):
        config = _alignment_inputs(find_arm(cfg, arm).config, stage)
    elif stage == "eval":
        config, files = _eval_inputs(cfg, run)
    return config, files
