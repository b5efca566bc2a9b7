"""Stage 1 under DDP: two processes on the CPU (gloo) follow the one-process run with the same
global batch.

`torchrun --nproc_per_node 2 -m mixcpt.cli cpt` with 2 blocks per process is compared with one
process of 4 blocks per step: the same blocks reach each optimizer step (the sampler shards the
same seeded permutation), so the logged losses and the final weights must agree, even though one
block is mostly padding and the two processes see different numbers of supervised tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mixcpt.cli import main
from mixcpt.data.packing import write_packed

BLOCK_SIZE, N_BLOCKS, STEPS = 32, 16, 4  # 4 steps of 4 blocks: one epoch, every block used


def make_run(
    tmp_path, tiny_model_dir, tokenizer, per_device_batch_size: int, passthrough: dict | None = None
):
    """A config file and a run folder whose data stage is done: N_BLOCKS blocks of seeded
    tokens, the last one holding 3 tokens and then padding. `passthrough`: TrainingArguments
    fields for cpt.training (e.g. deepspeed)."""
    (tmp_path / "domain.txt").write_text(
        "unused: the packed stream below stands for the data stage's output"
    )
    config = {
        "seed": 0,
        "model": {"path": str(tiny_model_dir)},
        "data": {"domain": [{"path": "domain.txt"}], "block_size": BLOCK_SIZE},
        "cpt": {
            "teacher": "online",
            "loss_chunk_size": 16,
            "training": {
                "learning_rate": 3e-3,
                "lr_scheduler": "constant",
                "max_steps": STEPS,
                "logging_steps": 1,
                "save_steps": 100,
                "per_device_batch_size": per_device_batch_size,
                **(passthrough or {}),
            },
        },
    }
    config_path = tmp_path / f"config-{per_device_batch_size}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / f"run-{per_device_batch_size}"
    rng = np.random.default_rng(0)
    ids = rng.integers(3, len(tokenizer), size=(N_BLOCKS, BLOCK_SIZE))
    positions = np.tile(
        np.arange(BLOCK_SIZE) % 16, (N_BLOCKS, 1)
    )  # two 16-token documents per block
    write_packed(
        out / "data" / "mix",
        ids,
        positions,
        ids.size - BLOCK_SIZE + 3,
        tokenizer.pad_token_id,
        "synthetic",
    )
    return config_path, out


# DeepSpeed ZeRO-3 on the CPU (its CPU accelerator, gloo): the student's parameters are
# partitioned, and so is the online teacher's (OnlineTeacher.follow)
ZERO3 = {
    "deepspeed": {
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
}


@pytest.mark.parametrize(
    "backend",
    [
        "ddp",
        pytest.param("zero3", marks=pytest.mark.deepspeed),
    ],
)
def test_two_processes_match_one_process_with_the_same_global_batch(
    tmp_path, tiny_model_dir, tiny_tokenizer, torchrun, backend
):
    one_config, one_out = make_run(
        tmp_path, tiny_model_dir, tiny_tokenizer, per_device_batch_size=4
    )
    assert main(["cpt", str(one_config), "--output", str(one_out), "--arm", "mixcpt"]) == 0

    two_config, two_out = make_run(
        tmp_path,
        tiny_model_dir,
        tiny_tokenizer,
        per_device_batch_size=2,
        passthrough=ZERO3 if backend == "zero3" else None,
    )
    proc = torchrun("-m", "mixcpt.cli", "cpt", two_config, "--output", two_out, "--arm", "mixcpt")
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = (
        json.loads((out / "results.json").read_text())["stages"]["mixcpt/cpt"]
        for out in (one_out, two_out)
    )
    assert one["steps"] == two["steps"] == STEPS
    assert (
        two["tokens"] == one["tokens"] == STEPS * 4 * BLOCK_SIZE
    )  # the global batch, counted over both processes
    losses = {
        name: [[h[k] for h in run["log_history"] if k in h] for k in ("loss", "lssd_loss")]
        for name, run in (("one", one), ("two", two))
    }
    assert len(losses["one"][0]) == STEPS and len(losses["one"][1]) == STEPS
    np.testing.assert_allclose(losses["two"], losses["one"], atol=1e-4, rtol=0)

    # One folder, written once (by rank 0), loadable, and equal to the one-process weights.
    final_one = load_file(one_out / "mixcpt" / "cpt" / "model.safetensors")
    final_two = load_file(two_out / "mixcpt" / "cpt" / "model.safetensors")
    assert final_one.keys() == final_two.keys()
    for name in final_one:
        torch.testing.assert_close(final_two[name], final_one[name], atol=1e-4, rtol=0)
    assert not (two_out / ".work").exists() or not any((two_out / ".work").iterdir())


def test_launcher_configs_parse_and_the_zero3_save_gathers_full_weights():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).parents[1] / "examples" / "distributed"
    kinds = {
        name: load_config_from_file(str(folder / f"{name}.yaml")).distributed_type
        for name in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
    }
    assert [str(k).split(".")[-1] for k in kinds.values()] == [
        "MULTI_GPU",
        "FSDP",
        "DEEPSPEED",
        "DEEPSPEED",
    ]
    fsdp = load_config_from_file(str(folder / "fsdp.yaml")).fsdp_config
    assert (
        fsdp["fsdp_version"] == 2  # FSDP2: the online teacher is sharded too
        and fsdp["fsdp_reshard_after_forward"] is True
        and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    )
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False  # the online teacher copies real weights
    for stage in (2, 3):
        ds = json.loads((folder / f"ds_zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
    assert (
        json.loads((folder / "ds_zero3.json").read_text())["zero_optimization"][
            "stage3_gather_16bit_weights_on_model_save"
        ]
        is True
    )


def test_single_process_stages_run_once_under_a_launcher(tmp_path, tiny_model_dir, torchrun):
    """`mixcpt data` under torchrun: the main process builds the data, the other waits, and the
    result is the one a plain run builds (no second writer racing for the same folder)."""
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": f"planet {i} orbits star {i % 5}"}) + "\n" for i in range(200))
    )
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {path: ./tiny-llama}\ndata: {domain: [{path: d.jsonl}], block_size: 32}\n"
    )
    proc = torchrun("-m", "mixcpt.cli", "data", config, "--output", tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one process built the data: the other knew it was not the main one (on the CPU too)
    assert proc.stdout.count("mixcpt: data: building") == 1, proc.stdout
    assert main(["data", str(config), "--output", str(tmp_path / "one")]) == 0
    for name in ("input_ids.npy", "position_ids.npy"):
        assert (tmp_path / "two" / "data" / "mix" / name).read_bytes() == (
            tmp_path / "one" / "data" / "mix" / name
        ).read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["data", "results.json"]


# A torchrun worker: each training step slowed by SLOW_S seconds; its pid written to PIDS/<rank>.
RANK_WRAPPER = """
import os, sys, time
from mixcpt.train.trainer import LSSDTrainer
real = LSSDTrainer.training_step
def slow(*args, **kwargs):
    time.sleep(float(os.environ["SLOW_S"]))
    return real(*args, **kwargs)
LSSDTrainer.training_step = slow
with open(os.path.join(os.environ["PIDS"], os.environ["RANK"]), "w") as f:
    f.write(str(os.getpid()))
from mixcpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_to_one_process_stops_every_process_at_the_same_checkpoint(
    tmp_path, tiny_model_dir, tiny_tokenizer, torchrun
):
    """SLURM or a user may signal only some processes of a launch: the processes agree at each step
    end, so all save the same checkpoint (each its RNG state) and exit 143; the same launch
    command resumes, and ends where one process with the same global batch ends."""
    configs = {}
    for batch in (4, 2):
        config, out = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, batch)
        raw = yaml.safe_load(config.read_text())
        raw["cpt"]["training"].update(max_steps=8, save_steps=2)
        config.write_text(yaml.safe_dump(raw))
        configs[batch] = (config, out)
    one_config, one_out = configs[4]
    assert main(["cpt", str(one_config), "--output", str(one_out), "--arm", "mixcpt"]) == 0

    config, out = configs[2]
    (tmp_path / "wrapper.py").write_text(RANK_WRAPPER)
    pids = tmp_path / "pids"
    pids.mkdir()
    launch = [tmp_path / "wrapper.py", "cpt", config, "--output", out, "--arm", "mixcpt"]
    proc = torchrun.start(*launch, SLOW_S="1", PIDS=str(pids))
    work = out / ".work" / "mixcpt-cpt"
    deadline = time.monotonic() + 240
    while not (work / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "checkpoint-2 never appeared"
        time.sleep(0.1)
    os.kill(int((pids / "1").read_text()), signal.SIGUSR1)  # rank 1 only
    proc.wait(timeout=240)
    lines = [line for line in proc.stderr.read().splitlines() if line.startswith("mixcpt:")]
    assert len(lines) == 2 and lines[0] == lines[1], lines  # rank 0 stopped as well
    saved = int(lines[0].split("checkpoint of step ")[1].split()[0])
    assert lines[0].startswith(
        f"mixcpt: stopped by SIGUSR1; mixcpt/cpt: checkpoint of step {saved}"
    )
    checkpoint = work / f"checkpoint-{saved}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == saved
    assert (checkpoint / "rng_state_0.pth").exists() and (checkpoint / "rng_state_1.pth").exists()
    assert not (out / "mixcpt").exists() and not (out / ".mixcpt.lock").exists()

    rerun = torchrun(*launch, SLOW_S="0", PIDS=str(pids))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    two = json.loads((out / "results.json").read_text())["stages"]["mixcpt/cpt"]
    assert two["resumed_from"].endswith(f"checkpoint-{saved}") and two["steps"] == 8
    final_one = load_file(one_out / "mixcpt" / "cpt" / "model.safetensors")
    final_two = load_file(out / "mixcpt" / "cpt" / "model.safetensors")
    for name in final_one:
        torch.testing.assert_close(final_two[name], final_one[name], atol=1e-4, rtol=0)


# A torchrun worker whose process NAN_RANK computes NaN hidden states in the forwards of steps
# NAN_STEPS (e.g. "2-2"): the tiny Llama calls its RMSNorm 5 times per forward (2 per layer, 1
# final) and stage 1 here trains with plain CE (no teacher forwards to count).
NAN_WRAPPER = """
import os, sys
from transformers.models.llama.modeling_llama import LlamaRMSNorm
real, calls = LlamaRMSNorm.forward, [0]
first, last = (int(s) for s in os.environ["NAN_STEPS"].split("-"))
def poisoned(*args, **kwargs):
    calls[0] += 1
    result = real(*args, **kwargs)
    step = (calls[0] - 1) // 5
    if os.environ["RANK"] == os.environ["NAN_RANK"] and first <= step <= last:
        result = result * float("nan")
    return result
LlamaRMSNorm.forward = poisoned
from mixcpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def nan_launch(torchrun, tmp_path, tiny_model_dir, tokenizer, on_nonfinite: str, steps: str):
    """Launch 2 processes of stage 1 (plain CE, 4 steps) whose rank 1 alone sees NaN in `steps`;
    returns the finished process and the run folder."""
    config, out = make_run(tmp_path, tiny_model_dir, tokenizer, per_device_batch_size=2)
    raw = yaml.safe_load(config.read_text())
    raw["cpt"].update(lssd_weight=0)
    raw["cpt"]["training"].update(save_steps=1, on_nonfinite=on_nonfinite)
    config.write_text(yaml.safe_dump(raw))
    (tmp_path / "nan.py").write_text(NAN_WRAPPER)
    launch = [tmp_path / "nan.py", "cpt", config, "--output", out, "--arm", "mixcpt"]
    # a rank left waiting in an all-reduce would hang here, not exit
    proc = torchrun(*launch, timeout=240, NAN_RANK="1", NAN_STEPS=steps)
    return proc, out


def test_a_nan_on_one_process_stops_every_process_with_one_line(
    tmp_path, tiny_model_dir, tiny_tokenizer, torchrun
):
    proc, out = nan_launch(torchrun, tmp_path, tiny_model_dir, tiny_tokenizer, "stop", "2-3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mixcpt:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("mixcpt: error: non-finite loss at step 2 on process 1 of 2")
    assert "NonFiniteLossError" not in proc.stderr  # no worker traceback
    work = out / ".work" / "mixcpt-cpt"
    state = json.loads((work / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2  # the last checkpoint before the NaN, intact
    assert not (out / "mixcpt" / "cpt").exists()


def test_a_nan_on_one_process_is_skipped_by_every_process(
    tmp_path, tiny_model_dir, tiny_tokenizer, torchrun
):
    proc, out = nan_launch(torchrun, tmp_path, tiny_model_dir, tiny_tokenizer, "skip", "1-1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "results.json").read_text())["stages"]["mixcpt/cpt"]["log_history"]
    # step 2 (the second) skipped its micro-batch on both processes, the others none
    skipped = [h.get("skipped_batches", 0) for h in history if "loss" in h]
    assert skipped == [0, 2, 0, 0], history
    weights = load_file(out / "mixcpt" / "cpt" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


# A torchrun worker in which every call of PATCHED ("module:function") takes SLOW_S seconds longer.
SLOW_WRAPPER = """
import importlib, os, sys, time
module, name = os.environ["PATCHED"].split(":")
owner = importlib.import_module(module)
real = getattr(owner, name)
def slow(*args, **kwargs):
    time.sleep(float(os.environ["SLOW_S"]))
    return real(*args, **kwargs)
setattr(owner, name, slow)
from mixcpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_processes_build_the_teacher_cache_together_past_the_timeout(
    tmp_path, tiny_model_dir, tiny_tokenizer, torchrun
):
    """`mixcpt cache` under torchrun: each process builds half of the cache, so no process waits
    at a barrier while another builds it all (the one-process build here takes longer than the
    process group's timeout), and the files are byte for byte those one process builds."""
    config, out = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, per_device_batch_size=2)
    raw = yaml.safe_load(config.read_text())
    raw["cpt"].update(teacher="cache", cache_top_k=8)
    for section in ("cpt", "sft", "dpo"):  # the launch's barriers wait 12 s at most
        raw.setdefault(section, {}).setdefault("training", {})["ddp_timeout"] = 12
    config.write_text(yaml.safe_dump(raw))
    one = tmp_path / "one"
    shutil.copytree(out / "data", one / "data")
    assert main(["cache", str(config), "--output", str(one)]) == 0

    (tmp_path / "slow.py").write_text(SLOW_WRAPPER)
    slow = {"SLOW_S": "2", "PATCHED": "mixcpt.train.teacher_cache:teacher_top_k"}
    # 8 batches of 2 blocks, 2 s each: 16 s for one process, 8 s for two
    proc = torchrun(tmp_path / "slow.py", "cache", config, "--output", out, **slow)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("ids.npy", "logprobs.npy", "tail.npy", "done.npy", "meta.json"):
        assert (out / "teacher_cache" / name).read_bytes() == (
            one / "teacher_cache" / name
        ).read_bytes(), name


def test_a_one_process_stage_may_outlast_the_process_groups_timeout(
    tmp_path, tiny_model_dir, torchrun
):
    """The other processes wait for the main one's data stage without a collective, so a stage
    longer than the process group's timeout (here 5 s against about 12 s of data) still ends
    well; a failure there stops every process, with the main one's message only."""
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": f"planet {i} orbits star {i % 5}"}) + "\n" for i in range(120))
    )
    config = tmp_path / "c.yaml"
    timeouts = "".join(f"{s}: {{training: {{ddp_timeout: 5}}}}\n" for s in ("cpt", "sft", "dpo"))
    config.write_text(
        "model: {path: ./tiny-llama}\ndata: {domain: [{path: d.jsonl}], block_size: 32}\n"
        + timeouts
    )
    (tmp_path / "slow.py").write_text(SLOW_WRAPPER)
    launch = [tmp_path / "slow.py", "data", config, "--output"]
    slow = {"SLOW_S": "0.1", "PATCHED": "mixcpt.data.stage:_render"}
    proc = torchrun(*launch, tmp_path / "run", **slow)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "data" / "mix" / "meta.json").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["data", "results.json"]

    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\nnot json\n')
    proc = torchrun(*launch, tmp_path / "bad", **slow)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mixcpt:")]
    assert len(lines) == 1 and "d.jsonl" in lines[0] and ":2" in lines[0], proc.stderr[-3000:]


def test_two_processes_share_out_the_models_to_evaluate(
    tmp_path, tiny_model, tiny_tokenizer, torchrun
):
    """`mixcpt eval` under torchrun: the models are dealt out to the processes and the results
    gathered; the table is the one a single process writes."""
    (tmp_path / "d.txt").write_text("The planet Zorbax orbits the star Vega.\n")
    (tmp_path / "probe.txt").write_text("The quick brown fox jumps over the lazy dog.\n")
    mc = {"question": "Which star does Zorbax orbit?", "choices": ["Vega", "the Sun"], "answer": 0}
    (tmp_path / "mc.jsonl").write_text(json.dumps(mc) + "\n")
    (tmp_path / "ppl.jsonl").write_text(json.dumps({"text": "Alice was born in Paris."}) + "\n")
    tiny_model.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "base"},
                "data": {"domain": [{"path": "d.txt"}]},
                "eval": {
                    "benchmarks": [
                        {
                            "name": "mc",
                            "path": "mc.jsonl",
                            "kind": "multiple_choice",
                            "tag": "domain",
                        },
                        {
                            "name": "ppl",
                            "path": "ppl.jsonl",
                            "kind": "perplexity",
                            "tag": "general",
                        },
                    ],
                    "probe": "probe.txt",
                },
            }
        )
    )
    for out in ("one", "two"):  # three trained stages: the base moved a little, three ways
        for i, (arm, stage) in enumerate(
            [("mixcpt", "cpt"), ("mixcpt", "sft"), ("baseline", "cpt")]
        ):
            torch.manual_seed(i)
            model = type(tiny_model)(tiny_model.config)
            model.load_state_dict(tiny_model.state_dict())
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            model.save_pretrained(tmp_path / out / arm / stage)
            tiny_tokenizer.save_pretrained(tmp_path / out / arm / stage)
    assert main(["eval", str(config), "--output", str(tmp_path / "one")]) == 0
    proc = torchrun("-m", "mixcpt.cli", "eval", config, "--output", tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (
        json.loads((tmp_path / out / "results.json").read_text())["eval"] for out in ("one", "two")
    )
    assert sum(r["status"] == "ok" for r in two["rows"]) == 4
    for rank in (0, 1):  # the four models (base included) dealt out two by two
        assert f"mixcpt: eval: process {rank} of 2 scores 2 of the 4 models" in proc.stdout
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert (a["arm"], a["stage"], a["status"]) == (b["arm"], b["stage"], b["status"])
        # the same numbers (one thread per process there, two here: float rounding differs)
        assert flat(b) == pytest.approx(flat(a), rel=1e-4, abs=1e-6)


def flat(value, key: str = "") -> dict:
    """A row's numbers as {"scores.mc.acc": 0.5, ...} (None and strings left out)."""
    if isinstance(value, dict):
        return {
            k: v for name, item in value.items() for k, v in flat(item, f"{key}.{name}").items()
        }
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{key}.{i}").items()}
    return {key: float(value)} if isinstance(value, (int, float)) else {}
