"""Where the LSSD teacher's logits come from (design §6).

The teacher is the model as it was before stage 1. Three sources, one interface
(`Teacher.lssd`), chosen by `cpt.teacher`:

- `online`: a frozen deep copy of the base model, run without grad beside the student;
- `lora`:   the student itself with its LoRA adapters disabled (no second copy in memory);
- `cache`:  the teacher's top-k log-probabilities, computed once over the packed D_MIX and kept
            on disk, so training carries no teacher model at all.

Cache layout (`RunDir.root / "teacher_cache"`), per block and shifted position t (the
prediction of token t + 1), P = block_size - 1:
    ids.npy       int32        [n_blocks, P, k]  the teacher's top-k tokens, most likely first
    logprobs.npy  float16/32   [n_blocks, P, k]  their log-probabilities at temperature T
    tail.npy      float32      [n_blocks, P]     log of the remaining mass (-inf when k = V)
    meta.json     what the cache is keyed on: the packed data's fingerprint, a hash of the
                  teacher's weights, k, T, dtype, vocabulary and shapes
    progress.json {"blocks_done": n}: building resumes from there after an interruption
The swap is applied at training time, from the labels (`losses.swap_topk_ids`): it only
exchanges the label's and the top-1's slots, and leaves the tail's mass unchanged, so nothing
about the label has to be stored. With k < V the loss is the bucketed KL documented in
`losses.lssd_loss_topk`; with k = V it is exact.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mixcpt.config import CPTConfig
from mixcpt.data.packing import IGNORE_INDEX, PackedBlocks
from mixcpt.errors import ConfigError
from mixcpt.losses import lssd_loss, lssd_loss_topk
from mixcpt.rundir import write_json_atomic


class IndexedBlocks(PackedBlocks):
    """`PackedBlocks` whose items also carry `block_index`, the block's row in the teacher cache."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "block_index": i}


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output layer (what its logits' last dimension will be)."""
    return int(model.get_output_embeddings().weight.shape[0])


def _forward_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T, V] logits of a packed batch: position ids restart per document and no attention
    mask is passed, so transformers builds the block-diagonal causal mask itself."""
    return model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits


class Teacher:
    """A source of LSSD targets."""

    def lssd(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], student_logits: torch.Tensor,
             labels: torch.Tensor, temperature: float, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For a batch (`inputs` as the dataset gives them, on the student's device), the student's
        shifted logits [B, T-1, V] and the shifted labels [B, T-1], return (L_LSSD scalar, number of
        supervised positions where the teacher's top-1 already was the label)."""
        raise NotImplementedError


class _FullLogitsTeacher(Teacher):
    def logits(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher logits [B, T, V] of the batch, without grad."""
        raise NotImplementedError

    def lssd(self, model, inputs, student_logits, labels, temperature, chunk_size):
        teacher_logits = self.logits(model, inputs)[:, :-1]  # [B, T-1, V]
        loss = lssd_loss(student_logits, teacher_logits, labels, temperature, IGNORE_INDEX, chunk_size)
        top1_matches = ((teacher_logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
        return loss, top1_matches


class OnlineTeacher(_FullLogitsTeacher):
    """A frozen deep copy of `teacher_model` (eval mode, no grad), moved to the student's device on
    first use. It is not part of the trained model, so DDP/FSDP never wrap it."""

    def __init__(self, teacher_model: torch.nn.Module, student_vocab_size: int):
        if vocab_size(teacher_model) != student_vocab_size:
            raise ConfigError(f"cpt.teacher: the teacher's vocabulary has {vocab_size(teacher_model)} tokens, "
                              f"the student's {student_vocab_size}; LSSD needs the same vocabulary")
        self.model = copy.deepcopy(teacher_model).eval().requires_grad_(False)

    def logits(self, model, inputs):
        self.model.to(inputs["input_ids"].device)  # a no-op after the first batch
        with torch.no_grad():
            return _forward_logits(self.model, inputs)


class LoraTeacher(_FullLogitsTeacher):
    """The PEFT-wrapped student with its adapters disabled: exactly the frozen base model."""

    def __init__(self, peft_model: torch.nn.Module):
        if not hasattr(peft_model, "disable_adapter"):
            raise ConfigError("cpt.teacher: lora needs the student wrapped with PEFT LoRA adapters")
        self.peft_model = peft_model

    def logits(self, model, inputs):
        # The unwrapped PEFT model, not the DDP wrapper `model`: no gradient flows, no sync needed.
        with torch.no_grad(), self.peft_model.disable_adapter():
            return _forward_logits(self.peft_model, inputs)


# ---- cache ---------------------------------------------------------------------------------
def teacher_weights_hash(model: torch.nn.Module) -> str:
    """blake2b of every tensor of the model's state dict (name, dtype, shape and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _mismatch(folder: Path, found: dict, wanted: dict) -> ConfigError:
    diffs = ", ".join(f"{k}: cache {found.get(k)!r} vs now {wanted[k]!r}" for k in wanted if found.get(k) != wanted[k])
    return ConfigError(f"{folder}: the teacher cache does not match this run ({diffs}); it was built from other "
                       f"data or another teacher. Delete the folder to rebuild it.")


class CachedTeacher(Teacher):
    """Reads a complete teacher cache (memory-mapped); checks it against the training data's
    fingerprint, the student's vocabulary and the temperature."""

    def __init__(self, folder: str | Path, fingerprint: str, student_vocab_size: int, temperature: float):
        self.folder = Path(folder)
        if not (self.folder / "meta.json").exists():
            raise ConfigError(f"{self.folder}: no teacher cache here")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        if self.meta["vocab_size"] != student_vocab_size:
            raise ConfigError(f"{self.folder}: the cached teacher's vocabulary has {self.meta['vocab_size']} tokens, "
                              f"the student's {student_vocab_size}; LSSD needs the same vocabulary")
        wanted = {"fingerprint": fingerprint, "temperature": temperature}
        if any(self.meta[k] != v for k, v in wanted.items()):
            raise _mismatch(self.folder, self.meta, wanted)
        done = json.loads((self.folder / "progress.json").read_text())["blocks_done"]
        if done < self.meta["n_blocks"]:
            raise ConfigError(f"{self.folder}: the teacher cache is incomplete ({done}/{self.meta['n_blocks']} blocks)")
        self.ids = np.load(self.folder / "ids.npy", mmap_mode="r")  # [n_blocks, P, k]
        self.logprobs = np.load(self.folder / "logprobs.npy", mmap_mode="r")  # [n_blocks, P, k]
        self.tail = np.load(self.folder / "tail.npy", mmap_mode="r")  # [n_blocks, P]

    @property
    def bytes_per_token(self) -> int:
        return int(self.ids[0, 0].nbytes + self.logprobs[0, 0].nbytes + self.tail[0, :1].nbytes)

    def lssd(self, model, inputs, student_logits, labels, temperature, chunk_size):
        rows = inputs["block_index"].cpu().numpy()
        device = student_logits.device
        ids = torch.from_numpy(self.ids[rows]).to(device)  # [B, T-1, k]
        logprobs = torch.from_numpy(self.logprobs[rows]).to(device)  # [B, T-1, k]
        tail = torch.from_numpy(self.tail[rows]).to(device)  # [B, T-1]
        loss = lssd_loss_topk(student_logits, ids, logprobs, tail, labels, temperature, IGNORE_INDEX, chunk_size)
        top1_matches = ((ids[..., 0] == labels) & (labels != IGNORE_INDEX)).sum()
        return loss, top1_matches


def build_teacher_cache(model: torch.nn.Module, blocks: PackedBlocks, folder: str | Path, top_k: int,
                        temperature: float, batch_size: int = 8, dtype: str = "float16") -> CachedTeacher:
    """Compute the teacher's top-k log-probabilities over every block of `blocks` into `folder`
    (layout in the module docstring) and return the `CachedTeacher` reading it.

    Runs `model` without grad on its current device, `batch_size` blocks at a time, with a
    progress bar. Resumes a partial cache built for the same key; an existing cache with another
    key (other data, other teacher weights, k, T or dtype) is a `ConfigError`. k is capped at V.
    """
    folder = Path(folder)
    n_blocks, positions = len(blocks), blocks.block_size - 1
    k = min(top_k, vocab_size(model))
    key = {"fingerprint": blocks.meta["fingerprint"], "teacher_hash": teacher_weights_hash(model),
           "vocab_size": vocab_size(model), "top_k": k, "temperature": temperature, "dtype": dtype,
           "n_blocks": n_blocks, "block_size": blocks.block_size}
    if (folder / "meta.json").exists():
        found = json.loads((folder / "meta.json").read_text())
        if found != key:
            raise _mismatch(folder, found, key)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        shapes = {"ids.npy": (np.int32, (n_blocks, positions, k)), "logprobs.npy": (dtype, (n_blocks, positions, k)),
                  "tail.npy": (np.float32, (n_blocks, positions))}
        for name, (np_dtype, shape) in shapes.items():
            np.lib.format.open_memmap(folder / name, mode="w+", dtype=np_dtype, shape=shape).flush()
        write_json_atomic(folder / "progress.json", {"blocks_done": 0})
        write_json_atomic(folder / "meta.json", key)  # last: a cache with meta.json has all its files

    ids = np.load(folder / "ids.npy", mmap_mode="r+")
    logprobs = np.load(folder / "logprobs.npy", mmap_mode="r+")
    tail = np.load(folder / "tail.npy", mmap_mode="r+")
    done = json.loads((folder / "progress.json").read_text())["blocks_done"]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with tqdm(total=n_blocks, initial=done, desc="teacher cache", unit="block") as bar, torch.no_grad():
        for start in range(done, n_blocks, batch_size):
            batch = [blocks[i] for i in range(start, min(start + batch_size, n_blocks))]
            inputs = {name: torch.stack([b[name] for b in batch]).to(device) for name in ("input_ids", "position_ids")}
            logits = _forward_logits(model, inputs)[:, :-1]  # [b, P, V]
            log_q = torch.log_softmax(logits.float() / temperature, dim=-1)  # [b, P, V]
            top_logq, top_ids = log_q.topk(k, dim=-1)  # [b, P, k], most likely first
            tail_logq = log_q.scatter(-1, top_ids, float("-inf")).logsumexp(-1)  # [b, P]
            rows = slice(start, start + len(batch))
            ids[rows] = top_ids.cpu().numpy()
            logprobs[rows] = top_logq.cpu().numpy()
            tail[rows] = tail_logq.cpu().numpy()
            for array in (ids, logprobs, tail):
                array.flush()
            write_json_atomic(folder / "progress.json", {"blocks_done": start + len(batch)})
            bar.update(len(batch))
    model.train(was_training)
    return CachedTeacher(folder, blocks.meta["fingerprint"], vocab_size(model), temperature)


def make_teacher(cpt: CPTConfig, model: torch.nn.Module, blocks: PackedBlocks, cache_folder: Path,
                 batch_size: int = 8) -> Teacher:
    """The teacher `cpt.teacher` names, for the student `model` (PEFT-wrapped when it is `lora`)
    before any training step. `cache` builds (or resumes, or checks) the cache in `cache_folder`
    from `blocks` first."""
    if cpt.teacher == "online":
        return OnlineTeacher(model, vocab_size(model))
    if cpt.teacher == "lora":
        return LoraTeacher(model)
    return build_teacher_cache(model, blocks, cache_folder, cpt.cache_top_k, cpt.temperature, batch_size,
                               cpt.cache_dtype)
