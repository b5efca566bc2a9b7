"""The `cache` teacher (design §6, §9): the teacher's top-k log-probabilities over the packed
D_MIX, computed once and memory-mapped, so stage 1 carries no teacher model at all.

Layout (`RunDir.root / "teacher_cache"`), per block and shifted position t (the prediction of
token t + 1), P = block_size - 1:
    ids.npy       int32        [n_blocks, P, k]  the teacher's top-k tokens, most likely first
    logprobs.npy  float16/32   [n_blocks, P, k]  their log-probabilities at temperature T
    tail.npy      float32      [n_blocks, P]     log of the remaining mass (-inf when k = V)
    meta.json     what the cache is keyed on (`cache_key`): the packed data's fingerprint, a hash
                  of the teacher's weights, k, T, dtype, vocabulary and shapes
    done.npy      uint8        [n_blocks]        1 where a block's rows are on disk: a build
                  resumes from the others after an interruption, with any number of processes
The objective's correction (LSSD's swap, MFT's mixture) is applied at training time, from the
labels (`targets.TeacherTopK`), so nothing about the label has to be stored and one cache serves
every objective. With k < V the loss is the bucketed KL documented in
`targets.TeacherTopK`; with k = V it is exact.

Under a launch (torchrun, accelerate launch) every process builds its share of the blocks into
the same files (`build_teacher_cache`), so the build takes 1/N of the time on N GPUs and no
process waits at a barrier while another builds the whole cache. The run folder must then be on a
filesystem every process writes coherently (a node's own disk, Lustre, GPFS; not NFS).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mixcpt.atomic import lack_of_space, preallocate, write_json_atomic
from mixcpt.data.packing import PackedBlocks
from mixcpt.errors import ConfigError, DiskFullError
from mixcpt.models import vocab_size
from mixcpt.processes import process_state
from mixcpt.train import lssd_cpu_kernel
from mixcpt.train.forward import LossForward
from mixcpt.train.targets import TeacherTopK
from mixcpt.train.teachers import Teacher

CACHE_FILES = ("ids.npy", "logprobs.npy", "tail.npy")
DONE_FILE = "done.npy"
# The cache is made durable (the maps synced, then done.npy) at most this often while it is
# built, and at the end: a sync waits ~20 ms on the disk, which after every batch of a small
# teacher cost a fifth of the build; an interrupted build redoes at most this many seconds of work.
SYNC_SECONDS = 30.0


def teacher_weights_hash(model: torch.nn.Module) -> str:
    """blake2b of every tensor of the model's state dict (name, dtype, shape and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _differences(found: dict, wanted: dict) -> str:
    return ", ".join(
        f"{k}: cache {found.get(k)!r} vs now {wanted[k]!r}"
        for k in wanted
        if found.get(k) != wanted[k]
    )


def _mismatch(folder: Path, found: dict, wanted: dict) -> ConfigError:
    return ConfigError(
        f"{folder}: the teacher cache does not match this run ({_differences(found, wanted)}); "
        f"it was built from other data or another teacher. Delete the folder to rebuild it."
    )


class CachedTeacher(Teacher):
    """Reads a complete teacher cache (memory-mapped); checks it against the training data's
    fingerprint, the student's vocabulary and the temperature."""

    def __init__(
        self, folder: str | Path, fingerprint: str, student_vocab_size: int, temperature: float
    ):
        self.folder = Path(folder)
        if not (self.folder / "meta.json").exists():
            raise ConfigError(f"{self.folder}: no teacher cache here")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        if self.meta["vocab_size"] != student_vocab_size:
            raise ConfigError(
                f"{self.folder}: the cached teacher's vocabulary has "
                f"{self.meta['vocab_size']} tokens, the student's {student_vocab_size}; "
                "LSSD needs the same vocabulary"
            )
        wanted = {"fingerprint": fingerprint, "temperature": temperature}
        if any(self.meta[k] != v for k, v in wanted.items()):
            raise _mismatch(self.folder, self.meta, wanted)
        done = int(done_blocks(self.folder).sum())
        if done < self.meta["n_blocks"]:
            raise ConfigError(
                f"{self.folder}: the teacher cache is incomplete "
                f"({done}/{self.meta['n_blocks']} blocks)"
            )
        self.ids = np.load(self.folder / "ids.npy", mmap_mode="r")  # [n_blocks, P, k]
        self.logprobs = np.load(self.folder / "logprobs.npy", mmap_mode="r")  # [n_blocks, P, k]
        self.tail = np.load(self.folder / "tail.npy", mmap_mode="r")  # [n_blocks, P]

    @property
    def bytes_per_token(self) -> int:
        """Bytes the cache holds per training token: k ids, k log-probabilities and the tail."""
        return int(self.ids[0, 0].nbytes + self.logprobs[0, 0].nbytes + self.tail[0, :1].nbytes)

    def target(self, inputs):
        rows = inputs["block_index"].cpu().numpy()
        device = inputs["input_ids"].device

        def load(array: np.ndarray) -> torch.Tensor:
            # [B, P, ...] -> [B, P + 1, ...]: the last position predicts nothing
            x = torch.from_numpy(array[rows]).to(device)
            return torch.cat([x, x[:, -1:]], dim=1)

        return TeacherTopK(load(self.ids), load(self.logprobs), load(self.tail))


def top_k_logprobs(
    rows: torch.Tensor,
    weight: torch.Tensor | None,
    k: int,
    temperature: float,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k at temperature T, a chunk of positions at a time, so only one chunk's
    float32 [chunk, V] logits exist (at 128k vocabulary and 8 x 4k positions the whole batch's
    would be 16 GB per copy).

    rows: hidden states [N, H] with the output layer's `weight` [V, H], or logits [N, V] with None.
    Returns (log-probabilities [N, k] most likely first, their ids [N, k], the log of the remaining
    mass [N], -inf when k = V), float32 and int64. On the CPU (float32, k < V) the fused kernel
    `lssd_cpu_kernel.teacher_top_k` does the vocabulary-wide work; elsewhere eager PyTorch."""
    values, ids, tails = [], [], []
    for start in range(0, len(rows), chunk_size):
        x = rows[start : start + chunk_size]
        z = (x if weight is None else x @ weight.T).float()  # [c, V]
        z = z if temperature == 1 else z / temperature
        if lssd_cpu_kernel.top_k_applies(z, k):  # CPU: the fused kernel, three passes over a row
            for out, part in zip((values, ids, tails), lssd_cpu_kernel.teacher_top_k(z, k)):
                out.append(part)
            continue
        lse = z.logsumexp(-1)  # [c]
        top_z, top_ids = z.topk(k, dim=-1)  # [c, k]
        values.append(top_z - lse.unsqueeze(-1))
        ids.append(top_ids)
        # exact, even when it is tiny
        tails.append(z.scatter(-1, top_ids, float("-inf")).logsumexp(-1) - lse)
    return torch.cat(values), torch.cat(ids), torch.cat(tails)


def cache_key(
    model: torch.nn.Module, blocks: PackedBlocks, top_k: int, temperature: float, dtype: str
) -> dict:
    """What a cache is valid for: the packed data, the teacher's weights, k (capped at V), T,
    the storage dtype and the shapes. A cache built for another key is refused, never mixed."""
    return {
        "fingerprint": blocks.meta["fingerprint"],
        "teacher_hash": teacher_weights_hash(model),
        "vocab_size": vocab_size(model),
        "top_k": min(top_k, vocab_size(model)),
        "temperature": temperature,
        "dtype": dtype,
        "n_blocks": len(blocks),
        "block_size": blocks.block_size,
    }


def cache_layout(n_blocks: int, block_size: int, top_k: int, dtype: str) -> dict:
    """The cache's arrays (the module docstring): file name -> (numpy dtype, shape), for
    `n_blocks` blocks of `block_size` tokens, `top_k` (already capped at V) entries per position
    and log-probabilities stored as `dtype`. `mixcpt plan` sizes the cache with it."""
    positions = block_size - 1  # the last token of a block predicts nothing
    return {
        "ids.npy": (np.int32, (n_blocks, positions, top_k)),
        "logprobs.npy": (dtype, (n_blocks, positions, top_k)),
        "tail.npy": (np.float32, (n_blocks, positions)),
    }


def done_blocks(folder: Path) -> np.ndarray:
    """`folder`'s done.npy (uint8 [n_blocks], 1 where a block is on disk), memory-mapped for
    writing. A cache built before done.npy existed recorded a prefix in progress.json instead:
    done.npy is made from it."""
    if not (folder / DONE_FILE).exists():
        n_blocks = json.loads((folder / "meta.json").read_text())["n_blocks"]
        done = np.zeros(n_blocks, dtype=np.uint8)
        done[: json.loads((folder / "progress.json").read_text())["blocks_done"]] = 1
        np.save(folder / "done.tmp.npy", done)
        (folder / "done.tmp.npy").replace(folder / DONE_FILE)
    return np.load(folder / DONE_FILE, mmap_mode="r+")


def open_cache_files(folder: Path, key: dict, replace_stale: bool = False) -> None:
    """Create the cache's empty files for `key` in `folder`, or check that the cache already
    there was built for `key` (it then resumes); one built for another key is a `ConfigError`,
    or with `replace_stale` deleted and started afresh."""
    if (folder / "meta.json").exists():
        found = json.loads((folder / "meta.json").read_text())
        if found == key:
            done_blocks(folder)  # a cache from before done.npy gets one
            return
        if not replace_stale:
            raise _mismatch(folder, found, key)
        print(f"mixcpt: teacher cache: rebuilding ({_differences(found, key)})", flush=True)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = cache_layout(key["n_blocks"], key["block_size"], key["top_k"], key["dtype"])
    shapes[DONE_FILE] = (np.uint8, (key["n_blocks"],))
    for name, (np_dtype, shape) in shapes.items():
        np.lib.format.open_memmap(folder / name, mode="w+", dtype=np_dtype, shape=shape).flush()
    try:  # a full disk: ENOSPC now, not SIGBUS while filling the maps
        for name in shapes:
            preallocate(folder / name)
    except OSError as err:
        if not lack_of_space(err, folder):
            raise
        size = sum(np.dtype(t).itemsize * int(np.prod(shape)) for t, shape in shapes.values())
        raise DiskFullError(folder, size, "the teacher cache") from err
    write_json_atomic(folder / "meta.json", key)  # last: a cache with meta.json has all its files


def build_teacher_cache(
    model: torch.nn.Module,
    blocks: PackedBlocks,
    folder: str | Path,
    top_k: int,
    temperature: float,
    batch_size: int = 8,
    dtype: str = "float16",
    chunk_size: int = 256,
    replace_stale: bool = False,
) -> CachedTeacher:
    """Compute the teacher's top-k log-probabilities over every block of `blocks` into `folder`
    (layout in the module docstring) and return the `CachedTeacher` reading it.

    Runs `model` without grad on its current device, a batch of `batch_size` blocks at a time
    (batches start at multiples of it), with a progress bar; the output layer is applied
    `chunk_size` positions at a time (`top_k_logprobs`). Under a launch the batches still to do
    are cut into one contiguous run per process, each process computes its own, and all meet
    only when every share is done: the same batches as one process, so the same bytes. The main
    process creates the files first. Progress is made durable every `SYNC_SECONDS` and at the
    end. Resumes a partial cache built for the same key (with any number of processes); an
    existing cache with another key (other data, other teacher weights, k, T or dtype) is a
    `ConfigError`, or with `replace_stale` (the cpt stage, which owns the run's cache) rebuilt.
    k is capped at V.
    """
    folder = Path(folder)
    state = process_state()
    key = cache_key(model, blocks, top_k, temperature, dtype)
    if state.is_main_process:
        open_cache_files(folder, key, replace_stale)
    state.wait_for_everyone()
    found = json.loads((folder / "meta.json").read_text())
    if found != key:  # each process hashed its own copy of the teacher
        raise _mismatch(folder, found, key)
    arrays = [np.load(folder / name, mmap_mode="r+") for name in CACHE_FILES]  # ids, logprobs, tail
    done = done_blocks(folder)
    n = len(blocks)
    todo = [
        range(s, min(s + batch_size, n))
        for s in range(0, n, batch_size)
        if not done[s : s + batch_size].all()
    ]
    shares = np.array_split(np.arange(len(todo)), state.num_processes)
    mine = [todo[i] for i in shares[state.process_index]]
    was_training = model.training
    model.eval()
    forward = LossForward(model)
    several = state.num_processes > 1
    where = f" (process {state.process_index} of {state.num_processes})" if several else ""
    bar = tqdm(total=sum(map(len, mine)), desc=f"teacher cache{where}", unit="block")
    written, synced = [], time.monotonic()
    with bar, torch.no_grad():
        for i, rows in enumerate(mine):
            top_logq, top_ids, tail_logq = teacher_top_k(
                model, forward, blocks, rows, key, chunk_size
            )
            for array, values in zip(arrays, (top_ids, top_logq, tail_logq)):
                array[rows.start : rows.stop] = values.cpu().numpy()
            written.append(rows)
            if i == len(mine) - 1 or time.monotonic() - synced >= SYNC_SECONDS:
                for array in arrays:  # on disk before done.npy says so
                    array.flush()
                for r in written:
                    done[r.start : r.stop] = 1
                done.flush()
                written, synced = [], time.monotonic()
            bar.update(len(rows))
    model.train(was_training)
    state.wait_for_everyone()  # every share on disk before anyone reads the cache
    return CachedTeacher(folder, key["fingerprint"], key["vocab_size"], temperature)


def teacher_top_k(
    model: torch.nn.Module,
    forward: LossForward,
    blocks: PackedBlocks,
    rows: range,
    key: dict,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k over blocks `rows`: (log-probabilities [b, P, k], ids [b, P, k], log
    tail mass [b, P]), P = block_size - 1 predicted positions per block."""
    device = next(model.parameters()).device
    batch = [blocks[i] for i in rows]
    inputs = {
        name: torch.stack([b[name] for b in batch]).to(device)
        for name in ("input_ids", "position_ids")
    }
    teacher_rows, weight, _ = forward(model, inputs)  # [b, P + 1, H] and [V, H], or logits
    # [b * P, k], [b * P, k], [b * P]
    top_logq, top_ids, tail_logq = top_k_logprobs(
        teacher_rows[:, :-1].flatten(0, 1), weight, key["top_k"], key["temperature"], chunk_size
    )
    shape = (len(batch), key["block_size"] - 1)
    return top_logq.view(*shape, -1), top_ids.view(*shape, -1), tail_logq.view(shape)
