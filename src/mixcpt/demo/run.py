"""`mixcpt demo`: build the synthetic world and its tiny base model, then run every arm and
evaluate them, all on the CPU in minutes with nothing downloaded (design.md §7); with --seeds,
once per seed and aggregated with intervals."""

from __future__ import annotations

import time
from importlib.resources import files

import yaml

from mixcpt.config import ArmConfig, config_from_dict
from mixcpt.config.arm_names import arms_named
from mixcpt.demo.base_model import build_base_model
from mixcpt.demo.world import write_world
from mixcpt.evaluate.seeds import aggregate_seeds, seed_run, seed_values
from mixcpt.pipeline import run_pipeline
from mixcpt.report.tables import results_table
from mixcpt.rundir import RunDir

# What --quick changes (a smaller world, a smaller base, fewer steps): dotted key -> value.
QUICK = {
    "arms": ["mixcpt", "traditional"],  # the two recipes only: a smoke test of every stage
    "cpt.training.max_steps": 150,
    "cpt.training.save_steps": 50,
    "select.k": 100,
    "sft.training.max_steps": 30,
    "dpo.training.max_steps": 15,
}


def _set(tree: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for key in path:
        tree = tree.setdefault(key, {})
    tree[last] = value


def _raw_config(quick: bool, arms: list[str] | None) -> dict:
    """The demo's config as a dict, with --quick's changes and the arms --arms names (`all`, a
    built-in, an arm of the demo config or ARM-merge-λ: mixcpt.config.arm_names) written
    out in full, so that DIR/config.yaml reruns them by hand. A ConfigError for an unknown arm."""
    raw = yaml.safe_load(files("mixcpt.demo").joinpath("config.yaml").read_text(encoding="utf-8"))
    for dotted, value in (QUICK if quick else {}).items():
        _set(raw, dotted, value)
    if arms:
        configured = [
            ArmConfig.model_validate({"name": a} if isinstance(a, str) else a) for a in raw["arms"]
        ]
        raw["arms"] = [_written(entry) for entry in arms_named(arms, configured)]
    return raw


def _written(entry: ArmConfig) -> str | dict:
    """An arm entry as the config file writes it: a bare name when it sets nothing else."""
    fields = entry.model_dump(mode="json", exclude_defaults=True)
    return entry.name if list(fields) == ["name"] else fields


def demo_config(run: RunDir, quick: bool, seed: int, arms: list[str] | None = None) -> dict:
    """The demo's config as a dict (paths relative to the run folder; `arms`: those of --arms,
    None for the config's), also written to DIR/config.yaml."""
    raw = _raw_config(quick, arms)
    raw["seed"] = seed
    (run.root / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return raw


def _print_table(header: list[str], cells: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    for row in [header, ["-" * w for w in widths], *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _run_one(run: RunDir, quick: bool, seed: int, arms: list[str] | None = None) -> None:
    """World -> base model -> the pipeline, in `run`, for one seed (and the arms of --arms)."""
    size = "quick" if quick else "default"
    world = write_world(run.root / "world", seed=seed, size=size)
    build_base_model(world, run.base, seed=seed, size=size)
    cfg = config_from_dict(
        demo_config(run, quick, seed, arms), root=run.root, source=str(run.root / "config.yaml")
    )
    run_pipeline(cfg, run)


def run_demo(
    run: RunDir,
    quick: bool = False,
    seed: int = 0,
    seeds: int | None = None,
    arms: list[str] | None = None,
) -> None:
    """World -> base model -> data, stage 1, selection, SFT, DPO (every arm) -> eval -> report.

    With `seeds`, the whole demo once per seed (`seed` + 0..seeds-1) in DIR/seed-<s>, world and
    base model included, then the aggregate results.json and report in DIR (mean and 95%
    interval over seeds and items; mixcpt.evaluate.seeds). Every step is cached in the run
    folder, so a rerun (or a rerun after an interruption) continues where it stopped. Prints the
    results table and the claims' verdicts at the end.

    `arms` (--arms) replaces the config's `arms:` list (`_raw_config`); an unknown name is a
    ConfigError before anything is built.
    """
    start = time.time()
    _raw_config(quick, arms)
    if seeds is None:
        _run_one(run, quick, seed, arms)
    else:
        for s in seed_values(seed, seeds):
            print(f"mixcpt demo: seed {s}: {seed_run(run, s).root}", flush=True)
            _run_one(seed_run(run, s), quick, s, arms)
        aggregate_seeds(run, seed_values(seed, seeds))
    results = run.read_results()
    print()
    _print_table(*results_table(results)[:2])
    print()
    for claim in results.get("claims", []):
        reason = f" ({claim['reason']})" if claim["reason"] else ""
        print(f"claim {claim['id']}: {claim['verdict']}{reason}: {claim['claim']}")
    print(f"\nmixcpt demo: done in {time.time() - start:.0f} s. Report: {run.root / 'report.html'}")
