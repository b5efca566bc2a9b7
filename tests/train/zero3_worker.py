"""One process of the ZeRO-3 case of tests/train/test_fsdp2.py (under torchrun, 2 processes, gloo).

Stage 1's loss through `LSSDTrainer.compute_loss` with the student in a DeepSpeed ZeRO-3 engine
(as accelerate wraps it under `deepspeed:`) and an online teacher that follows it, each process on
half of the global batch, against one process's loss on the whole batch with plain models. Writes
{"loss", "expected_loss", "max_grad_diff", "teacher_share", "teacher_sharded"} to OUT/<rank>.json.
"""

from __future__ import annotations

import copy
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from fsdp2_worker import B, V, batch, reference, tiny_llama, write_result

from mixcpt.config import TrainingConfig
from mixcpt.losses import IGNORE_INDEX, next_token_labels
from mixcpt.processes import process_state
from mixcpt.train.arguments import training_arguments
from mixcpt.train.teachers import OnlineTeacher
from mixcpt.train.trainer import LSSDTrainer, shards_parameters

# explicit values: accelerate fills "auto" only inside Trainer.train, which this does not call
DEEPSPEED = {
    "train_micro_batch_size_per_gpu": B // 2,
    "gradient_accumulation_steps": 1,
    "train_batch_size": B,
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
}


def main(out: str) -> None:
    state = process_state()  # joins the launch (gloo on the CPU)
    rank, world = state.process_index, state.num_processes
    base = tiny_llama().to(state.device)
    inputs = {k: v.to(state.device) for k, v in batch().items()}
    expected_loss, expected_grads = reference(base, inputs)

    args = training_arguments(
        TrainingConfig(per_device_batch_size=B // 2),
        os.path.join(out, "work"),
        seed=0,
        deepspeed=DEEPSPEED,
    )
    student = copy.deepcopy(base)
    trainer = LSSDTrainer(
        model=student, args=args, teacher=OnlineTeacher(base, V), loss_chunk_size=16
    )
    assert shards_parameters(trainer)  # so the student's loss takes logits, as it must
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=DEEPSPEED)
    mine = {k: v[rank * B // world : (rank + 1) * B // world] for k, v in inputs.items()}
    supervised = (next_token_labels(inputs["labels"]) != IGNORE_INDEX).sum()
    loss = trainer.compute_loss(engine, mine, num_items_in_batch=supervised)
    engine.backward(loss)  # ZeRO-3 reduce-scatters the gradients, averaged over the processes
    total = loss.detach().clone()
    dist.all_reduce(total)
    grad_diff = max(
        (safe_get_full_grad(p) - expected_grads[n]).abs().max().item()
        for n, p in engine.module.named_parameters()
    )
    teacher = trainer.teacher.model.module
    held = sum(p.ds_tensor.numel() for p in teacher.parameters())
    write_result(out, rank, total.item() / world, expected_loss, grad_diff, held, base, trainer)


if __name__ == "__main__":
    main(sys.argv[1])
