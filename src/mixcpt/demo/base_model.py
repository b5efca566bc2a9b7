"""The demo's base model: a BPE tokenizer trained on the world's text and a tiny Llama
pre-trained on the general world (bios and planet documents mixed with QA about every general
entity and the other tasks, as plain text) with plain causal-LM cross-entropy.

It plays the part of a pretrained general model: it knows the general people and planets and
answers questions about them, and it has never seen a domain planet. Built once and cached: a
folder whose `mixcpt_base.json` holds the same fingerprint (world contents + recipe + seed) is
reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer

from mixcpt.atomic import atomic_dir
from mixcpt.config import TrainingConfig
from mixcpt.data.packing import PackedBlocks, write_packed
from mixcpt.demo.entities import render_plain
from mixcpt.demo.tokenizer import train_bpe_tokenizer
from mixcpt.demo.world import WorldFiles
from mixcpt.models import save_model
from mixcpt.train.arguments import training_arguments

MARKER = "mixcpt_base.json"


@dataclass(frozen=True)
class BaseRecipe:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    block_size: int
    epochs: int  # passes over general_pretrain, each packed in its own shuffled order
    batch_size: int
    learning_rate: float


# Chosen by experiment (1 CPU thread): depth matters more than width for recalling a fact from a
# multi-token name; hidden 64 x 4 layers beat 128 x 4 at a third of the cost. 30 epochs over the
# default world's general text (1.6M tokens, ~2 CPU-minutes) give general MC ~0.8.
DEFAULT_RECIPE = BaseRecipe(
    vocab_size=2048,
    hidden=64,
    layers=4,
    heads=4,
    block_size=128,
    epochs=30,
    batch_size=16,
    learning_rate=5e-3,
)
RECIPES = {"default": DEFAULT_RECIPE, "quick": replace(DEFAULT_RECIPE, vocab_size=1024, epochs=20)}


def _read_texts(path: Path, key: str = "text") -> list[str]:
    return [json.loads(line)[key] for line in path.read_text(encoding="utf-8").splitlines()]


def _pack_epochs(
    docs: list[list[int]], eos_id: int, block_size: int, epochs: int, seed: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Each epoch's documents in a fresh shuffled order, joined with EOS, cut into blocks.

    Returns (input_ids [n_blocks, block_size], position_ids [n_blocks, block_size] restarting at 0
    at every document, number of real tokens); the last block is padded with EOS.
    """
    rng = random.Random(seed)
    ids: list[int] = []
    pos: list[int] = []
    for _ in range(epochs):
        for doc in rng.sample(docs, len(docs)):
            ids += doc + [eos_id]
            pos += range(len(doc) + 1)
    n_tokens = len(ids)
    n_blocks = -(-n_tokens // block_size)
    pad = n_blocks * block_size - n_tokens
    shape = (n_blocks, block_size)
    return (
        np.array(ids + [eos_id] * pad).reshape(shape),
        np.array(pos + list(range(pad))).reshape(shape),
        n_tokens,
    )


def _fingerprint(world: WorldFiles, recipe: BaseRecipe, seed: int) -> str:
    h = hashlib.sha256(world.fingerprint().encode())
    h.update(json.dumps({"recipe": asdict(recipe), "seed": seed}, sort_keys=True).encode())
    return h.hexdigest()


def build_base_model(world: WorldFiles, out: Path, seed: int = 0, size: str = "default") -> Path:
    """Train the tokenizer and pre-train the tiny base on `world`, saving an HF folder at `out`.

    Returns `out`. Skips all work when `out` already holds a base built from the same world,
    recipe (`size` in RECIPES) and seed; otherwise (re)builds it atomically.
    """
    if size not in RECIPES:
        raise ValueError(f"base model size must be one of {sorted(RECIPES)}, not {size!r}")
    recipe, out = RECIPES[size], Path(out)
    fingerprint = _fingerprint(world, recipe, seed)
    marker = out / MARKER
    if marker.exists() and json.loads(marker.read_text())["fingerprint"] == fingerprint:
        return out

    start = time.time()
    pretrain = _read_texts(world.general_pretrain)
    # The tokenizer sees the domain text too, so that planet names split into sensible pieces
    # (as a real base model's tokenizer covers words it was never trained to know facts about).
    instructions = [
        render_plain(json.loads(line))
        for line in world.instructions.read_text("utf-8").splitlines()
    ]
    tokenizer = train_bpe_tokenizer(
        pretrain + _read_texts(world.domain) + instructions, vocab_size=recipe.vocab_size
    )
    docs = tokenizer(pretrain, add_special_tokens=True)["input_ids"]  # each starts with BOS
    blocks, positions, n_tokens = _pack_epochs(
        docs, tokenizer.eos_token_id, recipe.block_size, recipe.epochs, seed
    )

    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=recipe.hidden,
            intermediate_size=4 * recipe.hidden,
            num_hidden_layers=recipe.layers,
            num_attention_heads=recipe.heads,
            num_key_value_heads=recipe.heads,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    with atomic_dir(out) as tmp:
        # packed stream and Trainer state; removed before the folder is published
        work = tmp / "work"
        write_packed(
            work / "packed", blocks, positions, n_tokens, tokenizer.pad_token_id, fingerprint
        )
        train = TrainingConfig(
            learning_rate=recipe.learning_rate,
            lr_scheduler="cosine",
            warmup_ratio=0.05,
            weight_decay=0.01,
            num_epochs=1,
            per_device_batch_size=recipe.batch_size,
            logging_steps=50,
            report_to="none",  # its work folder is deleted: nobody would see the logs
        )
        args = training_arguments(
            train,
            work / "trainer",
            seed,
            save_strategy="no",
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        result = Trainer(
            model=model, args=args, train_dataset=PackedBlocks(work / "packed")
        ).train()
        shutil.rmtree(work)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        save_model(model.eval(), tokenizer, tmp)
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "fingerprint": fingerprint,
                    "size": size,
                    "seed": seed,
                    "recipe": asdict(recipe),
                    "parameters": model.num_parameters(),
                    "train_tokens": n_tokens,
                    "steps": result.global_step,
                    "mean_train_loss": round(result.training_loss, 4),
                    "seconds": round(time.time() - start, 1),
                },
                indent=2,
            )
            + "\n"
        )
    return out
