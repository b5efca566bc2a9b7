"""The `mixcpt` command line (design.md §3).

    mixcpt demo --output DIR [--quick] [--seeds N] [--arms A,B,...|all]
                                                the embedded synthetic-knowledge demo, end to end
    mixcpt run CONFIG --output DIR [--seeds N]  every stage in order
    mixcpt STAGE CONFIG --output DIR [--arm A]  one stage: data, cpt, select, sft, dpo, eval, report
    mixcpt status DIR [--config CONFIG]         each stage and arm: done, stale (why) or missing
    mixcpt check CONFIG [--output DIR]          what can be known without training (mixcpt.checks)
    mixcpt plan CONFIG [--gpus N] [--gpu-memory GiB] [--mode M] [--output DIR]
                                                memory per GPU per stage, disk, tokens; what fits

Exit codes: 0 done, 2 bad config or bad input (one line naming the file, line or key; also a run
folder in use by another mixcpt command), 1 anything else (a non-finite training loss and a full
disk are one line too; other failures show their traceback), 143 stopped by SIGTERM or SIGUSR1
(a training stage first saves a checkpoint; rerun the same command to resume).

--seeds N runs the whole pipeline once per seed in DIR/seed-<s> (each resumable as any run folder)
and writes DIR/results.json and DIR/report.{html,md} with means and 95% intervals over seeds and
items, and the claims' verdicts (mixcpt.evaluate.seeds).

One writer per run folder: every command holds `DIR/.mixcpt.lock` until it exits (mixcpt.runlock).
Stop signals: mixcpt.preempt.

Offline unless the config needs the hub (design.md §9): the demo, and any config whose model,
tokenizer, data and lm-eval tasks are all local, run with HF_HUB_OFFLINE=1 and
HF_DATASETS_OFFLINE=1, so nothing waits on or reaches the network; a config that names a hub id
leaves them as the user set them. Telemetry is always off.

`run` and the stage commands reuse every output built from the same inputs and rebuild the others
with everything after them, one line per stage and arm saying which and why (mixcpt.fingerprints),
and one when it is built saying how long it took and how much it processed (mixcpt.timing);
`run --force STAGE` and `STAGE --force` rebuild that stage even when it is current. `status` runs
nothing: it compares the run folder with DIR/config.yaml (the demo writes it) or `--config`.

`run` and the stage commands run the checks of `check` before they make or lock the run folder, so
a config that fails one stops with exit 2 and leaves nothing behind; `check` runs them alone, one
line per check, and exits 0 or 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

# Before anything imports huggingface_hub, which reads these once, at import.
for _var, _val in (("HF_HUB_DISABLE_TELEMETRY", "1"), ("TOKENIZERS_PARALLELISM", "true")):
    os.environ.setdefault(_var, _val)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

from mixcpt.config import Config  # noqa: E402
from mixcpt.errors import DiskFullError, UserError  # noqa: E402
from mixcpt.pipeline import STAGES  # noqa: E402
from mixcpt.preempt import EXIT_CODE, Preempted, deferred, stop_signals  # noqa: E402
from mixcpt.rundir import RunDir  # noqa: E402
from mixcpt.runlock import RunLock, is_rank_zero  # noqa: E402

# The commands that write a run folder, and so hold its lock.
WRITERS = ("demo", "run", "cache", *STAGES)


def _output_dir(path: str) -> Path:
    """The run folder named by --output (not created here); a file there is a UserError."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --output must be a folder, but a file is there")
    return out


def _config(args: argparse.Namespace) -> Config | None:
    """The command's run config (None for the demo, which writes its own). Read before the Hugging
    Face stack is imported: whether to go offline depends on it (see the module docstring)."""
    from mixcpt.config import hub_references, load_config

    cfg = load_config(args.config) if args.command != "demo" else None
    if cfg is None or not hub_references(cfg):
        for var, value in OFFLINE.items():
            os.environ.setdefault(var, value)
    return cfg


SEEDS_HELP = (
    "run the whole pipeline once per seed (the seed + 0..N-1) in DIR/seed-<s>, then write "
    "DIR/results.json and the report with the mean and 95%% interval of every score and the "
    "claims' verdicts"
)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _names(text: str) -> list[str]:
    """A comma-separated list of names (--arms)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one arm")
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixcpt", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="run the embedded synthetic-knowledge demo end to end (no download)"
    )
    demo.add_argument("--output", required=True, help="run folder")
    demo.add_argument(
        "--quick", action="store_true", help="a smaller world and fewer steps (about 2 minutes)"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed (the first, with --seeds)")
    demo.add_argument("--seeds", type=_positive, help=SEEDS_HELP)
    demo.add_argument(
        "--arms",
        type=_names,
        metavar="A,B,...",
        help="the arms to run instead of the demo config's: built-in names, ARM-merge-λ (ARM's "
        "stage-1 model merged toward the base with weight λ, e.g. mixcpt-merge-0.5), or all "
        "(every built-in arm, and mixcpt and traditional merged at 0.25, 0.5 and 0.75)",
    )
    commands = [("run", "run every stage in order")] + [(s, f"run the {s} stage") for s in STAGES]
    commands.insert(2, ("cache", "build stage 1's teacher cache alone (every process its share)"))
    for name, help_ in commands:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML run config")
        sp.add_argument("--output", required=True, help="run folder")
        if name in ("cpt", "select", "sft", "dpo"):
            sp.add_argument(
                "--arm",
                metavar="NAME",
                help="only this arm, one of the config's `arms` (default: every arm); an arm that "
                "shares another's stage 1 or selection runs that arm's",
            )
        if name == "run":
            sp.add_argument("--seeds", type=_positive, help=SEEDS_HELP)
            sp.add_argument(
                "--force",
                choices=STAGES,
                metavar="STAGE",
                help="rebuild this stage even when its output is current (and so every later one)",
            )
        else:
            sp.add_argument(
                "--force", action="store_true", help="rebuild even when the output is current"
            )
    status = sub.add_parser("status", help="say which stages are done, stale or missing")
    status.add_argument("dir", help="run folder")
    status.add_argument("--config", help="the run's config (default: DIR/config.yaml)")
    check = sub.add_parser(
        "check", help="check a config without training: model, tokenizer, chat template, ..."
    )
    check.add_argument("config", help="YAML run config")
    check.add_argument("--output", help="run folder: its free disk is checked against the plan")
    plan = sub.add_parser(
        "plan", help="memory per GPU per stage, teacher cache and checkpoint disk, tokens"
    )
    plan.add_argument("config", help="YAML run config")
    plan.add_argument("--gpus", type=int, help="processes (GPUs) to plan for; 0: the CPU")
    plan.add_argument(
        "--gpu-memory", type=float, metavar="GiB", help="memory per GPU (default: this machine's)"
    )
    plan.add_argument(
        "--mode",
        help="single, ddp, fsdp, zero1, zero2, zero3, or an accelerate config file "
        "(default: from the launcher's environment; DDP for several GPUs)",
    )
    plan.add_argument(
        "--output", help="run folder: its data stage's token counts and teacher cache, if built"
    )
    return p


def _check(args: argparse.Namespace) -> int:
    """`mixcpt check`: one line per check, as it is done; exit 2 when any fails. Writes nothing."""
    try:
        cfg = _config(args)
    except UserError as err:
        print(f"mixcpt: error: {err}", file=sys.stderr)
        return 2
    from mixcpt.checks import run_checks

    print(f"ok    config: {args.config}", flush=True)
    failed = 0
    run_base = RunDir(args.output).base if args.output else None
    for name, passed, line in run_checks(cfg, run_base):
        failed += not passed
        status = "FAIL" if not passed else "warn" if line.startswith("warning:") else "ok"
        print(f"{status:<5} {name}: {line.removeprefix('warning: ')}", flush=True)
    return 2 if failed else 0


def _plan(args: argparse.Namespace) -> int:
    """`mixcpt plan`: prints the estimate; reads the config, the model's config.json and, with
    --output, what the run folder already holds. Exit 0, or 2 for a bad config."""
    try:
        cfg = _config(args)  # a local model's config.json needs no hub
        from mixcpt.plan import format_plan, plan

        run = RunDir(args.output) if args.output else None
        estimate = plan(cfg, run, args.gpus, args.mode, args.gpu_memory)
    except UserError as err:
        print(f"mixcpt: error: {err}", file=sys.stderr)
        return 2
    print(format_plan(estimate, args.config, cfg.model.dtype))
    return 0


def _status(args: argparse.Namespace) -> int:
    """`mixcpt status`: one line per stage and arm; nothing is run or written (but the cache of
    file hashes)."""
    from mixcpt.config import load_config
    from mixcpt.fingerprints import status_lines
    from mixcpt.runlock import describe, running_holder

    try:
        folder = Path(args.dir)
        if not folder.is_dir():
            raise UserError(f"{folder}: no such run folder")
        config = Path(args.config) if args.config else folder / "config.yaml"
        if not args.config and not config.is_file():
            raise UserError(
                f"{folder}: no config.yaml in the run folder; name the config it runs with: "
                f"mixcpt status {folder} --config CONFIG"
            )
        lines = status_lines(load_config(config), RunDir(folder))
    except UserError as err:
        print(f"mixcpt: error: {err}", file=sys.stderr)
        return 2
    holder = running_holder(folder)
    running = f"; running: {describe(holder)}" if holder else ""
    print(f"mixcpt status: {folder} (config {config}){running}")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "status":  # reads only: no output folder, no lock, nothing to import
        return _status(args)
    if args.command == "check":
        return _check(args)
    if args.command == "plan":  # reads only, like status
        return _plan(args)
    command = shlex.join(["mixcpt", *(sys.argv[1:] if argv is None else argv)])
    lock = None
    try:
        with stop_signals():
            try:
                out = _output_dir(args.output)
                cfg = _config(args)
                if cfg is not None:  # the demo's inputs are not written yet: it checks later
                    from mixcpt.checks import check_config

                    check_config(cfg, RunDir(out).base)  # before the folder is made or locked
                out.mkdir(parents=True, exist_ok=True)
                # one lock per command: under a launcher, the rank-0 process holds it for all
                if args.command in WRITERS and is_rank_zero():
                    lock = RunLock(out, command)
                    lock.acquire()
                return _run(args, cfg)
            finally:
                if lock is not None:
                    with deferred(then_raise=False):  # a stop signal cannot cut the release short
                        lock.release()
    except UserError as err:
        print(f"mixcpt: error: {err}", file=sys.stderr)
        return 2
    except DiskFullError as err:
        print(f"mixcpt: error: {err}", file=sys.stderr)
        return 1
    except Preempted as stop:
        print(f"mixcpt: {stop}", file=sys.stderr)
        return EXIT_CODE
    except KeyboardInterrupt:
        print("mixcpt: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:
        # Training diverged: not the user's input (exit 1), but a known stop with its own advice,
        # so one line, no traceback. The trainer module is only loaded when a training stage ran.
        # Every process of a launch stops alike; one of them says why.
        trainer = sys.modules.get("mixcpt.train.trainer")
        if trainer is not None and isinstance(err, trainer.NonFiniteLossError):
            if err.report:
                print(f"mixcpt: error: {err}", file=sys.stderr)
            return 1
        raise


def _run(args: argparse.Namespace, cfg: Config | None) -> int:
    """The command, in a run folder whose lock this process holds, with its checked config."""
    out = Path(args.output)
    from transformers.utils import logging as hf_logging

    # Weight loading/saving bars of tiny files flood the terminal; the Trainer's own progress
    # bars (tqdm, not transformers' wrapper) and ours stay.
    hf_logging.disable_progress_bar()
    run = RunDir(out)
    if args.command == "demo":
        from mixcpt.demo.run import run_demo

        run_demo(run, quick=args.quick, seed=args.seed, seeds=args.seeds, arms=args.arms)
        return 0
    if args.command == "run":
        from mixcpt.evaluate.seeds import run_seeds
        from mixcpt.pipeline import run_pipeline

        start = time.perf_counter()
        if args.seeds:
            run_seeds(cfg, run, args.seeds, args.force)
        else:
            run_pipeline(cfg, run, args.force, check=False)
        if is_rank_zero():
            took = time.perf_counter() - start
            where = "intervals and claims" if args.seeds else "time per stage"
            print(f"mixcpt: run: done in {took:.1f} s; {where} in {out / 'report.md'}")
    else:
        from mixcpt.pipeline import run_stage

        run_stage(args.command, cfg, run, getattr(args, "arm", None), args.force, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
