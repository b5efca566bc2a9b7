"""The checks before anything runs (mixcpt.checks): each passes on a good config and fails with one
line naming the key; `mixcpt check` prints one line per check; a run that fails one writes nothing.
The CLI's refusals of each are in tests/bad_inputs/cases.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mixcpt.checks import check_config, run_checks, weight_sharding
from mixcpt.cli import main
from mixcpt.config import SourceConfig, TrainingConfig, config_from_dict, load_config
from mixcpt.demo.run import demo_config
from mixcpt.demo.world import write_world
from mixcpt.errors import ConfigError, InputError
from mixcpt.pipeline import run_pipeline, run_stage
from mixcpt.rundir import RunDir

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
LAUNCHER_VARS = (
    "ACCELERATE_USE_FSDP",
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
)


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    """As a plain process: no launcher variables, whatever the test runner's environment holds."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def base_tokenizer(tmp_path, tiny_tokenizer) -> Path:
    """The tiny tokenizer without a chat template, as a base model's (Llama-3-8B) comes."""
    folder = tmp_path / "base-tokenizer"
    tiny_tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink()
    return folder


@pytest.fixture
def configure(tmp_path, tiny_model_dir):
    """configure(**sections) -> a Config of the tiny model with one small file per data group;
    each keyword replaces or extends that section."""
    rows = {
        "domain.jsonl": {"text": "The planet Zorbax orbits Vega."},
        "instructions.jsonl": {"instruction": "Where is Zorbax?", "output": "Near Vega."},
        "preferences.jsonl": {"prompt": "Where is Zorbax?", "chosen": "Vega.", "rejected": "Mars."},
    }
    for name, row in rows.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")

    def make(**sections):
        raw = {
            "model": {"path": str(tiny_model_dir)},
            "data": {
                "domain": [{"path": "domain.jsonl"}],
                "instructions": [{"path": "instructions.jsonl"}],
                "preferences": [{"path": "preferences.jsonl"}],
                "block_size": 64,
            },
        }
        for key, value in sections.items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
        return config_from_dict(raw, tmp_path)

    return make


def outcomes(cfg, run_base=None) -> dict[str, tuple[bool, str]]:
    return {name: (passed, line) for name, passed, line in run_checks(cfg, run_base)}


def test_the_shipped_configs_pass_every_check(tmp_path, tiny_model_dir):
    """The quickstart as it is, and the demo's config over its world (the demo's base stands in: a
    tiny Llama whose tokenizer is the demo's kind, with the demo's chat template)."""
    for name, (passed, line) in outcomes(load_config(QUICKSTART)).items():
        assert passed, f"{name}: {line}"

    run = RunDir(tmp_path / "demo")
    write_world(run.root / "world", seed=0, size="quick")
    tiny_model_dir.rename(run.base)
    cfg = config_from_dict(demo_config(run, quick=True, seed=0), root=run.root)
    for name, (passed, line) in outcomes(cfg, run.base).items():
        assert passed, f"{name}: {line}"


def write_config(path: Path, model: dict, **data) -> Path:
    """A YAML config of `model` and one domain source, domain.jsonl, beside it."""
    data = {"domain": [{"path": "domain.jsonl"}], **data}
    path.write_text(yaml.safe_dump({"model": model, "data": data}))
    return path


def test_mixcpt_check_prints_one_line_per_check_and_exits_0_or_2(
    tmp_path, configure, base_tokenizer, capsys
):
    good = write_config(tmp_path / "good.yaml", {"path": "tiny-llama"})
    assert main(["check", str(good)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "ok    config",
        "ok    model",
        "ok    tokenizer",
        "ok    context length",
        "ok    chat template",
        "ok    teacher",
        "ok    input files",
        "ok    disk",
    ]

    model = {"path": "tiny-llama", "tokenizer": "base-tokenizer"}
    bad = write_config(tmp_path / "bad.yaml", model, block_size=4096)
    assert main(["check", str(bad)]) == 2
    lines = capsys.readouterr().out.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert failed == [
        "FAIL  context length: data.block_size 4096: longer than the model's context of 1024 "
        f"tokens (max_position_embeddings of {tmp_path / 'tiny-llama'}); set at most 1024",
        f"FAIL  chat template: sft.chat_template: the tokenizer of {tmp_path / 'base-tokenizer'} "
        "has no chat template; set sft.chat_template to a Jinja template or one of chatml, llama3",
    ]
    assert len(lines) == 8

    assert main(["check", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file does not exist" in capsys.readouterr().err


def test_a_check_that_needs_what_failed_is_skipped_not_repeated(configure, tmp_path):
    (tmp_path / "not-a-model").mkdir()
    cfg = configure(model={"path": str(tmp_path / "not-a-model"), "tokenizer": "tiny-llama"})
    results = outcomes(cfg)
    assert not results["model"][0]
    assert results["model"][1].startswith(
        f"model.path: {tmp_path / 'not-a-model'}: no model configuration to read ("
    )
    assert results["tokenizer"] == (False, "skipped (see above)")
    assert results["context length"] == (False, "skipped (see above)")
    assert results["chat template"][0] and results["input files"][0]  # those need no model


def test_a_run_that_fails_a_check_writes_nothing(configure, base_tokenizer, tmp_path):
    cfg = configure(model={"tokenizer": str(base_tokenizer)})
    out = tmp_path / "out"
    for run in (
        lambda: run_pipeline(cfg, RunDir(out)),
        lambda: run_stage("data", cfg, RunDir(out)),
    ):
        with pytest.raises(ConfigError, match="sft.chat_template: the tokenizer of"):
            run()
        assert not out.exists()

    model = {"path": "tiny-llama", "tokenizer": "base-tokenizer"}
    assert main(["run", str(write_config(tmp_path / "c.yaml", model)), "--output", str(out)]) == 2
    assert not out.exists()  # no folder, no lock file, no data


def test_a_named_template_serves_a_base_model(configure, base_tokenizer):
    for name in ("chatml", "llama3"):
        cfg = configure(model={"tokenizer": str(base_tokenizer)}, sft={"chat_template": name})
        assert outcomes(cfg)["chat template"] == (
            True,
            "sft.chat_template; its generation prompt is a prefix of the chat",
        )


@pytest.mark.parametrize(
    "template, message",
    [
        (
            "{% for m in messages %}{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}Answer:{% endif %}",
            "the chat template renders the prompt differently once the assistant turn is added",
        ),
        (
            "{% for m in messages if m['role'] == 'user' %}{{ m['content'] }}{% endfor %}",
            "sft.chat_template chat template leaves out the assistant's answer",
        ),
        (
            "{{ raise_exception('system turns only') }}",
            "sft.chat_template chat template fails on a user turn and its answer: "
            "TemplateError: system turns only",
        ),
    ],
)
def test_a_template_that_cannot_serve_sft_is_refused(configure, base_tokenizer, template, message):
    cfg = configure(model={"tokenizer": str(base_tokenizer)}, sft={"chat_template": template})
    with pytest.raises(ConfigError, match="^sft.chat_template: ") as err:
        check_config(cfg)
    assert message in str(err.value)


def test_context_length_counts_the_stages_that_run(configure, tmp_path, tiny_model_dir):
    cfg = configure(data={"block_size": 64}, dpo={"max_length": 2048})
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert str(err.value).startswith("dpo.max_length 2048: longer than the model's context of 1024")

    # without preference data there is no DPO; with nothing to evaluate, no eval.max_length
    cfg = configure(dpo={"max_length": 2048}, eval={"max_length": 4096})
    cfg.data.preferences = []
    assert outcomes(cfg)["context length"] == (
        True,
        "data.block_size, select.max_length, sft.max_length within the model's 1024 positions",
    )
    cfg.eval.probe = str(tmp_path / "domain.jsonl")
    with pytest.raises(ConfigError, match=r"^eval.max_length 4096: longer"):
        check_config(cfg)

    # defaults are named as such: the user may not know the key is there to set
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(
        json.dumps({**config, "max_position_embeddings": 512})
    )
    with pytest.raises(ConfigError) as err:
        check_config(configure())
    assert str(err.value).startswith(
        "select.max_length 1024 (default), sft.max_length 1024 (default), dpo.max_length 1024 "
        "(default): longer than the model's context of 512 tokens"
    )
    # a state-space model has no position limit to state
    mamba = tmp_path / "mamba"
    mamba.mkdir()
    (mamba / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 1024}))
    cfg = configure(model={"path": str(mamba), "tokenizer": str(tiny_model_dir)})
    assert outcomes(cfg)["context length"] == (
        True,
        "the model states no max_position_embeddings: not checked",
    )


def test_an_arms_own_length_is_checked_under_its_key(configure):
    long_sft = {"name": "long", "like": "mixcpt", "sft": {"max_length": 2048}}
    with pytest.raises(ConfigError) as err:
        check_config(configure(arms=["mixcpt", long_sft]))
    assert str(err.value).startswith("arms.long.sft.max_length 2048: longer than the model's")


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(configure, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(json.dumps({**config, "vocab_size": 64}))
    with pytest.raises(ConfigError, match=r"^model.tokenizer: the tokenizer has \d+ tokens but"):
        check_config(configure())


def test_weight_sharding_is_read_from_the_launcher_environment(monkeypatch, tmp_path):
    training = TrainingConfig()
    assert weight_sharding(training) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert weight_sharding(training) == "FSDP (accelerate launch)"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert weight_sharding(training) is None  # accelerate's default stage is 2
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert weight_sharding(training) == "DeepSpeed ZeRO-3 (accelerate launch)"
    examples = Path(__file__).resolve().parents[1] / "examples" / "distributed"
    # a config file's stage wins over the launcher's option, as in accelerate
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(examples / "ds_zero2.json"))
    assert weight_sharding(training) is None
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(examples / "ds_zero3.json"))
    assert weight_sharding(training) == "DeepSpeed ZeRO-3 (accelerate launch)"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="^ACCELERATE_DEEPSPEED_CONFIG_FILE: cannot read"):
        weight_sharding(training)


def test_only_the_lora_teacher_is_refused_under_sharded_weights(configure, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert outcomes(configure(cpt={"teacher": "online"}))["teacher"] == (
        True,
        "online, FSDP (accelerate launch)",
    )
    with pytest.raises(ConfigError, match="^cpt.teacher: lora is not supported under FSDP"):
        check_config(configure(cpt={"teacher": "lora"}))


def test_input_files_first_records_benchmarks_and_probe(configure, tmp_path):
    (tmp_path / "preferences.jsonl").write_text('{"prompt": "Q?", "chosen": "A."}\n')
    with pytest.raises(InputError, match=r"preferences.jsonl:1: missing field 'rejected'"):
        check_config(configure())
    cfg = configure(data={"preferences": []})
    # only the first record is read: the data stage finds a bad later line as it streams
    (tmp_path / "domain.jsonl").write_text('{"text": "fine"}\nnot json\n')
    cfg.data.domain.append(SourceConfig(path="org/a-dataset", format="hf"))  # left to the stage
    assert outcomes(cfg)["input files"] == (
        True,
        "2 data sources (first record), 0 benchmarks, 1 from the hub, left to the data stage",
    )
    (tmp_path / "probe.txt").write_bytes(b"general text \xff")
    cfg.eval.probe = str(tmp_path / "probe.txt")
    with pytest.raises(InputError, match=r"probe.txt:1: not valid UTF-8"):
        check_config(cfg)


def test_too_little_disk_for_the_plan_is_a_warning_not_a_failure(
    configure, tmp_path, monkeypatch, capsys
):
    """The run's disk estimate (teacher cache, checkpoints, model folders: `mixcpt plan`) is
    compared with the free space where the run folder goes; too little warns and the run goes on."""
    import mixcpt.checks as checks
    from mixcpt.plan import disk_bytes

    cfg = configure(cpt={"teacher": "cache"})
    needed = disk_bytes(cfg)
    assert needed > 0
    run_base = RunDir(tmp_path / "run").base  # not made yet: its nearest existing parent counts
    passed, line = outcomes(cfg, run_base)["disk"]
    assert (
        passed and line.startswith(f"{needed / 1e9:.3g} GB more at most") and str(tmp_path) in line
    )

    free = type("Usage", (), {"free": needed // 2})
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: free)
    passed, line = outcomes(cfg, run_base)["disk"]
    assert passed and line.startswith(f"warning: the run may need {needed / 1e9:.3g} GB more")
    check_config(cfg, run_base)  # does not raise
    assert "mixcpt: warning: the run may need" in capsys.readouterr().err

    # a rerun: what the run folder holds already is not asked for again
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "outputs.bin").write_bytes(bytes(needed - needed // 4))
    passed, line = outcomes(cfg, run_base)["disk"]
    assert passed and line.startswith(f"{needed // 4 / 1e9:.3g} GB more at most"), line
