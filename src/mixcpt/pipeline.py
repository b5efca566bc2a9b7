"""The stages in order, for both arms. Each stage reuses an output built from the same inputs and
rebuilds one whose inputs changed, with everything after it (mixcpt.fingerprints), so rerunning
the pipeline after an interruption resumes where it stopped (a stage in progress resumes from its
last checkpoint) and rerunning it after a config change redoes exactly what the change affects."""

from __future__ import annotations

import importlib
from functools import partial

from mixcpt.config import Config, CPTConfig
from mixcpt.errors import ConfigError
from mixcpt.rundir import RunDir

STAGES = ("data", "cpt", "select", "sft", "dpo", "eval", "report")


def arms(cfg: Config) -> list[str]:
    """The arms this config trains: Mix-CPT, plus the traditional baseline when enabled."""
    return ["mixcpt", "baseline"] if cfg.baseline.enabled else ["mixcpt"]


def stage_arms(cfg: Config, stage: str) -> list[str]:
    """The arms that train `stage` ("cpt", "sft" or "dpo") under this config: DPO needs preference
    data, and the baseline runs it only with `baseline.dpo`."""
    if stage != "dpo":
        return arms(cfg)
    if not cfg.data.preferences:  # nothing to prefer: the run ends with SFT
        return []
    return [a for a in arms(cfg) if a == "mixcpt" or cfg.baseline.dpo]


def arm_cpt_config(cfg: Config, arm: str) -> CPTConfig:
    """cfg.cpt for "mixcpt"; for "baseline" the same settings with plain CE and no teacher."""
    if arm == "mixcpt":
        return cfg.cpt
    return cfg.cpt.model_copy(update={"ce_weight": 1.0, "lssd_weight": 0.0})


# Stages that are one process's work: under a launcher (torchrun, accelerate launch) the main
# process runs them while the others wait, instead of every process writing the same folders.
SINGLE_PROCESS = ("data", "select", "eval", "report")


def run_stage(
    stage: str,
    cfg: Config,
    run: RunDir,
    arm: str | None = None,
    force: bool = False,
    check: bool = True,
) -> None:
    """Run one stage (for `arm`, or every arm the stage applies to); `force` rebuilds it even when
    its output is current. Training stages run on every process of a distributed launch; the
    others on the main process only.

    Every process first runs the checks of mixcpt.checks (each fails the same way, so none is
    left waiting at a barrier), unless `check` is False: the caller has just run them."""
    if check:
        from mixcpt.checks import check_config

        check_config(cfg, run.base)
    from mixcpt.fingerprints import assess
    from mixcpt.malloc_tuning import keep_freed_memory
    from mixcpt.processes import process_state

    # chunk-sized temporaries are reused, not faulted in afresh (see its module)
    keep_freed_memory()
    state = process_state(cfg)  # the process group's first use: its timeout comes from cfg
    if state.is_main_process:
        from mixcpt.models import ensure_base_model

        # a GGUF base is converted once into run.base; else a no-op
        ensure_base_model(cfg.model, run.base)
        # hashes every input file once (a large model takes a while), before the other processes
        # of a launch read the same hashes from the cache
        assess(cfg, run)
    state.wait_for_everyone()
    if stage in SINGLE_PROCESS and not state.is_main_process:
        state.wait_for_everyone()
        return
    _run_stage(stage, cfg, run, arm, force)
    if stage in SINGLE_PROCESS:
        state.wait_for_everyone()


# stage -> (module, function, whether it runs once per arm). Modules are imported when their stage
# runs, so that `mixcpt data` does not pay for importing the training stack.
STAGE_FUNCTIONS = {
    "data": ("mixcpt.data.stage", "run_data", False),
    # not in STAGES: stage 1 builds the cache itself; `mixcpt cache` builds it alone
    "cache": ("mixcpt.train.stage", "run_cache", False),
    "cpt": ("mixcpt.train.stage", "run_cpt", True),
    "select": ("mixcpt.align.select", "run_select", False),
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
    for a in _chosen_arms(cfg, stage, arm):
        timed(cfg, run, f"{stage}/{a}", partial(function, cfg, run, a, force))


def _chosen_arms(cfg: Config, stage: str, arm: str | None) -> list[str]:
    """The arms `stage` runs for: those it trains under this config, or `arm` alone (--arm)."""
    if arm is not None and arm not in arms(cfg):
        raise ConfigError(f"--arm {arm}: this config does not train that arm (baseline.enabled)")
    return [a for a in stage_arms(cfg, stage) if arm in (None, a)]


def run_pipeline(cfg: Config, run: RunDir, force: str | None = None, check: bool = True) -> None:
    """Every stage in order: data, stage 1 (both arms), selection, SFT, DPO, evaluation, report.

    `force` names a stage to rebuild even when its output is current; the stages after it are
    rebuilt too, since they read its new output. The checks of mixcpt.checks run once, first,
    unless `check` is False (the caller has just run them)."""
    if check:
        from mixcpt.checks import check_config

        check_config(cfg, run.base)
    for stage in STAGES:
        run_stage(stage, cfg, run, force=stage == force, check=False)
