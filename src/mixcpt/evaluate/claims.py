"""The paper's claims, each decided by the bootstrap interval of a paired difference.

Each claim compares two arms (A, B) on one or more measures. A measure is a tag's benchmarks
(their mean main score, the report's axis: mixcpt.evaluate.intervals.axis) in one prompt format,
or the KL to the base on the probe, at one stage. Its difference A - B is bootstrapped over the
same seeds and items for both arms (mixcpt.evaluate.intervals), and its 95% interval decides:

    better      ("A >= B", "A retains better"): with the difference oriented so that positive
                favours A (B - A for a lower-is-better measure such as KL),
                supported     the interval lies above 0: A is better beyond the noise;
                contradicted  it lies below 0: B is better;
                inconclusive  it contains 0. A tie is not taken as support: two arms that both
                              score 0 have shown nothing.
    equivalent  ("about as well"): with margin EQUIVALENCE_MARGIN (score units),
                supported     the interval lies within [-margin, +margin];
                contradicted  it lies entirely outside it (either side);
                inconclusive  otherwise.

A claim is supported when every measure that decides it is; contradicted when one is and none is
supported; inconclusive otherwise (no interval, measures that disagree, or an arm or stage the run
does not have: such a claim is listed with the reason, never left out).

Formats: the retention measures (claims 2 and 3) use the plain format, the one the base and
stage 1 were evaluated in, so a change of format is not read as forgetting. Comparisons between
two aligned arms (claims 1, 4 and 5) are decided through the chat template: that is how an aligned
model is used, both sides are aligned so neither is favoured by the format, and Mix-CPT's point is
that the knowledge becomes usable in the instruction format. Claim 1 also shows the plain format,
which does not decide.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from mixcpt.config.arms import ALIASES
from mixcpt.evaluate.intervals import LEVEL, axis, interval

if TYPE_CHECKING:
    from mixcpt.evaluate.intervals import Bootstrap, Column

EQUIVALENCE_MARGIN = 0.05
ALIGNED = "after alignment"
STAGE_ONE = "after stage 1"

RULES = {
    "better": f"supported when the {LEVEL:.0%} interval of the difference (oriented so that "
    "positive favours the first arm) lies above 0, contradicted when it lies below 0, "
    "inconclusive when it contains 0",
    "equivalent": f"supported when the {LEVEL:.0%} interval of the difference lies within "
    f"±{EQUIVALENCE_MARGIN}, contradicted when it lies entirely outside, inconclusive otherwise",
}


@dataclass(frozen=True)
class Measure:
    label: str  # "domain QA", "general QA", "KL to base"
    tag: str | None  # the benchmarks' tag; None for the KL to base
    fmt: str  # "plain" or "chat" (the KL's probe has no prompt: "plain")
    when: str  # STAGE_ONE or ALIGNED
    decides: bool = True


@dataclass(frozen=True)
class Claim:
    id: int
    text: str
    a: str
    b: str
    test: str  # "better" or "equivalent"
    measures: tuple[Measure, ...]


CLAIMS = (
    Claim(
        1,
        "After alignment, Mix-CPT is at least as good as traditional CPT (then SFT, DPO) on "
        "domain QA",
        "mixcpt",
        "traditional",
        "better",
        (
            Measure("domain QA", "domain", "chat", ALIGNED),
            Measure("domain QA", "domain", "plain", ALIGNED, decides=False),
        ),
    ),
    Claim(
        2,
        "Mix-CPT retains general ability better than traditional CPT",
        "mixcpt",
        "traditional",
        "better",
        (
            Measure("general QA", "general", "plain", STAGE_ONE),
            Measure("KL to base", None, "plain", STAGE_ONE),
            Measure("general QA", "general", "plain", ALIGNED),
            Measure("KL to base", None, "plain", ALIGNED),
        ),
    ),
    Claim(
        3,
        "LSSD reduces forgetting compared with the same mixture under CE only",
        "mixcpt",
        "mixture-ce",
        "better",
        (
            Measure("general QA", "general", "plain", STAGE_ONE),
            Measure("KL to base", None, "plain", STAGE_ONE),
        ),
    ),
    Claim(
        4,
        "Easiest-k selection is at least as good as random-k at the same k",
        "mixcpt",
        "random-k",
        "better",
        (
            Measure("domain QA", "domain", "chat", ALIGNED),
            Measure("general QA", "general", "chat", ALIGNED),
        ),
    ),
    Claim(
        5,
        "k selected samples do about as well as the whole pool",
        "mixcpt",
        "whole-pool",
        "equivalent",
        (
            Measure("domain QA", "domain", "chat", ALIGNED),
            Measure("general QA", "general", "chat", ALIGNED),
        ),
    ),
)


def verdict(test: str, ci: list[float] | None, higher_is_better: bool = True) -> str:
    """ "supported", "contradicted" or "inconclusive" for the interval `ci` of A - B under `test`
    ("better" or "equivalent"; see the module docstring)."""
    if ci is None:
        return "inconclusive"
    low, high = ci if higher_is_better else (-ci[1], -ci[0])  # positive favours A
    if test == "better":
        return "supported" if low > 0 else "contradicted" if high < 0 else "inconclusive"
    m = EQUIVALENCE_MARGIN
    if -m <= low and high <= m:
        return "supported"
    return "contradicted" if low > m or high < -m else "inconclusive"


def _stage(boot: Bootstrap, arm: str, when: str) -> str | None:
    """The stage a measure reads for `arm`: cpt after stage 1; after alignment the arm's last
    aligned stage that any seed evaluated (dpo, else sft). None when there is none."""
    candidates = ("cpt",) if when == STAGE_ONE else ("dpo", "sft")
    return next((s for s in candidates if any((arm, s) in rows for rows in boot.rows)), None)


def _columns(boot: Bootstrap, m: Measure) -> tuple[list[Column], bool]:
    """The columns a measure averages and whether higher is better."""
    if m.tag is None:
        return [("kl_to_base", "kl_to_base")], False
    names, _ = axis(boot.benchmarks, m.tag)
    columns = []
    for n in names:
        b = boot.benchmarks[n]
        if m.fmt == "chat" and b.get("chat_when_aligned"):
            columns.append(("chat_scores", n))
        elif b.get("format") == m.fmt or (m.fmt == "plain" and b.get("format") == "lm_eval"):
            columns.append(("scores", n))
    higher = all(boot.benchmarks[n].get("higher_is_better", True) for _, n in columns)
    return columns, higher


def _measure(boot: Bootstrap, claim: Claim, m: Measure, arms: set[str]) -> dict[str, Any]:
    columns, higher = _columns(boot, m)
    out: dict[str, Any] = {
        "measure": m.label,
        "benchmarks": ["probe"] if m.tag is None else [n for _, n in columns],
        "format": m.fmt,
        "when": m.when,
        "decides": m.decides,
        "higher_is_better": higher,
        "stage": {},
        "seeds": [],
        "a": None,
        "b": None,
        "difference": None,
        "verdict": "inconclusive",
        "reason": "",
    }
    absent = [arm for arm in (claim.a, claim.b) if arm not in arms]
    if absent:
        out["reason"] = f"arm {' and '.join(absent)} not in this run"
        return out
    if not columns:
        out["reason"] = f"no {m.tag} benchmark scored in the {m.fmt} format"
        return out
    stages = {arm: _stage(boot, arm, m.when) for arm in (claim.a, claim.b)}
    out["stage"] = stages
    if None in stages.values():
        missing = [a for a, s in stages.items() if s is None]
        out["reason"] = f"arm {' and '.join(missing)} has no stage evaluated {m.when}"
        return out
    seeds = tuple(
        sorted(
            set(boot.seeds_with(claim.a, stages[claim.a], columns))
            & set(boot.seeds_with(claim.b, stages[claim.b], columns))
        )
    )
    if not seeds:
        out["reason"] = "no seed evaluated both arms on these benchmarks"
        return out
    a_point, a_reps = boot.composite(claim.a, stages[claim.a], columns, seeds)
    b_point, b_reps = boot.composite(claim.b, stages[claim.b], columns, seeds)
    diff = None if a_reps is None or b_reps is None else interval(a_reps - b_reps)
    out.update(
        seeds=[boot.seeds[i] for i in seeds],
        a={"arm": claim.a, "mean": a_point, "ci": interval(a_reps)},
        b={"arm": claim.b, "mean": b_point, "ci": interval(b_reps)},
        # rounded: two equal means can differ by float noise (1e-17), which reads as a number
        difference={"mean": round(a_point - b_point, 12), "ci": diff},
        verdict=verdict(claim.test, diff, higher),
    )
    if diff is None:
        out["reason"] = "no interval: no per-item scores and one seed"
    elif out["verdict"] == "inconclusive":
        out["reason"] = _undecided(claim.test)
    return out


def _undecided(test: str) -> str:
    """Why an interval decides nothing under `test`."""
    if test == "better":
        return "the interval of the difference contains 0"
    return f"the interval of the difference crosses the ±{EQUIVALENCE_MARGIN} margin"


def _combine(measures: list[dict]) -> tuple[str, str]:
    """(claim verdict, reason) from its measures that decide (module docstring)."""
    deciding = [m for m in measures if m["decides"]]
    count = {v: sum(m["verdict"] == v for m in deciding) for v in ("supported", "contradicted")}
    if count["supported"] == len(deciding):
        return "supported", ""
    if count["contradicted"] and not count["supported"]:
        return "contradicted", ""
    if count["contradicted"]:
        return "inconclusive", (
            f"the measures disagree: {count['supported']} supported, "
            f"{count['contradicted']} contradicted"
        )
    reasons = "; ".join(sorted({m["reason"] for m in deciding if m["verdict"] == "inconclusive"}))
    if count["supported"]:
        return "inconclusive", f"{count['supported']} of {len(deciding)} supported; {reasons}"
    return "inconclusive", reasons


def _in_run(name: str, arms: set[str]) -> str:
    """The arm of `arms` that is the built-in `name`: itself, or in a run that lists it under an
    older name (`baseline` for `traditional`) that name; `name` when the run has neither."""
    if name in arms:
        return name
    return next((old for old, new in ALIASES.items() if new == name and old in arms), name)


def evaluate_claims(boot: Bootstrap) -> list[dict[str, Any]]:
    """Every claim of CLAIMS with its verdict: {id, claim, arms [A, B], test, rule, verdict,
    reason, measures [{measure, benchmarks, format, when, decides, higher_is_better, stage {arm:
    stage}, seeds, a {arm, mean, ci}, b {...}, difference {mean, ci}, verdict, reason}]}."""
    arms = {arm for rows in boot.rows for arm, _ in rows}
    out = []
    for claim in CLAIMS:
        claim = replace(claim, a=_in_run(claim.a, arms), b=_in_run(claim.b, arms))
        measures = [_measure(boot, claim, m, arms) for m in claim.measures]
        decided, reason = _combine(measures)
        out.append(
            {
                "id": claim.id,
                "claim": claim.text,
                "arms": [claim.a, claim.b],
                "test": claim.test,
                "rule": RULES[claim.test],
                "verdict": decided,
                "reason": reason,
                "measures": measures,
            }
        )
    return out
