"""Packed token blocks on disk and the torch Dataset that serves them.

A packed stream folder holds
    input_ids.npy     int32 [n_blocks, block_size]  documents joined with EOS, cut into blocks
    position_ids.npy  int32 [n_blocks, block_size]  restart at 0 at every document start
    meta.json         {"n_blocks", "block_size", "n_tokens", "pad_token_id", "fingerprint"}
Only the tail of the last block is padding (flat index >= n_tokens); its labels are -100.
The first token of every document is not a target either (its label is -100, `PackedBlocks`):
otherwise the previous document's EOS would be trained to predict it, a pairing that only the
packing order made. Every loss of every packed stream (CE and LSSD, online or cached teacher)
reads these labels, so none trains that prediction; the teacher cache stores every position and
simply goes unused at these.
Position ids that restart per document, with no attention mask and no KV cache, make transformers
build a block-diagonal causal mask (masking_utils.find_packed_sequence_indices), so tokens do not
attend across document boundaries in models that support it (Llama, Qwen, Mistral, ...); the
training and teacher forwards pass exactly that (`mixcpt.train.forward.packed_forward_inputs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mixcpt.atomic import preallocate

IGNORE_INDEX = -100


class PackedBlocks(Dataset):
    """Memory-mapped blocks of a packed stream: items are dicts of input_ids, position_ids,
    labels [block_size] int64.

    labels are the input ids (unshifted: the trainer shifts them), IGNORE_INDEX on padding and
    wherever the position id is 0: a document's first token, which the previous document's EOS
    must not learn to predict (at a block's first position a 0 changes nothing, as no position
    of the block predicts that token)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.meta = json.loads((folder / "meta.json").read_text())
        self.input_ids = np.load(folder / "input_ids.npy", mmap_mode="r")
        self.position_ids = np.load(folder / "position_ids.npy", mmap_mode="r")
        self.block_size = int(self.meta["block_size"])
        self.n_tokens = int(self.meta["n_tokens"])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.array(self.input_ids[i], dtype=np.int64))
        positions = torch.from_numpy(np.array(self.position_ids[i], dtype=np.int64))
        labels = ids.masked_fill(positions == 0, IGNORE_INDEX)
        n_real = self.n_tokens - i * self.block_size  # > block_size except in the last block
        if n_real < self.block_size:
            labels[max(n_real, 0) :] = IGNORE_INDEX
        return {"input_ids": ids, "position_ids": positions, "labels": labels}


class IndexedBlocks(PackedBlocks):
    """`PackedBlocks` whose items also carry `block_index`, the block's row in the teacher cache."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "block_index": i}


@dataclass
class TokenizedSource:
    """One source after the data stage's pass 1: its tokens on disk (int32, documents one after
    the other, each ending in EOS) and the length of each document."""

    group: str
    label: str
    weight: float
    tokens_path: Path
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # rendered samples, one JSON row per document (instructions, preferences)
    pool_path: Path | None = None

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def tokens(self) -> np.ndarray:
        return np.memmap(self.tokens_path, dtype=np.int32, mode="r")


def pack_documents(
    order: np.ndarray,
    sources: list[TokenizedSource],
    block_size: int,
    pad_id: int,
    folder: Path,
    fingerprint: str,
    desc: str,
) -> dict:
    """Write the documents of `order` ([n, 2] rows of (source index, document index)) into
    fixed-length blocks in `folder`, in the layout `PackedBlocks` reads.

    Position ids restart at every document start and every block start; the tail of the last
    block is padding. Returns {"n_tokens", "n_blocks", "padding_share"}.
    """
    lengths = np.asarray([sources[s].lengths[d] for s, d in order], dtype=np.int64)
    n_tokens = int(lengths.sum())
    n_blocks = max(1, -(-n_tokens // block_size))
    folder.mkdir(parents=True)
    ids = open_memmap(
        folder / "input_ids.npy", mode="w+", dtype=np.int32, shape=(n_blocks, block_size)
    )
    pos = open_memmap(
        folder / "position_ids.npy", mode="w+", dtype=np.int32, shape=(n_blocks, block_size)
    )
    for name in ("input_ids.npy", "position_ids.npy"):
        preallocate(folder / name)  # a full disk: ENOSPC now, not SIGBUS while filling the maps
    flat_ids, flat_pos = ids.reshape(-1), pos.reshape(-1)
    token_maps = [s.tokens() for s in sources]
    offsets = [s.offsets for s in sources]
    cursor = 0
    for (s, d), n in tqdm(
        zip(order, lengths), total=len(order), desc=desc, unit="doc", leave=False
    ):
        start = offsets[s][d]
        flat_ids[cursor : cursor + n] = token_maps[s][start : start + n]
        idx = np.arange(cursor, cursor + n)
        # the position restarts at this document's start or at the start of the block, whichever
        # is later
        flat_pos[cursor : cursor + n] = idx - np.maximum(cursor, idx - idx % block_size)
        cursor += n
    flat_ids[cursor:] = pad_id
    flat_pos[cursor:] = np.arange(flat_pos.size - cursor)
    ids.flush(), pos.flush()
    _write_meta(folder, n_blocks, block_size, n_tokens, pad_id, fingerprint)
    return {
        "n_tokens": n_tokens,
        "n_blocks": n_blocks,
        "padding_share": 1 - n_tokens / (n_blocks * block_size),
    }


def write_packed(
    folder: Path,
    blocks: np.ndarray,
    positions: np.ndarray,
    n_tokens: int,
    pad_token_id: int,
    fingerprint: str,
) -> None:
    """Save a packed stream in the layout `PackedBlocks` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "input_ids.npy", blocks.astype(np.int32, copy=False))
    np.save(folder / "position_ids.npy", positions.astype(np.int32, copy=False))
    _write_meta(folder, *blocks.shape, n_tokens, pad_token_id, fingerprint)


def _write_meta(
    folder: Path, n_blocks: int, block_size: int, n_tokens: int, pad_id: int, fingerprint: str
) -> None:
    meta = {
        "n_blocks": int(n_blocks),
        "block_size": int(block_size),
        "n_tokens": int(n_tokens),
        "pad_token_id": int(pad_id),
        "fingerprint": fingerprint,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
