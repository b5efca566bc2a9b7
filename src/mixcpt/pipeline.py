"""The stages in order, for both arms. Each stage skips work already done, so rerunning the
pipeline after an interruption resumes where it stopped (a stage in progress resumes from its
last checkpoint)."""

from __future__ import annotations

from mixcpt.config import Config
from mixcpt.rundir import RunDir

STAGES = ("data", "cpt", "select", "sft", "dpo", "eval", "report")


def arms(cfg: Config) -> list[str]:
    """The arms this config trains: Mix-CPT, plus the traditional baseline when enabled."""
    return ["mixcpt", "baseline"] if cfg.baseline.enabled else ["mixcpt"]


# Stages that are one process's work: under a launcher (torchrun, accelerate launch) the main
# process runs them while the others wait, instead of every process writing the same folders.
SINGLE_PROCESS = ("data", "select", "eval", "report")


def run_stage(stage: str, cfg: Config, run: RunDir, arm: str | None = None) -> None:
    """Run one stage (for `arm`, or every arm the stage applies to). Training stages run on every
    process of a distributed launch; the others on the main process only."""
    from accelerate import PartialState

    from mixcpt.malloc_tuning import keep_freed_memory

    # chunk-sized temporaries are reused, not faulted in afresh (see its module)
    keep_freed_memory()
    state = PartialState()
    if state.is_main_process:
        from mixcpt.models import ensure_base_model

        # a GGUF base is converted once into run.base; else a no-op
        ensure_base_model(cfg.model, run.base)
    state.wait_for_everyone()
    if stage in SINGLE_PROCESS and not state.is_main_process:
        state.wait_for_everyone()
        return
    _run_stage(stage, cfg, run, arm)
    if stage in SINGLE_PROCESS:
        state.wait_for_everyone()


def _run_stage(stage: str, cfg: Config, run: RunDir, arm: str | None) -> None:
    # Imports are local so that `mixcpt data` does not pay for importing the training stack.
    if stage == "data":
        from mixcpt.data.stage import run_data

        run_data(cfg, run)
    elif stage == "cpt":
        from mixcpt.train.stage import run_cpt

        for a in [arm] if arm else arms(cfg):
            run_cpt(cfg, run, a)
    elif stage == "select":
        from mixcpt.align.select import run_select

        run_select(cfg, run)
    elif stage == "sft":
        from mixcpt.align.sft import run_sft

        for a in [arm] if arm else arms(cfg):
            run_sft(cfg, run, a)
    elif stage == "dpo":
        from mixcpt.align.dpo import run_dpo

        if not cfg.data.preferences:  # nothing to prefer: the run ends with SFT
            return
        for a in [arm] if arm else arms(cfg):
            if a == "mixcpt" or cfg.baseline.dpo:
                run_dpo(cfg, run, a)
    elif stage == "eval":
        from mixcpt.evaluate.stage import run_eval

        run_eval(cfg, run)
    elif stage == "report":
        from mixcpt.report import write_report

        write_report(run)
    else:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")


def run_pipeline(cfg: Config, run: RunDir) -> None:
    """Every stage in order: data, stage 1 (both arms), selection, SFT, DPO, evaluation, report."""
    for stage in STAGES:
        run_stage(stage, cfg, run)
