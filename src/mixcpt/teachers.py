"""Where the LSSD teacher's logits come from (design §6).

The teacher is the model as it was before stage 1. Three sources, one interface
(`Teacher.target`), chosen by `cpt.teacher`:

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
`losses.SwappedTopK`; with k = V it is exact.
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
from mixcpt.data.packing import PackedBlocks
from mixcpt.errors import ConfigError
from mixcpt.losses import SwappedTeacher, SwappedTopK
from mixcpt.rundir import write_json_atomic


class IndexedBlocks(PackedBlocks):
    """`PackedBlocks` whose items also carry `block_index`, the block's row in the teacher cache."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "block_index": i}


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output layer (what its logits' last dimension will be)."""
    return int(model.get_output_embeddings().weight.shape[0])


def packed_forward_inputs(inputs: dict[str, torch.Tensor]) -> dict:
    """The forward arguments of a packed batch: input ids and position ids, no attention mask (position
    ids restart per document, so transformers masks block-diagonally), and no KV cache, without which
    transformers skips that packed-sequence detection whatever `config.use_cache` says (with a cache,
    documents in a block would attend to each other)."""
    return {
        "input_ids": inputs["input_ids"],
        "position_ids": inputs["position_ids"],
        "use_cache": False,
    }


class LossForward:
    """Runs a causal LM on a packed batch for a vocabulary-wide loss, from its final hidden states
    when that is exact, so its [B, T, V] logits are never made.

    `model` is what the forward goes through (for the student, the DDP-wrapped module, so gradients
    sync); `unwrapped` is the bare model. The hidden path is taken when its output layer is a
    bias-free `nn.Linear` with no softcap, and is checked on the first batch: the model's own logits
    at the last position must be that layer applied to `hidden_states[-1]` (a scale after the
    output layer, or a model ignoring `logits_to_keep`, fails it). Otherwise, or with
    `hidden=False` (FSDP/DeepSpeed shard the weight outside forward), logits are used.
    """

    def __init__(self, unwrapped: torch.nn.Module, hidden: bool = True):
        head = unwrapped.get_output_embeddings()
        plain = type(head) is torch.nn.Linear and head.bias is None
        softcap = getattr(getattr(unwrapped, "config", None), "final_logit_softcapping", None)
        self.head = head if hidden and plain and not softcap else None
        self.checked = False

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
        """Returns (rows, output weight or None, model outputs): rows are hidden states [B, T, H] with
        the weight [V, H], or logits [B, T, V] with None."""
        batch = packed_forward_inputs(inputs)
        if self.head is not None:
            outputs = model(**batch, output_hidden_states=True, logits_to_keep=1)
            hidden = outputs.hidden_states[-1]  # [B, T, H] the output layer's input
            if self.checked or self._exact(hidden, outputs.logits):
                self.checked = True
                return hidden, self.head.weight, outputs
            self.head = None
        outputs = model(**batch)
        return outputs.logits, None, outputs

    def _exact(self, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
        with torch.no_grad():
            mine = self.head(hidden[:, -1:]).float()  # [B, 1, V]
        logits = logits.float()
        # loose enough for bf16 autocast, tight enough for any real scale of the logits
        return mine.shape == logits.shape and torch.allclose(
            mine, logits, rtol=1e-2, atol=1e-2 * logits.abs().max().item()
        )


class Teacher:
    """A source of LSSD targets."""

    def target(self, inputs: dict[str, torch.Tensor]) -> SwappedTeacher | SwappedTopK:
        """The LSSD target of a batch (`inputs` as the dataset gives them, on the student's device):
        position t holds the teacher's prediction of token t + 1, as the student's rows do."""
        raise NotImplementedError


class OnlineTeacher(Teacher):
    """A frozen deep copy of `teacher_model` (eval mode, no grad), moved to the student's device on
    first use. It is not part of the trained model, so DDP/FSDP never wrap it. Its logits are made
    a chunk at a time inside the loss, in its own dtype (from its hidden states, see `LossForward`)."""

    def __init__(self, teacher_model: torch.nn.Module, student_vocab_size: int):
        if vocab_size(teacher_model) != student_vocab_size:
            raise ConfigError(
                f"cpt.teacher: the teacher's vocabulary has {vocab_size(teacher_model)} tokens, "
                f"the student's {student_vocab_size}; LSSD needs the same vocabulary"
            )
        self.model = copy.deepcopy(teacher_model).eval().requires_grad_(False)
        self.forward = LossForward(self.model)

    def target(self, inputs):
        self.model.to(inputs["input_ids"].device)  # a no-op after the first batch
        with torch.no_grad():
            rows, weight, _ = self.forward(self.model, inputs)
        return SwappedTeacher(rows, weight)


class LoraTeacher(Teacher):
    """The PEFT-wrapped student with its adapters disabled: exactly the frozen base model."""

    def __init__(self, peft_model: torch.nn.Module):
        if not hasattr(peft_model, "disable_adapter"):
            raise ConfigError("cpt.teacher: lora needs the student wrapped with PEFT LoRA adapters")
        self.peft_model = peft_model
        # An adapted output layer is not a plain nn.Linear: then the teacher gives logits.
        self.forward = LossForward(peft_model)

    def target(self, inputs):
        # The adapter layers are toggled on the tuner (`base_model`) directly: PeftModel.disable_adapter()
        # would also walk every parameter (get_model_status) on each step, for a warning only.
        tuner = self.peft_model.base_model
        # The unwrapped PEFT model, not the DDP wrapper: no gradient flows, no sync needed.
        with torch.no_grad():
            tuner.disable_adapter_layers()
            try:
                rows, weight, _ = self.forward(self.peft_model, inputs)
            finally:
                tuner.enable_adapter_layers()
        return SwappedTeacher(rows, weight)


# ---- cache ---------------------------------------------------------------------------------
def teacher_weights_hash(model: torch.nn.Module) -> str:
    """blake2b of every tensor of the model's state dict (name, dtype, shape and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _mismatch(folder: Path, found: dict, wanted: dict) -> ConfigError:
    diffs = ", ".join(
        f"{k}: cache {found.get(k)!r} vs now {wanted[k]!r}"
        for k in wanted
        if found.get(k) != wanted[k]
    )
    return ConfigError(
        f"{folder}: the teacher cache does not match this run ({diffs}); it was built from other "
        f"data or another teacher. Delete the folder to rebuild it."
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
                f"{self.folder}: the cached teacher's vocabulary has {self.meta['vocab_size']} tokens, "
                f"the student's {student_vocab_size}; LSSD needs the same vocabulary"
            )
        wanted = {"fingerprint": fingerprint, "temperature": temperature}
        if any(self.meta[k] != v for k, v in wanted.items()):
            raise _mismatch(self.folder, self.meta, wanted)
        done = json.loads((self.folder / "progress.json").read_text())["blocks_done"]
        if done < self.meta["n_blocks"]:
            raise ConfigError(
                f"{self.folder}: the teacher cache is incomplete ({done}/{self.meta['n_blocks']} blocks)"
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

        def load(
            array: np.ndarray,
        ) -> torch.Tensor:  # [B, P, ...] -> [B, P + 1, ...]: the last position predicts nothing
            x = torch.from_numpy(array[rows]).to(device)
            return torch.cat([x, x[:, -1:]], dim=1)

        return SwappedTopK(load(self.ids), load(self.logprobs), load(self.tail))


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
    mass [N], -inf when k = V), float32 and int64."""
    values, ids, tails = [], [], []
    for start in range(0, len(rows), chunk_size):
        x = rows[start : start + chunk_size]
        z = (x if weight is None else x @ weight.T).float()  # [c, V]
        z = z if temperature == 1 else z / temperature
        lse = z.logsumexp(-1)  # [c]
        top_z, top_ids = z.topk(k, dim=-1)  # [c, k]
        values.append(top_z - lse.unsqueeze(-1))
        ids.append(top_ids)
        tails.append(
            z.scatter(-1, top_ids, float("-inf")).logsumexp(-1) - lse
        )  # exact, even when it is tiny
    return torch.cat(values), torch.cat(ids), torch.cat(tails)


def build_teacher_cache(
    model: torch.nn.Module,
    blocks: PackedBlocks,
    folder: str | Path,
    top_k: int,
    temperature: float,
    batch_size: int = 8,
    dtype: str = "float16",
    chunk_size: int = 256,
) -> CachedTeacher:
    """Compute the teacher's top-k log-probabilities over every block of `blocks` into `folder`
    (layout in the module docstring) and return the `CachedTeacher` reading it.

    Runs `model` without grad on its current device, `batch_size` blocks at a time, with a
    progress bar; the output layer is applied `chunk_size` positions at a time (`top_k_logprobs`).
    Resumes a partial cache built for the same key; an existing cache with another key (other
    data, other teacher weights, k, T or dtype) is a `ConfigError`. k is capped at V.
    """
    folder = Path(folder)
    n_blocks, positions = len(blocks), blocks.block_size - 1
    k = min(top_k, vocab_size(model))
    key = {
        "fingerprint": blocks.meta["fingerprint"],
        "teacher_hash": teacher_weights_hash(model),
        "vocab_size": vocab_size(model),
        "top_k": k,
        "temperature": temperature,
        "dtype": dtype,
        "n_blocks": n_blocks,
        "block_size": blocks.block_size,
    }
    if (folder / "meta.json").exists():
        found = json.loads((folder / "meta.json").read_text())
        if found != key:
            raise _mismatch(folder, found, key)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        shapes = {
            "ids.npy": (np.int32, (n_blocks, positions, k)),
            "logprobs.npy": (dtype, (n_blocks, positions, k)),
            "tail.npy": (np.float32, (n_blocks, positions)),
        }
        for name, (np_dtype, shape) in shapes.items():
            np.lib.format.open_memmap(folder / name, mode="w+", dtype=np_dtype, shape=shape).flush()
        write_json_atomic(folder / "progress.json", {"blocks_done": 0})
        write_json_atomic(
            folder / "meta.json", key
        )  # last: a cache with meta.json has all its files

    ids = np.load(folder / "ids.npy", mmap_mode="r+")
    logprobs = np.load(folder / "logprobs.npy", mmap_mode="r+")
    tail = np.load(folder / "tail.npy", mmap_mode="r+")
    done = json.loads((folder / "progress.json").read_text())["blocks_done"]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    forward = LossForward(model)
    with (
        tqdm(total=n_blocks, initial=done, desc="teacher cache", unit="block") as bar,
        torch.no_grad(),
    ):
        for start in range(done, n_blocks, batch_size):
            batch = [blocks[i] for i in range(start, min(start + batch_size, n_blocks))]
            inputs = {
                name: torch.stack([b[name] for b in batch]).to(device)
                for name in ("input_ids", "position_ids")
            }
            teacher_rows, weight, _ = forward(
                model, inputs
            )  # [b, P + 1, H] and [V, H], or logits [b, P + 1, V]
            top_logq, top_ids, tail_logq = top_k_logprobs(
                teacher_rows[:, :-1].flatten(0, 1), weight, k, temperature, chunk_size
            )  # [b * P, k], [b * P, k], [b * P]
            rows = slice(start, start + len(batch))
            ids[rows] = top_ids.view(len(batch), positions, k).cpu().numpy()
            logprobs[rows] = top_logq.view(len(batch), positions, k).cpu().numpy()
            tail[rows] = tail_logq.view(len(batch), positions).cpu().numpy()
            for array in (ids, logprobs, tail):
                array.flush()
            write_json_atomic(folder / "progress.json", {"blocks_done": start + len(batch)})
            bar.update(len(batch))
    model.train(was_training)
    return CachedTeacher(folder, blocks.meta["fingerprint"], vocab_size(model), temperature)


def make_teacher(
    cpt: CPTConfig,
    model: torch.nn.Module,
    blocks: PackedBlocks,
    cache_folder: Path,
    batch_size: int = 8,
) -> Teacher:
    """The teacher `cpt.teacher` names, for the student `model` (PEFT-wrapped when it is `lora`)
    before any training step. `cache` builds (or resumes, or checks) the cache in `cache_folder`
    from `blocks` first."""
    if cpt.teacher == "online":
        return OnlineTeacher(model, vocab_size(model))
    if cpt.teacher == "lora":
        return LoraTeacher(model)
    return build_teacher_cache(
        model,
        blocks,
        cache_folder,
        cpt.cache_top_k,
        cpt.temperature,
        batch_size,
        cpt.cache_dtype,
        cpt.loss_chunk_size,
    )
