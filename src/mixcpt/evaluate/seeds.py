"""One run per seed, and their aggregate: `mixcpt run CONFIG --seeds N` and `mixcpt demo --seeds N`.

DIR/seed-<s>/     a whole run folder for seed s (the config's seed + 0, 1, ..., N - 1), each
                  resumable as any run folder is
DIR/results.json  {"seeds": {"values", "folders"}, "eval": {"rows", "benchmarks",
                  "bootstrap"}, "claims"}: each (arm, stage) once, with the mean over seeds
                  and 95% intervals over seeds and items (mixcpt.evaluate.intervals)
DIR/report.{html,md}
"""

from __future__ import annotations

from pathlib import Path

from mixcpt.atomic import write_json_atomic
from mixcpt.config import Config
from mixcpt.errors import UserError
from mixcpt.evaluate.intervals import summarise
from mixcpt.rundir import RunDir


def seed_values(first: int, n: int) -> list[int]:
    """The seeds of an N-seed run starting at `first` (the config's seed, or the demo's --seed)."""
    return [first + i for i in range(n)]


def seed_run(run: RunDir, seed: int) -> RunDir:
    """The run folder of one seed inside the aggregate's folder."""
    return RunDir(run.root / f"seed-{seed}")


def aggregate_seeds(run: RunDir, seeds: list[int]) -> tuple[Path, Path]:
    """Write DIR/results.json (module docstring) from the eval tables of DIR/seed-<s> for every
    seed in `seeds`, then DIR/report.html and report.md; return the two report paths. A seed
    whose eval stage has not run is a UserError naming its folder."""
    from mixcpt.report import write_report

    tables = []
    for seed in seeds:
        ev = seed_run(run, seed).read_results().get("eval", {})
        if "rows" not in ev:
            raise UserError(f"{seed_run(run, seed).root}: no eval table; run that seed first")
        tables.append({"rows": ev["rows"], "benchmarks": ev["benchmarks"]})
    table = summarise(tables, seeds)
    results = {
        "seeds": {"values": list(seeds), "folders": [seed_run(run, s).root.name for s in seeds]},
        "eval": {k: table[k] for k in ("rows", "benchmarks", "bootstrap")},
        "claims": table["claims"],
    }
    run.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.results_path, results)
    return write_report(run)


def run_seeds(cfg: Config, run: RunDir, n: int, force: str | None = None) -> None:
    """The whole pipeline of `cfg` once per seed (cfg.seed + i) in DIR/seed-<s>, each reusing what
    it already built, then `aggregate_seeds` (on the main process of a distributed launch).
    `force`: a stage every seed rebuilds."""
    from mixcpt.pipeline import run_pipeline
    from mixcpt.runlock import is_rank_zero

    seeds = seed_values(cfg.seed, n)
    for seed in seeds:
        if is_rank_zero():
            print(f"mixcpt: seed {seed}: {seed_run(run, seed).root}", flush=True)
        run_pipeline(cfg.model_copy(update={"seed": seed}), seed_run(run, seed), force, check=False)
    if is_rank_zero():
        aggregate_seeds(run, seeds)
