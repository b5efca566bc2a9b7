"""One process of tests/train/test_fsdp2.py (run under torchrun, 2 processes, gloo on the CPU; also
run on one GPU by benchmarks/gpu_smoke.sh).

Stage 1's loss through `LSSDTrainer.compute_loss` with the student sharded by FSDP2
(`fully_shard` on each decoder layer and the root, as accelerate's FSDP2 wrap policy does) and an
online teacher that follows it, each process on half of the global batch, against one process's
loss on the whole batch with unsharded models. Writes {"loss", "max_grad_diff", "teacher_share"}
to OUT/<rank>.json.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from mixcpt.config import TrainingConfig
from mixcpt.losses import IGNORE_INDEX, next_token_labels
from mixcpt.processes import process_state
from mixcpt.train.arguments import training_arguments
from mixcpt.train.forward import LossForward
from mixcpt.train.fused_loss import cpt_loss
from mixcpt.train.teachers import OnlineTeacher
from mixcpt.train.trainer import LSSDTrainer

B, T, V = 4, 32, 300  # the global batch: B // 2 blocks per process


def batch() -> dict[str, torch.Tensor]:
    """Packed blocks of two 16-token documents; the last block ends in 5 padding tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, T), generator=g)
    labels = ids.clone()
    labels[-1, -5:] = IGNORE_INDEX
    return {"input_ids": ids, "position_ids": torch.arange(T).repeat(B, 1) % 16, "labels": labels}


def reference(base: LlamaForCausalLM, inputs) -> tuple[float, dict[str, torch.Tensor]]:
    """One process, whole batch, nothing sharded: the loss and every parameter's gradient."""
    student = copy.deepcopy(base)
    teacher = OnlineTeacher(base, V)
    rows, weight, _ = LossForward(student)(student, inputs)
    result = cpt_loss(
        rows, next_token_labels(inputs["labels"]), teacher.target(inputs), weight, 1.0, 1.0
    )
    result.loss.backward()
    return result.loss.item(), {n: p.grad for n, p in student.named_parameters()}


def tiny_llama() -> LlamaForCausalLM:
    """The base model, the same on every process (seeded)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def write_result(
    out: str,
    rank: int,
    loss: float,
    expected_loss: float,
    grad_diff: float,
    held: int,
    base,
    trainer,
) -> None:
    """OUT/<rank>.json: this process's share of the loss (scaled as DDP averages) beside one
    process's, the largest gradient difference, and the share of the teacher's parameters this
    process holds (`held` of `base`'s)."""
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(
            {
                "loss": loss,
                "expected_loss": expected_loss,
                "max_grad_diff": grad_diff,
                "teacher_share": held / sum(p.numel() for p in base.parameters()),
                "teacher_sharded": trainer.teacher.sharded,
            },
            f,
        )


def main(out: str) -> None:
    state = process_state()  # joins the launch (gloo on the CPU, NCCL on GPUs)
    rank, world = state.process_index, state.num_processes
    base = tiny_llama().to(state.device)
    inputs = {k: v.to(state.device) for k, v in batch().items()}
    expected_loss, expected_grads = reference(base, inputs)

    student = copy.deepcopy(base)
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    args = training_arguments(TrainingConfig(), os.path.join(out, "work"), seed=0)
    trainer = LSSDTrainer(
        model=student, args=args, teacher=OnlineTeacher(base, V), loss_chunk_size=16
    )
    mine = {k: v[rank * B // world : (rank + 1) * B // world] for k, v in inputs.items()}
    supervised = (next_token_labels(inputs["labels"]) != IGNORE_INDEX).sum()
    loss = trainer.compute_loss(student, mine, num_items_in_batch=supervised)
    loss.backward()  # FSDP2 reduce-scatters the gradients, averaged over the processes
    total = loss.detach().clone()
    dist.all_reduce(total)
    grad_diff = max(
        (p.grad.full_tensor() - expected_grads[n]).abs().max().item()
        for n, p in student.named_parameters()
    )
    teacher = trainer.teacher.model
    held = sum(p.to_local().numel() for p in teacher.parameters())
    write_result(out, rank, total.item() / world, expected_loss, grad_diff, held, base, trainer)


if __name__ == "__main__":
    main(sys.argv[1])
