"""`mixcpt plan` (mixcpt.plan): the estimate's inputs are exact where they can be (parameter and
LoRA counts, the teacher cache's layout), and the command says what does not fit."""

import math
from pathlib import Path

import numpy as np
import pytest
from peft import LoraConfig, get_peft_model

from mixcpt.cli import main
from mixcpt.config import config_from_dict, load_config
from mixcpt.data.packing import PackedBlocks, write_packed
from mixcpt.errors import ConfigError
from mixcpt.plan import count_tokens, detect_launch, disk_bytes, model_shape, plan
from mixcpt.rundir import RunDir
from mixcpt.train.teacher_cache import build_teacher_cache

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def tiny_config(tmp_path, model_dir, **cpt):
    (tmp_path / "d.txt").write_text("x" * 4000)  # about 1000 tokens at 4 bytes each
    return config_from_dict(
        {
            "model": {"path": str(model_dir)},
            "data": {"domain": [{"path": "d.txt"}], "block_size": 16},
            "cpt": {"lora": {"r": 4}, **cpt},
        },
        tmp_path,
    )


def test_quickstart_plan_prints_every_stage(capsys):
    assert main(["plan", str(EXAMPLES / "quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    for stage in ("cpt/mixcpt", "cpt/baseline", "select", "sft", "dpo", "eval"):
        assert any(line.startswith(stage) and "fits" in line for line in out.splitlines()), out
    assert "the CPU" in out and "model folders" in out and "checkpoints" in out


def test_parameter_and_lora_counts_are_the_real_models(tmp_path, tiny_model, tiny_model_dir):
    shape = model_shape(tiny_config(tmp_path, tiny_model_dir))
    assert shape.params == sum(p.numel() for p in tiny_model.parameters())
    peft = get_peft_model(tiny_model, LoraConfig(r=4, target_modules="all-linear"))
    assert shape.lora_params == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert (shape.layers, shape.hidden, shape.vocab) == (2, 32, tiny_model.config.vocab_size)


def test_teacher_cache_size_is_the_files_size(tmp_path, tiny_model, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, teacher="cache", cache_top_k=8)
    n_tokens = 5 * 16 - 3  # 5 blocks, the last one padded
    run = RunDir(tmp_path / "run")
    ids = np.arange(5 * 16).reshape(5, 16) % tiny_model.config.vocab_size
    write_packed(run.data / "mix", ids, ids % 16, n_tokens, 0, "fp")
    predicted = plan(cfg, run, gpu_memory_gib=1).disk.teacher_cache  # from the data stage's tokens
    build_teacher_cache(
        tiny_model, PackedBlocks(run.data / "mix"), run.root / "teacher_cache", 8, 1.0
    )
    files = [run.root / "teacher_cache" / n for n in ("ids.npy", "logprobs.npy", "tail.npy")]
    assert predicted == sum(np.load(f, mmap_mode="r").nbytes for f in files)
    # once built, the files' sizes (with their .npy headers) are read
    on_disk = sum(f.stat().st_size for f in files)
    assert plan(cfg, run, gpu_memory_gib=1).disk.teacher_cache == on_disk


def test_paper_math_cache_and_what_does_not_fit_on_8_gpus():
    cfg = load_config(EXAMPLES / "paper" / "math.yaml")
    p = plan(cfg, gpus=8, gpu_memory_gib=80)
    assert p.shape.params == 8_030_261_248  # Llama-3-8B, from its config.json's architecture
    # per position: 64 int32 ids + 64 float16 log-probs + a float32 tail = 388 bytes
    positions = math.ceil(1e9 / 4096) * 4095
    assert p.disk.teacher_cache == positions * 388
    assert 387e9 < p.disk.teacher_cache < 389e9
    assert p.launch.mode == "ddp" and "default" in p.launch.source
    # full fine-tuning with float32 masters and AdamW under DDP cannot fit 80 GiB; sharding can
    assert "cpt/mixcpt" in p.advice and "FSDP" in p.advice["cpt/mixcpt"]
    fsdp = plan(cfg, gpus=8, gpu_memory_gib=80, mode="fsdp")
    cpt = next(m for m in fsdp.stages if m.stage == "cpt/mixcpt")
    assert "cpt/mixcpt" not in fsdp.advice and cpt.peak < 80 * 2**30
    folders = 6 * 2 * p.shape.params  # cpt, sft, dpo of both arms, bfloat16
    assert p.disk.total == p.disk.teacher_cache + 3 * p.disk.checkpoints["cpt/mixcpt"] + folders
    assert disk_bytes(cfg) == plan(cfg, gpu_memory_gib=80).disk.total  # this machine's launch


def test_paper_plan_from_the_command_line_names_the_fix(capsys):
    path = EXAMPLES / "paper" / "math.yaml"
    assert main(["plan", str(path), "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "Fits with:" in out
    assert "teacher cache  387.9 GB" in out


def test_launch_from_flag_accelerate_file_and_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    launch = detect_launch(mode=str(EXAMPLES / "distributed" / "deepspeed_zero3.yaml"))
    assert (launch.mode, launch.gpus) == ("zero3", 8)
    assert detect_launch(gpus=4, mode="zero2").mode == "zero2"
    assert detect_launch(gpus=0).mode == "single"  # the CPU: one process
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert detect_launch(gpus=2).mode == "fsdp"


def test_plan_and_check_read_a_deepspeed_launch_alike(monkeypatch):
    """`mixcpt plan` and `mixcpt check` agree on the launch: the DeepSpeed config file's stage
    wins over the launcher's option, and a stage DeepSpeed does not have is a config error."""
    from mixcpt.checks import weight_sharding
    from mixcpt.config import TrainingConfig

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv(
        "ACCELERATE_DEEPSPEED_CONFIG_FILE", str(EXAMPLES / "distributed" / "ds_zero3.json")
    )
    assert detect_launch(gpus=2).mode == "zero3"
    assert weight_sharding(TrainingConfig()) == "DeepSpeed ZeRO-3 (accelerate launch)"
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "4")
    for read in (lambda: detect_launch(gpus=2), lambda: weight_sharding(TrainingConfig())):
        with pytest.raises(ConfigError, match="^ACCELERATE_DEEPSPEED_ZERO_STAGE: the ZeRO stage"):
            read()


def test_tokens_estimated_from_file_sizes(tmp_path, tiny_model_dir):
    tokens = count_tokens(tiny_config(tmp_path, tiny_model_dir))
    assert tokens.mix == tokens.domain == 1000 and "file sizes" in tokens.source


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_lowers_the_paper_sft_peak(checkpointing):
    cfg = load_config(EXAMPLES / "paper" / "math.yaml")
    cfg.sft.training.gradient_checkpointing = checkpointing
    sft = next(
        m for m in plan(cfg, gpus=8, mode="fsdp", gpu_memory_gib=80).stages if m.stage == "sft"
    )
    assert sft.activations == (
        sft.activations_checkpointed if checkpointing else sft.activations_full
    )
    assert sft.activations_checkpointed < sft.activations_full / 5


@pytest.mark.parametrize("mode", ["fsdp", "zero3"])
def test_an_online_teacher_is_counted_sharded_where_the_student_is(mode):
    cfg = load_config(EXAMPLES / "paper" / "math.yaml")
    cfg.cpt.teacher = "online"
    replica = 2 * 8_030_261_248  # the bfloat16 teacher, whole on every GPU under DDP and ZeRO-2

    def cpt(mode: str):
        stages = plan(cfg, gpus=8, gpu_memory_gib=80, mode=mode).stages
        return next(m for m in stages if m.stage == "cpt/mixcpt")

    def frozen(mode: str) -> int:
        return cpt(mode).frozen

    assert frozen("zero2") == replica
    # before the first step the whole float32 student and the whole teacher sit on each GPU
    assert cpt(mode).peak >= 8_030_261_248 * (4 + 2)
    # an eighth of it, plus the units its forward gathers
    assert replica / 8 < frozen(mode) < replica / 2
