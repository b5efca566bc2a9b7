"""Means and 95% intervals of every score, over seeds and items, paired across models.

The resampling scheme is a two-level percentile bootstrap. Each of `RESAMPLES` replicates draws
S seeds with replacement from the S seeds of the run, and for each drawn seed draws that seed's
n items with replacement (benchmark questions, perplexity texts, windows of the KL probe); the
replicate's value is the mean over the drawn seeds of the statistic on the drawn items (the mean
of 0/1 correctness; sum / sum for bits per byte and KL, whose items are (bits, bytes) and (KL
summed over a window, its tokens)). The interval is the 2.5th and 97.5th percentiles of the
replicates; the point estimate is the mean over seeds of each seed's statistic on all its items.
With one seed the interval is over items alone. Columns without per-item scores (lm-eval tasks)
are resampled over seeds only, and have no interval with one seed.

Draws are made by a generator seeded with `BOOTSTRAP_SEED` and the column, never by the global
one, so the same results always give the same intervals. Every model is resampled with the same
seeds and, for each benchmark, the same items: the difference of two models (a retention delta, a
claim, mixcpt.evaluate.claims) is bootstrapped as a paired difference.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

RESAMPLES = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
# replicates are drawn in chunks of at most this many item draws, to bound memory on large
# benchmarks
CHUNK_DRAWS = 4_000_000

SCHEME = (
    f"two-level percentile bootstrap, {RESAMPLES} resamples: seeds with replacement, then each "
    "drawn seed's items with replacement; the same draws for every model (paired differences); "
    f"generator seed {BOOTSTRAP_SEED}"
)

# (key in a row, column name): a benchmark's main score in "scores" or "chat_scores", or
# ("kl_to_base", "kl_to_base")
Column = tuple[str, str]


def axis(benchmarks: dict[str, dict], tag: str) -> tuple[list[str], str]:
    """Benchmarks that make the `tag` axis ("domain" or "general"): the higher-is-better ones
    when there are any (scores on one scale), else the lower-is-better ones; and the axis label.
    Used by the report's plot and by the claims."""
    tagged = {n: b for n, b in benchmarks.items() if b.get("tag") == tag and b.get("main_metric")}
    better = [n for n, b in tagged.items() if b.get("higher_is_better", True)]
    if better:
        return better, f"mean {tag} score (higher is better)"
    return (
        list(tagged),
        f"mean {tag} {', '.join(sorted({tagged[n]['main_metric'] for n in tagged}))} "
        "(lower is better)",
    )


def accuracy_axis(benchmarks: dict[str, dict], tag: str) -> list[str]:
    """The `tag` benchmarks of the report's Pareto plot: the accuracy-type ones (a main metric
    where higher is better, not perplexity) scored in the plain format (or, for lm-eval tasks,
    their own prompts), the format the base and stage 1 are scored in."""
    return [
        name
        for name, b in benchmarks.items()
        if b.get("tag") == tag
        and b.get("main_metric")
        and b.get("higher_is_better", True)
        and b.get("kind") != "perplexity"
        and b.get("format", "plain") in ("plain", "lm_eval")
    ]


def interval(replicates: np.ndarray | None) -> list[float] | None:
    """[low, high]: the central `LEVEL` percentile interval of the replicates (None: none)."""
    if replicates is None:
        return None
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return [float(low), float(high)]


class Bootstrap:
    """The ok rows of one or more seeds' eval tables, and replicates of any of their columns.

    `tables[i]` is results["eval"] of the run with seed `seeds[i]` ({"rows", "benchmarks"}).
    """

    def __init__(self, tables: Sequence[dict], seeds: Sequence[int]):
        self.seeds = list(seeds)
        self.benchmarks = tables[0]["benchmarks"]
        self.rows = [
            {(r["arm"], r["stage"]): r for r in t["rows"] if r.get("status") == "ok"}
            for t in tables
        ]
        self._cache: dict[tuple, tuple[float, np.ndarray | None]] = {}

    def _record(self, row: dict, column: Column) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """(sums, counts, has items) of `column` in `row`: the statistic is sum(sums) /
        sum(counts); a column kept without items is one item, its value."""
        key, name = column
        items = row.get("items", {})
        if key == "kl_to_base":
            kept, value = items.get("kl_to_base"), row.get("retention", {}).get("kl_to_base")
        else:
            kept = items.get(key, {}).get(name)
            metric = self.benchmarks.get(name, {}).get("main_metric")
            value = row.get(key, {}).get(name, {}).get(metric)
        if isinstance(kept, dict):
            return np.asarray(kept["sum"], float), np.asarray(kept["count"], float), True
        if isinstance(kept, list) and kept:
            return np.asarray(kept, float), np.ones(len(kept)), True
        if value is None:
            return None
        return np.array([float(value)]), np.ones(1), False

    def seeds_with(self, arm: str, stage: str, columns: Sequence[Column]) -> tuple[int, ...]:
        """Indices of the seeds whose table has every one of `columns` for (arm, stage)."""
        return tuple(
            i
            for i, rows in enumerate(self.rows)
            if (arm, stage) in rows
            and all(self._record(rows[(arm, stage)], c) is not None for c in columns)
        )

    def _seed_draws(self, seeds: tuple[int, ...]) -> np.ndarray:
        """[RESAMPLES, S]: positions in `seeds` drawn with replacement, the same for every column
        so that composite and paired statistics resample seeds together."""
        rng = np.random.default_rng([BOOTSTRAP_SEED, len(self.seeds), *seeds])
        return rng.integers(0, len(seeds), size=(RESAMPLES, len(seeds)))

    def column(
        self, arm: str, stage: str, column: Column, seeds: tuple[int, ...]
    ) -> tuple[float, np.ndarray | None]:
        """(point estimate, replicates [RESAMPLES] or None) of one column over `seeds`."""
        cache_key = (arm, stage, column, seeds)
        if cache_key in self._cache:
            return self._cache[cache_key]
        records = [self._record(self.rows[i][(arm, stage)], column) for i in seeds]
        point = float(np.mean([r[0].sum() / r[1].sum() for r in records]))
        replicates = None
        if len(seeds) > 1 or any(r[2] for r in records):
            replicates = self._replicates([r[:2] for r in records], column[1], seeds)
        self._cache[cache_key] = point, replicates
        return point, replicates

    def _replicates(
        self, records: list[tuple[np.ndarray, np.ndarray]], name: str, seeds: tuple[int, ...]
    ) -> np.ndarray:
        n_seeds = len(records)
        sizes = np.array([len(s) for s, _ in records])  # [S]
        width = int(sizes.max())
        sums, counts = np.zeros((n_seeds, width)), np.zeros((n_seeds, width))  # [S, n]
        for i, (s, c) in enumerate(records):
            sums[i, : sizes[i]], counts[i, : sizes[i]] = s, c
        picks = self._seed_draws(seeds)  # [R, S]
        # the item draws depend on the column's name only: plain and chat scores of one
        # benchmark, and every model, get the same items
        rng = np.random.default_rng([BOOTSTRAP_SEED, zlib.crc32(name.encode()), *seeds])
        out = np.empty(RESAMPLES)
        chunk = max(1, CHUNK_DRAWS // (n_seeds * width))
        for start in range(0, RESAMPLES, chunk):
            pick = picks[start : start + chunk]  # [r, S]
            size = sizes[pick][..., None]  # [r, S, 1]
            draw = rng.random((len(pick), n_seeds, width))  # [r, S, n]
            idx = np.minimum((draw * size).astype(np.int64), width - 1)  # [r, S, n]
            used = np.arange(width) < size  # [r, S, n]: a seed with fewer items draws fewer
            seed_rows = pick[..., None]  # [r, S, 1]
            num = np.where(used, sums[seed_rows, idx], 0.0).sum(-1)  # [r, S]
            den = np.where(used, counts[seed_rows, idx], 0.0).sum(-1)  # [r, S]
            out[start : start + len(pick)] = (num / den).mean(-1)
        return out

    def composite(
        self, arm: str, stage: str, columns: Sequence[Column], seeds: tuple[int, ...]
    ) -> tuple[float, np.ndarray | None]:
        """(point, replicates) of the mean of `columns` (e.g. a tag's benchmarks) over `seeds`;
        replicates None when any column has none."""
        parts = [self.column(arm, stage, c, seeds) for c in columns]
        point = float(np.mean([p for p, _ in parts]))
        if any(r is None for _, r in parts):
            return point, None
        return point, np.mean([r for _, r in parts], axis=0)


def _mean_scores(rows: list[dict], key: str) -> dict[str, dict[str, float]]:
    """{column: {metric: mean over rows}} of the columns and metrics every row has."""
    names = set.intersection(*(set(r.get(key, {})) for r in rows))
    out = {}
    for name in sorted(names, key=list(rows[0][key]).index):
        metrics = set.intersection(*(set(r[key][name]) for r in rows))
        out[name] = {
            m: float(np.mean([r[key][name][m] for r in rows]))
            for m in rows[0][key][name]
            if m in metrics
        }
    return out


def _row_intervals(boot: Bootstrap, arm: str, stage: str) -> dict[str, Any]:
    """Intervals of one row's main scores, chat scores, KL, retention deltas (paired with the
    base row), the domain and general axes of the report's plot and those of its Pareto plot."""
    out: dict[str, Any] = {"scores": {}, "chat_scores": {}, "delta": {}, "axes": {}}
    for key in ("scores", "chat_scores"):
        for name in boot.benchmarks:
            seeds = boot.seeds_with(arm, stage, [(key, name)])
            if seeds:
                out[key][name] = interval(boot.column(arm, stage, (key, name), seeds)[1])
    kl = ("kl_to_base", "kl_to_base")
    seeds = boot.seeds_with(arm, stage, [kl])
    out["kl_to_base"] = interval(boot.column(arm, stage, kl, seeds)[1]) if seeds else None
    for name, b in boot.benchmarks.items():
        column = ("scores", name)
        paired = set(boot.seeds_with(arm, stage, [column])) & set(
            boot.seeds_with("base", "base", [column])
        )
        if b.get("tag") != "general" or not paired or (arm, stage) == ("base", "base"):
            continue
        seeds = tuple(sorted(paired))
        mine, base = (
            boot.column(arm, stage, column, seeds),
            boot.column("base", "base", column, seeds),
        )
        out["delta"][name] = None if mine[1] is None else interval(mine[1] - base[1])
    for tag in ("domain", "general"):
        columns = [("scores", n) for n in axis(boot.benchmarks, tag)[0]]
        seeds = boot.seeds_with(arm, stage, columns)
        if columns and seeds:
            point, replicates = boot.composite(arm, stage, columns, seeds)
            out["axes"][tag] = {"mean": point, "ci": interval(replicates)}
    if (arm, stage) != ("base", "base"):
        out["pareto"] = _pareto_intervals(boot, arm, stage)
    return out


def _pareto_intervals(boot: Bootstrap, arm: str, stage: str) -> dict[str, dict]:
    """The Pareto plot's axes for one row, each {"mean", "ci"}: "domain_gain", the mean plain
    accuracy of the domain benchmarks (`accuracy_axis`) minus the base's, and "general_loss", the
    base's general one minus the row's; differences paired with the base row over the seeds that
    evaluated both. A tag without such benchmarks is left out."""
    out = {}
    for tag, key, sign in (("domain", "domain_gain", 1), ("general", "general_loss", -1)):
        columns = [("scores", n) for n in accuracy_axis(boot.benchmarks, tag)]
        both = set(boot.seeds_with(arm, stage, columns)) & set(
            boot.seeds_with("base", "base", columns)
        )
        if not columns or not both:
            continue
        seeds = tuple(sorted(both))
        mine, mine_reps = boot.composite(arm, stage, columns, seeds)
        base, base_reps = boot.composite("base", "base", columns, seeds)
        paired = None if mine_reps is None or base_reps is None else sign * (mine_reps - base_reps)
        out[key] = {"mean": sign * (mine - base), "ci": interval(paired)}
    return out


def _mean_row(arm: str, stage: str, ok: list[dict]) -> dict[str, Any]:
    """One (arm, stage) over the seeds that evaluated it (`ok`, their rows): the mean of every
    score, chat score, KL and retention delta that all of them have, and the first's
    shared_with and merge."""
    kls = [r["retention"].get("kl_to_base") for r in ok]
    deltas = [r["retention"].get("delta", {}) for r in ok]
    return {
        "arm": arm,
        "stage": stage,
        "status": "ok",
        # what the row's model is, the same in every seed (a shared or merged stage-1 model)
        **{key: ok[0][key] for key in ("shared_with", "merge") if key in ok[0]},
        "models": [r.get("model") for r in ok],
        "scores": _mean_scores(ok, "scores"),
        "chat_scores": _mean_scores(ok, "chat_scores"),
        "retention": {
            "kl_to_base": None if None in kls else float(np.mean(kls)),
            "delta": {
                n: float(np.mean([d[n] for d in deltas]))
                for n in deltas[0]
                if all(n in d for d in deltas)
            },
        },
    }


def summarise(tables: Sequence[dict], seeds: Sequence[int]) -> dict[str, Any]:
    """The eval tables of one run per seed (`tables[i]` for `seeds[i]`) as one table with
    intervals, and the claims.

    Returns {"rows", "benchmarks", "bootstrap", "claims"}. With one table its rows are kept as
    they are (per-item scores included), each with "seeds" and "intervals" added. With several,
    each (arm, stage) is one row: "seeds" (those where it was evaluated), the mean over them of
    every score, KL and delta (`_mean_row`), and "intervals"; per-item scores stay in each seed's
    results. "intervals": {"scores"|"chat_scores"|"delta": {benchmark: [low, high] or None},
    "kl_to_base": [low, high] or None, "axes": {"domain"|"general": {"mean", "ci"}}, and but
    for the base "pareto": {"domain_gain"|"general_loss": {"mean", "ci"}} (`_pareto_intervals`)}.
    """
    # imported here: the claims are built on this module's Bootstrap
    from mixcpt.evaluate.claims import evaluate_claims

    boot = Bootstrap(tables, seeds)
    order = list(dict.fromkeys((r["arm"], r["stage"]) for t in tables for r in t["rows"]))
    rows = []
    for arm, stage in order:
        found = [(s, ok[(arm, stage)]) for s, ok in zip(seeds, boot.rows) if (arm, stage) in ok]
        if len(tables) == 1:
            row = dict(next(r for r in tables[0]["rows"] if (r["arm"], r["stage"]) == (arm, stage)))
        elif found:
            row = _mean_row(arm, stage, [r for _, r in found])
        else:
            row = {"arm": arm, "stage": stage, "status": "missing", "scores": {}}
            row.update(chat_scores={}, retention={})
        row["seeds"] = [s for s, _ in found]
        if found:
            row["intervals"] = _row_intervals(boot, arm, stage)
        rows.append(row)
    return {
        "rows": rows,
        "benchmarks": boot.benchmarks,
        "bootstrap": {
            "scheme": SCHEME,
            "resamples": RESAMPLES,
            "level": LEVEL,
            "generator_seed": BOOTSTRAP_SEED,
            "seeds": list(seeds),
        },
        "claims": evaluate_claims(boot),
    }
