"""The arms a list of names asks for: the vocabulary of `mixcpt demo --arms` (mixcpt.config.arms
holds what an arm is). A name is an arm of the config, a built-in arm, ARM-merge-λ (ARM's stage-1
model merged toward the base with weight λ), or `all`."""

from __future__ import annotations

from pydantic import ValidationError

from mixcpt.config.arms import ALIASES, BUILTIN_ARMS, MERGE, ArmConfig, check_entries
from mixcpt.errors import ConfigError

# What `all` merges toward the base, and at which base weights λ.
MERGED_IN_ALL = ("mixcpt", "traditional")
MERGE_WEIGHTS = (0.25, 0.5, 0.75)


def merge_name(of: str, base_weight: float) -> str:
    """The name `arms_named` gives the merge of `of` at λ = `base_weight`: "mixcpt-merge-0.25"."""
    return f"{of}-merge-{base_weight:g}"


def arms_named(names: list[str], configured: list[ArmConfig]) -> list[ArmConfig]:
    """The arms a list of names asks for (`mixcpt demo --arms`), in its order: an entry of
    `configured` by its name, a built-in arm, `<arm>-merge-<λ>` (the merge of a listed arm or a
    built-in at base weight λ), or `all`: every built-in arm, then the merges of `MERGED_IN_ALL` at
    each of `MERGE_WEIGHTS`. Raises a ConfigError naming what it accepts for an unknown name, or
    naming the entry and key `check_entries` refuses (a merge of an arm not in the list)."""
    known = {e.name: e for e in configured} | {
        n: ArmConfig(name=n)
        for n in (*BUILTIN_ARMS, *ALIASES)
        if n not in {e.name for e in configured}
    }
    wanted = []
    for name in names:
        if name == "all":
            wanted += list(BUILTIN_ARMS)
            wanted += [merge_name(a, w) for a in MERGED_IN_ALL for w in MERGE_WEIGHTS]
        else:
            wanted.append(name)
    out = {}
    for name in wanted:
        of, _, text = name.rpartition("-merge-")
        weight = _weight(text)
        if name in known:
            out[name] = known[name]
        elif of in known and weight is not None:
            out[name] = ArmConfig(name=name, like=MERGE, of=of, base_weight=weight)
        else:
            raise ConfigError(
                f"--arms: no arm {name!r}; the arms are {', '.join(known)}, "
                "ARM-merge-λ (ARM merged toward the base, λ from 0 to 1, e.g. mixcpt-merge-0.5) "
                "and all"
            )
    chosen = list(out.values())
    try:  # a merge of an arm left out, say: said now, before a run starts
        check_entries(chosen)
    except ValidationError as err:
        where = ", ".join(".".join(map(str, e["loc"])) + f": {e['msg']}" for e in err.errors())
        raise ConfigError(f"--arms: {where}") from None
    return chosen


def _weight(text: str) -> float | None:
    """λ written in a merge's name, or None when it is not a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 <= value <= 1 else None
