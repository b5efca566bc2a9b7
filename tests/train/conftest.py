"""A run folder as the data stage leaves it (packed D_MIX and D_K, a tiny base model), for stage-1
tests."""

from __future__ import annotations

import numpy as np
import pytest

from mixcpt.config import config_from_dict
from mixcpt.data.packing import PackedBlocks, write_packed
from mixcpt.rundir import RunDir
from mixcpt.train import lssd_cpu_kernel

DOMAIN = [
    f"The planet Zorbax {i} orbits the star Vega {i % 3}. Its moon is called Ixi {i}."
    for i in range(12)
]
GENERAL = [
    f"Alice was born in Paris in {1970 + i}. Bob works at Acme as an engineer number {i}."
    for i in range(12)
]
HELD_OUT = [
    "The quick brown fox jumps over the lazy dog. Alice was born in Paris.",
    "Question: what is two plus two? Answer: four. Bob works at Acme.",
]
BLOCK_SIZE = 32


def pack(tokenizer, texts, folder, fingerprint, block_size=BLOCK_SIZE) -> PackedBlocks:
    """Documents joined with EOS, positions restarting per document, cut into blocks (last one
    padded)."""
    ids, positions = [], []
    for text in texts:
        doc = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        ids += doc
        positions += range(len(doc))
    n_tokens = len(ids)
    n_blocks = -(-n_tokens // block_size)
    pad = n_blocks * block_size - n_tokens
    blocks = np.array(ids + [tokenizer.pad_token_id] * pad).reshape(n_blocks, block_size)
    pos = np.array(positions + [0] * pad).reshape(n_blocks, block_size)
    write_packed(folder, blocks, pos, n_tokens, tokenizer.pad_token_id, fingerprint)
    return PackedBlocks(folder)


@pytest.fixture
def cpt_run(tmp_path, tiny_tokenizer, tiny_model):
    """(make_config(**cpt_overrides), RunDir) with data/mix (domain + general), data/domain and
    base/."""
    run = RunDir(tmp_path / "run")
    pack(
        tiny_tokenizer,
        [t for pair in zip(DOMAIN, GENERAL) for t in pair],
        run.data / "mix",
        "mix-v1",
    )
    pack(tiny_tokenizer, DOMAIN, run.data / "domain", "domain-v1")
    tiny_model.save_pretrained(run.base)
    tiny_tokenizer.save_pretrained(run.base)
    (tmp_path / "domain.txt").write_text("\n".join(DOMAIN))

    def make_config(seed=0, **cpt):
        training = {
            "learning_rate": 3e-3,
            "max_steps": 4,
            "per_device_batch_size": 4,
            "logging_steps": 2,
            "save_steps": 2,
            "lr_scheduler": "constant",
            **cpt.pop("training", {}),
        }
        data = {
            "model": {"path": str(run.base)},
            "data": {"domain": [{"path": "domain.txt"}], "block_size": BLOCK_SIZE},
            "cpt": {"loss_chunk_size": 16, **cpt, "training": training},
            "seed": seed,
        }
        return config_from_dict(data, root=tmp_path)

    return make_config, run


@pytest.fixture(params=["fused CPU kernel", "eager"])
def both_target_paths(request, monkeypatch):
    """Runs a test on both paths of `TeacherRows`: the C kernel (float32 on the CPU, where it
    builds) and the eager PyTorch one (GPUs, other dtypes, no compiler). A module takes it with
    `pytestmark = pytest.mark.usefixtures("both_target_paths")`."""
    if request.param == "eager":
        monkeypatch.setattr(lssd_cpu_kernel, "applies", lambda *tensors: False)
    return request.param
