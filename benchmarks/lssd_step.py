"""Step time of LSSD (online, cache, LoRA teachers) relative to plain cross-entropy CPT, and of the
other objectives (cpt.objective kl, mft; online teacher) relative to LSSD.

One full optimizer step per variant (LSSDTrainer.training_step = compute_loss + backward, then the
optimizer step), every variant on its own copy of the same Llama built from config and the same
batch, interleaved round by round after warm-up; the figures are medians. Prints one JSON line.

    python benchmarks/lssd_step.py                        # CPU: ~5M params, 8k vocab, 8 x 256, fp32
    python benchmarks/lssd_step.py --device cuda --dtype bfloat16 --vocab 32000 --hidden 896 \
        --layers 24 --heads 14 --kv-heads 2 --intermediate 4864 --seq 1024   # ~0.5B, reports MFU
    ... --compile-loss --warmup 3     # the same with cpt.compile_loss (compiling in the warm-up)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer

from mixcpt.config import TrainingConfig
from mixcpt.data.packing import IndexedBlocks, write_packed
from mixcpt.malloc_tuning import keep_freed_memory
from mixcpt.train import lssd_cpu_kernel
from mixcpt.train.arguments import training_arguments
from mixcpt.train.teacher_cache import build_teacher_cache
from mixcpt.train.teachers import LoraTeacher, OnlineTeacher
from mixcpt.train.trainer import LSSDTrainer


def build_model(a) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=a.seq,
        tie_word_embeddings=False,
        use_cache=False,
    )
    return LlamaForCausalLM(cfg).to(dtype=getattr(torch, a.dtype))


def random_blocks(folder: Path, a) -> IndexedBlocks:
    """`batch` blocks of random tokens, two documents per block (positions restart halfway)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, a.vocab, size=(a.batch, a.seq))
    positions = np.tile(np.r_[np.arange(a.seq // 2), np.arange(a.seq - a.seq // 2)], (a.batch, 1))
    write_packed(
        folder, ids, positions, n_tokens=a.batch * a.seq, pad_token_id=0, fingerprint="bench"
    )
    return IndexedBlocks(folder)


def flops_per_step(model: torch.nn.Module, tokens: int, a) -> float:
    """6 x (parameters without the input embedding) x tokens + causal attention (PaLM
    appendix B)."""
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 6 * n * tokens + 6 * a.layers * a.hidden * a.seq * tokens


def arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, default in [
        ("vocab", 8192),
        ("hidden", 192),
        ("intermediate", 512),
        ("layers", 4),
        ("heads", 4),
        ("kv_heads", 4),
        ("batch", 8),
        ("seq", 256),
        ("steps", 7),
        ("warmup", 2),
        ("top_k", 64),
        ("chunk", 256),
    ]:
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--compile-loss",
        action="store_true",
        help="cpt.compile_loss: the chunked loss through torch.compile (give --warmup 3 or more)",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="accelerator peak for MFU (H100 bf16 dense)",
    )
    return ap


def training_args(a, output_dir: Path):
    tc = TrainingConfig(
        learning_rate=1e-4, max_steps=1, per_device_batch_size=a.batch, lr_scheduler="constant"
    )
    return training_arguments(
        tc,
        output_dir,
        seed=0,
        dtype=a.dtype,
        remove_unused_columns=False,
        use_cpu=a.device == "cpu",
        disable_tqdm=True,
    )


def timed_step(trainer: Trainer, inputs: dict[str, torch.Tensor], device: torch.device) -> float:
    """Seconds of one optimizer step: compute_loss + backward (Trainer.training_step), then
    the update."""
    if trainer.optimizer is None:
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = (
            1  # set by Trainer's loop, which we do not run
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.training_step(trainer.model, inputs)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def setup(a):
    """(device, base model, temporary folder, blocks, one batch of all blocks on the device,
    TrainingArguments): what every step benchmark measures on. Keep `tmp` alive while measuring.
    Tunes malloc as the training stages do (`a.malloc_tuned`; MIXCPT_MALLOC_TUNING=0 to compare)."""
    a.malloc_tuned = keep_freed_memory()
    device = torch.device(a.device)
    base = build_model(a)
    tmp = tempfile.TemporaryDirectory()
    blocks = random_blocks(Path(tmp.name) / "blocks", a)
    batch = {
        k: torch.stack([torch.as_tensor(blocks[i][k]) for i in range(len(blocks))]).to(device)
        for k in blocks[0]
    }
    return device, base, tmp, blocks, batch, training_args(a, Path(tmp.name) / "out")


def main() -> None:
    a = arguments().parse_args()
    device, base, tmp, blocks, batch, args = setup(a)

    def lora(model):
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))

    def make(name):
        model = copy.deepcopy(base).to(device)
        loss = {"loss_chunk_size": a.chunk, "compile_loss": a.compile_loss}
        if name == "hf_ce":  # transformers' own loss, for reference: is our plain CE step as fast?
            return Trainer(model=model, args=args), {
                k: batch[k] for k in ("input_ids", "position_ids", "labels")
            }
        if name.startswith("lora"):
            model = lora(model)
        if name in ("plain", "lora_plain"):
            loss["lssd_weight"] = 0.0
        elif name.startswith("online"):  # online, online_kl, online_mft
            loss["teacher"] = OnlineTeacher(model, a.vocab)
            loss["objective"] = name.partition("_")[2] or "lssd"
        elif name == "cache":
            loss["teacher"] = build_teacher_cache(
                model, blocks, Path(tmp.name) / "cache", a.top_k, 1.0, a.batch
            )
        elif name == "lora_lssd":
            loss["teacher"] = LoraTeacher(model)
        return LSSDTrainer(model=model, args=args, **loss), batch

    variants = [
        "plain",
        "hf_ce",
        "online",
        "online_kl",
        "online_mft",
        "cache",
        "lora_plain",
        "lora_lssd",
    ]
    trainers = {name: make(name) for name in variants}
    times = {name: [] for name in variants}
    for round_ in range(a.warmup + a.steps):
        for name in variants:
            seconds = timed_step(*trainers[name], device)
            if round_ >= a.warmup:
                times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    tokens = a.batch * a.seq
    result = {
        "benchmark": "lssd_step",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()}",
        "dtype": a.dtype,
        "params": sum(p.numel() for p in base.parameters()),
        "vocab": a.vocab,
        "batch": a.batch,
        "seq": a.seq,
        "steps": a.steps,
        "loss_chunk_size": a.chunk,
        "compile_loss": a.compile_loss,
        "cache_top_k": a.top_k,
        "malloc_tuned": a.malloc_tuned,
        "lssd_cpu_kernel": lssd_cpu_kernel.library() is not None,
        "step_s": {name: round(s, 4) for name, s in median.items()},
        "plain_tokens_per_s": round(tokens / median["plain"]),
        "plain_over_hf_ce": round(median["plain"] / median["hf_ce"], 3),
        "online_over_plain": round(median["online"] / median["plain"], 3),
        "online_over_hf_ce": round(
            median["online"] / median["hf_ce"], 3
        ),  # vs a CPT script on Trainer's own CE
        "online_kl_over_online": round(median["online_kl"] / median["online"], 3),
        "online_mft_over_online": round(median["online_mft"] / median["online"], 3),
        "cache_over_plain": round(median["cache"] / median["plain"], 3),
        "lora_over_lora_plain": round(median["lora_lssd"] / median["lora_plain"], 3),
        "cache_bytes_per_token": trainers["cache"][0].teacher.bytes_per_token,
    }
    if device.type == "cuda":
        flops = flops_per_step(base, tokens, a)
        result["mfu"] = {
            name: round(flops / median[name] / (a.peak_tflops * 1e12), 3)
            for name in ("plain", "cache")
        }
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
