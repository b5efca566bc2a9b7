"""How long each stage of a run took and how much it processed, in results.json:

    results["timing"]["cpt/mixcpt"] = {"wall_s": 12.3, "processed": 40960, "unit": "tokens",
                                       "per_s": 3330.1, "reused": false}

`timed` measures one node of the build graph (mixcpt.fingerprints: "data", "cpt/mixcpt", ...)
around its stage function, so the time covers all of it: loading models, building the teacher
cache, training, scoring, saving. The count is what the stage's own metrics say it processed
(`processed`). When a training stage resumed from a checkpoint, the time and the count cover the
steps after it (`resumed_at_step`). A node reused by a rerun keeps the timing of the build it
reuses, marked `reused: true`; a node being rebuilt loses its old timing when the rebuild begins
(`fingerprints.begin`). Only the main process of a distributed launch records and prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixcpt.align.samples import POOL_FILES
from mixcpt.config import Config
from mixcpt.fingerprints import recorded, upstream
from mixcpt.processes import process_state
from mixcpt.rundir import RunDir


def _pool_samples(summary: dict) -> int:
    """Samples the select stage scored: the usable ones of each pool."""
    pools = [summary[f"{kind}s"] for kind in POOL_FILES]  # as `select.run_select` names them
    return sum(pool["pool"] - pool["skipped"] for pool in pools)


# stage -> (unit, the count of it in what the stage function returned, given the config)
PROCESSED: dict[str, tuple[str, Callable[[Any, Config], int]]] = {
    "data": ("tokens", lambda stats, cfg: stats["available_tokens"]),  # tokenised
    "cache": ("blocks", lambda built, cfg: built.get("blocks", 0)),  # `mixcpt cache` alone
    "cpt": ("tokens", lambda metrics, cfg: metrics["tokens"]),  # trained on
    "select": ("samples", lambda summary, cfg: _pool_samples(summary)),  # scored
    "sft": ("samples", lambda metrics, cfg: metrics["samples"]),  # trained on
    "dpo": ("pairs", lambda metrics, cfg: metrics["pairs"]),  # trained on
    "eval": ("models", lambda table, cfg: sum(r["status"] == "ok" for r in table["rows"])),
    "report": ("stages", lambda paths, cfg: len(upstream(cfg, "report"))),  # reported
}


def timed(cfg: Config, run: RunDir, node: str, build: Callable[[], Any]) -> Any:
    """Run `build()`, the stage function of `node`, and return what it returns. On the main
    process, record its timing in results.json and print one line, or, when the stage reused its
    output (the output's build id did not change), mark the recorded timing reused."""
    if not process_state().is_main_process:
        return build()
    before = (recorded(run, node) or {}).get("build")
    start = time.perf_counter()
    result = build()
    wall_s = time.perf_counter() - start
    if before is not None and (recorded(run, node) or {}).get("build") == before:
        entry = run.read_results().get("timing", {}).get(node, {})
        run.update_results("timing", node, {**entry, "reused": True})
        return result
    entry = measure(node, result, cfg, wall_s)
    run.update_results("timing", node, entry)
    print(f"mixcpt: {node}: done in {wall_s:.1f} s ({describe(entry)})", flush=True)
    return result


def measure(node: str, result: Any, cfg: Config, wall_s: float) -> dict:
    """The timing entry of `node`, whose stage function returned `result` after `wall_s`
    seconds."""
    unit, count_of = PROCESSED[node.partition("/")[0]]
    processed, resumed_at = count_of(result, cfg), {}
    resumed = result.get("resumed_from") if isinstance(result, dict) else None
    if resumed:  # this run took the steps after the checkpoint only
        done = int(Path(resumed).name.removeprefix("checkpoint-"))
        processed = processed * (result["steps"] - done) // max(result["steps"], 1)
        resumed_at = {"resumed_at_step": done}
    return {
        "wall_s": round(wall_s, 3),
        "processed": processed,
        "unit": unit,
        "per_s": round(processed / max(wall_s, 1e-9), 2),
        "reused": False,
        **resumed_at,
    }


def rate(value: float) -> str:
    """A count per second for people: grouped digits, or 3 significant ones below 100."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def describe(entry: dict) -> str:
    """A timing entry's count and rate in words: "40,960 tokens, 3,330 tokens/s"."""
    unit = entry["unit"]
    return f"{entry['processed']:,} {unit}, {rate(entry['per_s'])} {unit}/s"
