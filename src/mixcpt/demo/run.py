"""`mixcpt demo`: build the synthetic world and its tiny base model, then run both recipes and
evaluate them, all on the CPU in minutes with nothing downloaded (design.md §7)."""

from __future__ import annotations

import time
from importlib.resources import files

import yaml

from mixcpt.config import config_from_dict
from mixcpt.demo.base_model import build_base_model
from mixcpt.demo.world import write_world
from mixcpt.pipeline import run_pipeline
from mixcpt.report import results_table
from mixcpt.rundir import RunDir

# What --quick changes (a smaller world, a smaller base, fewer steps): dotted key -> value.
QUICK = {
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


def demo_config(run: RunDir, quick: bool, seed: int) -> dict:
    """The demo's config as a dict (paths relative to the run folder), also written to
    DIR/config.yaml."""
    raw = yaml.safe_load(files("mixcpt.demo").joinpath("config.yaml").read_text(encoding="utf-8"))
    raw["seed"] = seed
    for dotted, value in (QUICK if quick else {}).items():
        _set(raw, dotted, value)
    (run.root / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return raw


def run_demo(run: RunDir, quick: bool = False, seed: int = 0) -> None:
    """World -> base model -> data, stage 1, selection, SFT, DPO (both arms) -> eval -> report.

    Every step is cached in the run folder, so a rerun (or a rerun after an interruption)
    continues where it stopped. Prints the results table at the end.
    """
    start = time.time()
    size = "quick" if quick else "default"
    world = write_world(run.root / "world", seed=seed, size=size)
    build_base_model(world, run.base, seed=seed, size=size)
    cfg = config_from_dict(
        demo_config(run, quick, seed), root=run.root, source=str(run.root / "config.yaml")
    )
    run_pipeline(cfg, run)
    header, cells, _ = results_table(run.read_results())
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print()
    for row in [header, ["-" * w for w in widths], *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"\nmixcpt demo: done in {time.time() - start:.0f} s. Report: {run.root / 'report.html'}")
