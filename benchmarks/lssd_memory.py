"""Peak memory of the chunked LSSD loss (forward + backward) / a naive full-vocabulary reference.

Both take the student's final hidden states [N, H] and output layer [V, H] (trainable) and the
teacher's hidden states and output layer (frozen), as the trainer does, at a large vocabulary:
- naive: full logits of both, logit swap, log-softmax of both, KL, autograd backward (the way a
  TRL-style distillation loss is written), in float32;
- chunked: `mixcpt.train.fused_loss.cpt_loss` (ce_weight 0, so LSSD alone) with `--chunk`
  positions per chunk.

How memory is measured (CPU): each variant runs in its own fresh process; after its inputs exist,
the process resets its peak resident set size (`/proc/self/clear_refs` "5") and reads VmHWM after
forward + backward. The figure is that peak minus the resident size before the loss: the bytes
the loss itself touched (large tensors come from mmap and are returned on free, so this is what
the loss held at its worst moment). On CUDA, torch.cuda.max_memory_allocated is used instead.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from mixcpt.losses import logit_swap
from mixcpt.train.fused_loss import cpt_loss
from mixcpt.train.targets import TeacherRows


def naive_lssd(hidden, weight, teacher_hidden, teacher_weight, labels):
    student = hidden @ weight.T  # [N, V]
    teacher = logit_swap(teacher_hidden @ teacher_weight.T, labels)  # [N, V]
    return F.kl_div(
        F.log_softmax(student, -1),
        F.log_softmax(teacher, -1),
        log_target=True,
        reduction="batchmean",
    )


def chunked_lssd(hidden, weight, teacher_hidden, teacher_weight, labels, chunk):
    target = TeacherRows(teacher_hidden[None], teacher_weight)
    return cpt_loss(
        hidden[None], labels[None], target, weight, ce_weight=0.0, chunk_size=chunk
    ).loss


def resident_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(a) -> int:
    """Bytes of peak memory the loss's forward + backward added, in this process."""
    device = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.tokens, a.hidden, generator=g).to(device).requires_grad_()
    weight = (torch.randn(a.vocab, a.hidden, generator=g) * 0.05).to(device).requires_grad_()
    teacher_hidden = torch.randn(a.tokens, a.hidden, generator=g).to(device)
    teacher_weight = (torch.randn(a.vocab, a.hidden, generator=g) * 0.05).to(device)
    labels = torch.randint(0, a.vocab, (a.tokens,), generator=g).to(device)
    args = (hidden, weight, teacher_hidden, teacher_weight, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = resident_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
    loss = naive_lssd(*args) if a.variant == "naive" else chunked_lssd(*args, a.chunk)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return resident_bytes("VmHWM") - before


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument(
        "--tokens", type=int, default=2048, help="positions in the batch (batch x sequence)"
    )
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS
    )  # one measurement, in a child
    a = ap.parse_args()
    if a.variant:
        print(measure(a))
        return
    peak = {}
    for variant in ("naive", "chunked"):
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--variant", variant],
            check=True,
            capture_output=True,
            text=True,
        )
        peak[variant] = int(child.stdout.split()[-1])
    logits_bytes = a.tokens * a.vocab * 4
    print(
        json.dumps(
            {
                "benchmark": "lssd_memory",
                "device": a.device,
                "vocab": a.vocab,
                "tokens": a.tokens,
                "hidden": a.hidden,
                "chunk": a.chunk,
                "float32_logits_mb": round(logits_bytes / 2**20),
                "peak_mb": {k: round(v / 2**20) for k, v in peak.items()},
                "chunked_over_naive": round(peak["chunked"] / peak["naive"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
