"""The stages in order, for every arm. Each stage reuses an output built from the same inputs and
rebuilds one whose inputs changed, with everything after it (mixcpt.fingerprints), so rerunning
the pipeline after an interruption resumes where it stopped (a stage in progress resumes from its
last checkpoint) and rerunning it after a config change redoes exactly what the change affects."""

from __future__ import annotations

import importlib
import json
from functools import partial

from mixcpt.config import Config
from mixcpt.config.arms import Arm, find_arm, resolve_arms
from mixcpt.errors import ConfigError
from mixcpt.rundir import RunDir
from mixcpt.stage_inputs import cpt_settings, select_settings

STAGES = ("data", "cpt", "select", "sft", "dpo", "eval", "report")


def arms(cfg: Config) -> list[Arm]:
    """The arms this config trains, in the configured order (mixcpt.config.arms)."""
    return resolve_arms(cfg)


def owners(cfg: Config) -> tuple[dict[str, str], dict[str, str | None]]:
    """({arm: the arm whose stage-1 model it uses}, {arm: the arm whose selection it aligns on,
    None on the whole pool}). The owner is the first arm (in the configured order) with the same
    settings: for stage 1 those that change its model (stream, loss, teacher, training, as
    mixcpt.stage_inputs counts them), for a selection the stage-1 model and the `select` settings.
    An arm that differs from every earlier one owns its own. A merge arm owns its merged model
    (merges of one stage-1 model at one λ share it) and aligns on nothing (None)."""
    stage1, selection, seen = {}, {}, {}
    trained = [arm for arm in arms(cfg) if not arm.merge_of]
    for arm in trained:
        key = json.dumps(["cpt", cpt_settings(arm)], sort_keys=True)
        stage1[arm.name] = seen.setdefault(key, arm.name)
    for arm in arms(cfg):
        if arm.merge_of:
            key = json.dumps(["merge", stage1[arm.merge_of], cpt_settings(arm)], sort_keys=True)
            stage1[arm.name] = seen.setdefault(key, arm.name)
    for arm in arms(cfg):
        if arm.merge_of or arm.align_on == "pool":
            selection[arm.name] = None
            continue
        key = json.dumps(["select", stage1[arm.name], select_settings(arm.config)], sort_keys=True)
        selection[arm.name] = seen.setdefault(key, arm.name)
    return stage1, selection


def _owner(cfg: Config, arm: str, stage: str) -> str | None:
    stage1, selection = owners(cfg)
    if arm not in stage1:
        find_arm(cfg, arm)  # raises the ConfigError that names the configured arms
    return (stage1 if stage == "cpt" else selection)[arm]


def stage1_owner(cfg: Config, arm: str) -> str:
    """The arm whose stage-1 model `arm` uses (`owners`); a ConfigError for an unknown arm."""
    return _owner(cfg, arm, "cpt")


def selection_owner(cfg: Config, arm: str) -> str | None:
    """The arm whose selection `arm` aligns on, None when it aligns on the whole pool
    (`owners`); a ConfigError for an unknown arm."""
    return _owner(cfg, arm, "select")


def stage_arms(cfg: Config, stage: str) -> list[str]:
    """The arms that build `stage` ("cpt", "select", "sft" or "dpo") themselves: stage 1 and
    selection once per distinct setting (the others share them; merge arms' stage 1 after the
    trained ones, whose models they read), SFT every arm but merges, DPO the arms with `run_dpo`
    when there is preference data."""
    merges = {a.name for a in arms(cfg) if a.merge_of}
    names = [a.name for a in arms(cfg) if a.name not in merges]
    if stage in ("cpt", "select"):
        shared = owners(cfg)[0 if stage == "cpt" else 1]
        listed = names + [a for a in shared if a in merges] if stage == "cpt" else names
        return [a for a in listed if shared[a] == a]
    if stage != "dpo":
        return names
    if not cfg.data.preferences:  # nothing to prefer: the run ends with SFT
        return []
    return [a.name for a in arms(cfg) if a.run_dpo]


def builder(cfg: Config, stage: str, arm: str) -> str | None:
    """The arm whose output of `stage` ("cpt", "select", "sft", "dpo") `arm` uses: itself, the
    arm it shares stage 1 or its selection with, or None when `arm` has no such stage (no
    selection on the whole pool, no DPO)."""
    if stage == "cpt":
        return stage1_owner(cfg, arm)
    if stage == "select":
        return selection_owner(cfg, arm)
    return arm if arm in stage_arms(cfg, stage) else None


# Stages that are one process's work: under a launcher (torchrun, accelerate launch) the main
# process runs them while the others wait (however long: processes.main_process_runs), instead
# of every process writing the same folders.
SINGLE_PROCESS = ("data", "report")


def run_stage(
    stage: str,
    cfg: Config,
    run: RunDir,
    arm: str | None = None,
    force: bool = False,
    check: bool = True,
) -> None:
    """Run one stage (for `arm`, or every arm the stage applies to); `force` rebuilds it even when
    its output is current. Under a distributed launch data and report run on the main process
    only (SINGLE_PROCESS); the others on every process: training, the teacher cache and the
    scoring of select and eval shared out.

    Every process first runs the checks of mixcpt.checks (each fails the same way, so none is
    left waiting at a barrier), unless `check` is False: the caller has just run them."""
    if check:
        from mixcpt.checks import check_config

        check_config(cfg, run.base)
    from mixcpt.fingerprints import assess
    from mixcpt.malloc_tuning import keep_freed_memory
    from mixcpt.processes import main_process_runs, process_state

    # chunk-sized temporaries are reused, not faulted in afresh (see its module)
    keep_freed_memory()
    state = process_state(cfg)  # the process group's first use: its timeout comes from cfg

    def prepare() -> None:
        from mixcpt.models import ensure_base_model

        # a GGUF base is converted once into run.base; else a no-op
        ensure_base_model(cfg.model, run.base)
        # hashes every input file once (a large model takes a while), before the other processes
        # of a launch read the same hashes from the cache
        assess(cfg, run)

    # the other processes wait for the main one by polling, however long it takes (processes)
    main_process_runs(state, run.root / ".work", "prepare", prepare)
    if stage in SINGLE_PROCESS:
        main_process_runs(
            state, run.root / ".work", stage, partial(_run_stage, stage, cfg, run, arm, force)
        )
        return
    _run_stage(stage, cfg, run, arm, force)


# stage -> (module, function, whether it runs once per arm). Modules are imported when their stage
# runs, so that `mixcpt data` does not pay for importing the training stack.
STAGE_FUNCTIONS = {
    "data": ("mixcpt.data.stage", "run_data", False),
    # not in STAGES: stage 1 builds the cache itself; `mixcpt cache` builds it alone
    "cache": ("mixcpt.train.stage", "run_cache", False),
    "cpt": ("mixcpt.train.stage", "run_cpt", True),
    "select": ("mixcpt.align.select", "run_select", True),
    "sft": ("mixcpt.align.sft", "run_sft", True),
    "dpo": ("mixcpt.align.dpo", "run_dpo", True),
    "eval": ("mixcpt.evaluate.stage", "run_eval", False),
    "report": ("mixcpt.report", "run_report", False),
}


def _run_stage(stage: str, cfg: Config, run: RunDir, arm: str | None, force: bool) -> None:
    """The stage's function, once or per arm, each call timed into results.json (mixcpt.timing)."""
    from mixcpt.timing import timed

    if stage not in STAGE_FUNCTIONS:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    module, name, per_arm = STAGE_FUNCTIONS[stage]
    function = getattr(importlib.import_module(module), name)
    if not per_arm:
        timed(cfg, run, stage, partial(function, cfg, run, force))
        return
    merges = {a.name for a in arms(cfg) if a.merge_of} if stage == "cpt" else set()
    for a in _chosen_arms(cfg, stage, arm):
        build = function
        if a in merges:  # a merge arm's stage 1 is built without training
            from mixcpt.merge import run_merge as build
        timed(cfg, run, f"{stage}/{a}", partial(build, cfg, run, a, force))


def _chosen_arms(cfg: Config, stage: str, arm: str | None) -> list[str]:
    """The arms `stage` runs for: those that build it under this config, or the one whose output
    `arm` uses (--arm). Says which arm's output each other arm shares."""
    from mixcpt.processes import process_state

    names = [a.name for a in arms(cfg)]
    if arm is not None and arm not in names:
        listed = ", ".join(names)
        raise ConfigError(f"--arm {arm}: this config trains no such arm (its arms: {listed})")
    chosen = []
    for a in [arm] if arm is not None else names:
        built_by = builder(cfg, stage, a)
        if built_by is not None and built_by not in chosen:
            chosen.append(built_by)
        if built_by not in (None, a) and process_state().is_main_process:
            what = "stage-1 settings" if stage == "cpt" else "stage-1 model and select settings"
            print(f"mixcpt: {stage}/{a}: shares {stage}/{built_by} (the same {what})", flush=True)
    return chosen


def run_pipeline(cfg: Config, run: RunDir, force: str | None = None, check: bool = True) -> None:
    """Every stage in order: data, stage 1, selection, SFT, DPO (each for every arm), evaluation,
    report.

    `force` names a stage to rebuild even when its output is current; the stages after it are
    rebuilt too, since they read its new output. The checks of mixcpt.checks run once, first,
    unless `check` is False (the caller has just run them)."""
    if check:
        from mixcpt.checks import check_config

        check_config(cfg, run.base)
    for stage in STAGES:
        run_stage(stage, cfg, run, force=stage == force, check=False)
