"""Our online LSSD step (CE + LSSD, fused and chunked) / a TRL GKDTrainer-style distillation step.

The TRL-style step is `transformers.Trainer` with GKDTrainer's own loss: student forward (full
logits), online teacher forward without grad, then `trl.experimental.gkd.GKDTrainer.
generalized_jsd_loss(..., beta=0)`, i.e. the forward KL(teacher || student) over full-vocabulary
log-softmaxes of both, no generation (GKD's `lmbda=0`, supervised data only). Same model, batch and
optimizer; steps interleaved after warm-up; medians. Prints one JSON line. Flags as lssd_step.py.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import Trainer

from mixcpt.train.teachers import OnlineTeacher
from mixcpt.train.trainer import LSSDTrainer

sys.path.insert(0, str(Path(__file__).parent))
from lssd_step import arguments, setup, timed_step  # noqa: E402

try:
    from trl.experimental.gkd import GKDTrainer
except ImportError:  # TRL missing: nothing to compare with
    GKDTrainer = None


class GKDStyleTrainer(Trainer):
    """TRL GKD's supervised distillation step: KL(teacher || student) on full logits, online
    teacher."""

    def __init__(self, *args, teacher_model, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"]}
        student_logits = model(**batch).logits  # [B, T, V]
        with torch.no_grad():
            teacher_logits = self.teacher_model(**batch).logits  # [B, T, V]
        return GKDTrainer.generalized_jsd_loss(
            student_logits[:, :-1], teacher_logits[:, :-1], labels=inputs["labels"][:, 1:], beta=0.0
        )


def main() -> None:
    a = arguments().parse_args()
    if GKDTrainer is None:
        print(json.dumps({"benchmark": "vs_trl", "skipped": "trl is not installed"}))
        return
    device, base, tmp, _, batch, args = setup(a)
    ours_model, trl_model = copy.deepcopy(base).to(device), copy.deepcopy(base).to(device)
    trainers = {
        "ours": LSSDTrainer(
            model=ours_model,
            args=args,
            teacher=OnlineTeacher(ours_model, a.vocab),
            loss_chunk_size=a.chunk,
        ),
        "trl_gkd_style": GKDStyleTrainer(
            model=trl_model,
            args=args,
            teacher_model=copy.deepcopy(base).to(device).eval().requires_grad_(False),
        ),
    }
    times = {name: [] for name in trainers}
    for round_ in range(a.warmup + a.steps):
        for name, trainer in trainers.items():
            seconds = timed_step(trainer, batch, device)
            if round_ >= a.warmup:
                times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        json.dumps(
            {
                "benchmark": "vs_trl",
                "device": a.device,
                "dtype": a.dtype,
                "vocab": a.vocab,
                "batch": a.batch,
                "seq": a.seq,
                "steps": a.steps,
                "malloc_tuned": a.malloc_tuned,
                "trl_loss": "trl.experimental.gkd.GKDTrainer.generalized_jsd_loss(beta=0)",
                "step_s": {name: round(s, 4) for name, s in median.items()},
                "ours_over_trl": round(median["ours"] / median["trl_gkd_style"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
