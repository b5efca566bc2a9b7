"""Packed token blocks on disk and the torch Dataset that serves them.

A packed stream folder holds
    input_ids.npy     int32 [n_blocks, block_size]  documents joined with EOS, cut into blocks
    position_ids.npy  int32 [n_blocks, block_size]  restart at 0 at every document start
    meta.json         {"n_blocks", "block_size", "n_tokens", "pad_token_id", "fingerprint"}
Only the tail of the last block is padding (flat index >= n_tokens); its labels are -100.
Position ids that restart per document, with no attention mask and no KV cache, make transformers
build a block-diagonal causal mask (masking_utils.find_packed_sequence_indices), so tokens do not
attend across document boundaries in models that support it (Llama, Qwen, Mistral, ...); the
training and teacher forwards pass exactly that (`mixcpt.train.forward.packed_forward_inputs`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100


class PackedBlocks(Dataset):
    """Memory-mapped blocks of a packed stream: items are dicts of input_ids, position_ids,
    labels."""

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
        labels = ids.clone()
        n_real = self.n_tokens - i * self.block_size  # > block_size except in the last block
        if n_real < self.block_size:
            labels[max(n_real, 0) :] = IGNORE_INDEX
        return {
            "input_ids": ids,
            "position_ids": torch.from_numpy(np.array(self.position_ids[i], dtype=np.int64)),
            "labels": labels,
        }


class IndexedBlocks(PackedBlocks):
    """`PackedBlocks` whose items also carry `block_index`, the block's row in the teacher cache."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "block_index": i}


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
    meta = {
        "n_blocks": int(blocks.shape[0]),
        "block_size": int(blocks.shape[1]),
        "n_tokens": int(n_tokens),
        "pad_token_id": int(pad_token_id),
        "fingerprint": fingerprint,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
