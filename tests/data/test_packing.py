"""Packed blocks as the trainers read them: which positions are targets."""

from __future__ import annotations

import numpy as np

from mixcpt.data.packing import IGNORE_INDEX, PackedBlocks, write_packed
from mixcpt.losses import next_token_labels

EOS = 2


def test_no_document_end_is_trained_to_predict_the_next_document(tmp_path):
    # one block: document A (5 tokens, EOS last), document B (4 tokens, EOS last), 3 of padding
    a, b = [1, 10, 11, 12, EOS], [1, 20, 21, EOS]
    ids = np.array([a + b + [0, 0, 0]])
    positions = np.array([[*range(5), *range(4), *range(3)]])
    write_packed(tmp_path / "p", ids, positions, n_tokens=9, pad_token_id=0, fingerprint="x")
    item = PackedBlocks(tmp_path / "p")[0]

    targets = next_token_labels(item["labels"][None])[0]  # the target of each position
    supervised = (targets != IGNORE_INDEX).nonzero().flatten().tolist()
    # within A: 0..3 predict 1..4; within B: 5..7 predict 6..8; A's EOS (4) predicts nothing
    assert supervised == [0, 1, 2, 3, 5, 6, 7]
    assert all(item["input_ids"][t] != EOS for t in supervised)
    assert targets[supervised].tolist() == a[1:] + b[1:]
