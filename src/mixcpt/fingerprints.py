"""The run folder as a build graph (design §11): what each output was built from, whether it is
current for a config, and what `mixcpt run` therefore rebuilds.

The nodes, in build order (arms as the config trains them; dpo only with preference data):

    data -> cpt/ARM -> select/ARM -> sft/ARM -> dpo/ARM -> eval -> report
            cpt/ARM -> cpt/MERGE -> eval               (a merge arm: mixcpt.merge)

An arm that shares its stage-1 settings with an earlier arm has no cpt node of its own: its
selection and SFT read the earlier arm's (mixcpt.pipeline.stage1_owner); likewise a selection
(`selection_owner`), and an arm that aligns on the whole pool reads the data stage's pool.

Every output carries a record of what it was built from:

    {"fingerprint": sha256 of "inputs",
     "build":       a fresh id for every build,
     "inputs": {"config": {dotted key: value}, "files": {config key: content hash},
                "stages": {node read: its build id}, "mixcpt": version}}

as `fingerprint.json` inside the node's folder, written into the same temporary folder as the
output so that the two appear together; eval and report, whose outputs live in results.json, keep
it there (results["eval"]["fingerprint"], results["report"]["fingerprint"]). Config keys and
files are chosen by mixcpt.stage_inputs. An output is current when the fingerprint computed now
equals the recorded one. A node records the *build* ids of the nodes it read, not their
fingerprints, so any rebuild (inputs changed, --force, a deleted folder) makes everything after
it stale: no output is ever paired with another it was not built from.

A folder without a record (made by hand, or by an older mixcpt) is stale for `run` and `status`,
but a stage command reads it as it is; its identity is then its files' names, sizes and times.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mixcpt.atomic import write_json_atomic
from mixcpt.config import Config
from mixcpt.config.arms import find_arm
from mixcpt.errors import UserError
from mixcpt.pipeline import owners, selection_owner, stage1_owner, stage_arms
from mixcpt.rundir import TRAINED_STAGES, RunDir
from mixcpt.stage_inputs import config_and_files

RECORD_FILE = "fingerprint.json"

try:
    MIXCPT_VERSION = version("mixcpt")
except PackageNotFoundError:  # run from a source tree that was never installed
    MIXCPT_VERSION = "unknown"


# ---- the graph ----------------------------------------------------------------------------------


def nodes(cfg: Config) -> list[str]:
    """Every output of a full run of `cfg`, in build order: "data", "cpt/mixcpt", ..."""
    out = ["data"]
    for stage in ("cpt", "select", "sft", "dpo"):
        out += [f"{stage}/{arm}" for arm in stage_arms(cfg, stage)]
    return [*out, "eval", "report"]


def upstream(cfg: Config, node: str) -> list[str]:
    """The nodes whose outputs `node` reads."""
    stage, _, arm = node.partition("/")
    if stage == "cpt":
        source = find_arm(cfg, arm).merge_of  # a merge reads that arm's model and the base's files
        return [f"cpt/{stage1_owner(cfg, source)}"] if source else ["data"]
    if stage == "select":
        return ["data", f"cpt/{stage1_owner(cfg, arm)}"]
    if stage in ("sft", "dpo"):
        selection = selection_owner(cfg, arm)
        pool = f"select/{selection}" if selection else "data"  # the samples the arm aligns on
        start = f"cpt/{stage1_owner(cfg, arm)}" if stage == "sft" else f"sft/{arm}"
        return [start, pool]
    if stage == "eval":  # the stages it scores (eval.stages), so a stage left out never stales it
        return [n for n in nodes(cfg) if n.partition("/")[0] in cfg.eval.stages]
    if stage == "report":
        return nodes(cfg)[:-1]
    return []


def _folder(run: RunDir, node: str) -> Path | None:
    """The folder holding `node`'s output and record; None for eval and report."""
    stage, _, arm = node.partition("/")
    if stage in TRAINED_STAGES:
        return run.stage(arm, stage)
    if stage == "select":
        return run.selection(arm)
    return run.data if stage == "data" else None


def _results_key(node: str) -> tuple[str, str | None]:
    """Where results.json holds `node`'s output: (section, key), key None for a whole section."""
    stage, _, arm = node.partition("/")
    if arm:  # cpt, select, sft, dpo
        return "stages", f"{arm}/{stage}"
    return stage, None


# ---- records ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def recorded(run: RunDir, node: str) -> dict | None:
    """The record stored with `node`'s output, or None (no output, or none recorded)."""
    folder = _folder(run, node)
    if folder is not None:
        return _read_json(folder / RECORD_FILE)
    if node == "report" and not (run.root / "report.html").is_file():
        return None
    record = run.read_results().get(node, {}).get("fingerprint")
    return record if isinstance(record, dict) else None  # a bare string: an older mixcpt's


def output_exists(run: RunDir, node: str) -> bool:
    folder = _folder(run, node)
    if folder is not None:
        return folder.is_dir()
    if node == "report":
        return (run.root / "report.html").is_file()
    return node in run.read_results()


def write_record(folder: Path, record: dict) -> None:
    """Store `record` in `folder` (an output's temporary folder, before it is renamed)."""
    write_json_atomic(Path(folder) / RECORD_FILE, record)


def _listing_hash(folder: Path) -> str:
    """Names, sizes and times of the files under `folder`: the identity of an output that has no
    record (a folder mixcpt did not build, such as one prepared by hand)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            rel = path.relative_to(folder).as_posix()
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"unrecorded:{digest.hexdigest()}"


def _identity(run: RunDir, node: str) -> str | None:
    """What a node reading `node` records of it: its build id; for an output without a record,
    its files' names, sizes and times; None when there is no output."""
    record = recorded(run, node)
    if record is not None:
        return record.get("build")
    folder = _folder(run, node)
    return _listing_hash(folder) if folder is not None and folder.is_dir() else None


def make_record(inputs: dict) -> dict:
    """A new build's record of `inputs`."""
    text = json.dumps(inputs, sort_keys=True)
    return {
        "fingerprint": hashlib.sha256(text.encode()).hexdigest(),
        "build": uuid.uuid4().hex,
        "inputs": inputs,
    }


def inputs_now(cfg: Config, run: RunDir, node: str) -> dict:
    """What `node` would be built from now: its config keys and files, and the outputs it reads
    as they are on disk."""
    config, files = config_and_files(cfg, run, node)
    stages = {u: _identity(run, u) for u in upstream(cfg, node)}
    return {"config": config, "files": files, "stages": stages, "mixcpt": MIXCPT_VERSION}


# ---- decisions ----------------------------------------------------------------------------------

_ABSENT = object()


def _show(value) -> str:
    if value is _ABSENT:
        return "(unset)"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(section: str, key: str, old, new) -> str:
    """One changed input in words."""
    if section == "config":
        return f"{key} changed: {_show(old)} -> {_show(new)}"
    if section == "files":
        return f"{key}: file contents changed" if _ABSENT not in (old, new) else f"{key} changed"
    if new is _ABSENT or old is _ABSENT:
        return f"{key} {'is no longer' if new is _ABSENT else 'is now'} read"
    if new is None:
        return f"{key} is missing"
    return f"{key} was missing" if old is None else f"{key} was rebuilt"


def difference(old: dict, new: dict) -> str:
    """The first input that differs between two records' "inputs", in words ("" when none):
    config keys first, then files, then the outputs read, then mixcpt's version."""
    for section in ("config", "files", "stages"):
        before, now = old.get(section, {}), new.get(section, {})
        for key in [*now, *(k for k in before if k not in now)]:
            a, b = before.get(key, _ABSENT), now.get(key, _ABSENT)
            if a != b:
                return _describe(section, key, a, b)
    if old.get("mixcpt") != new.get("mixcpt"):
        return f"mixcpt version changed: {old.get('mixcpt')} -> {new.get('mixcpt')}"
    return ""


@dataclass
class Verdict:
    """Where one node stands.

    state:       "done" (built from these inputs, and so is everything it reads), "stale" (built,
                 but from other inputs or from outputs that are not done) or "missing"
    reason:      why stale
    same_inputs: its record matches the inputs on disk now (a stage command reuses it)
    changed:     it has a record, and its inputs changed since (what reads it must wait)
    record:      what a build now would record
    """

    state: str
    reason: str
    same_inputs: bool
    changed: bool
    record: dict


def assess(cfg: Config, run: RunDir, until: str | None = None) -> dict[str, Verdict]:
    """{node: Verdict} for every node of `cfg` in build order, or for `until` and the nodes it
    depends on (also one this config would not build: a stage function called directly). Hashes
    every input file (each once per size and time)."""
    verdicts: dict[str, Verdict] = {}

    def visit(node: str) -> None:
        if node in verdicts:
            return
        for u in upstream(cfg, node):
            visit(u)
        record = make_record(inputs_now(cfg, run, node))
        old = recorded(run, node)
        same = old is not None and old.get("fingerprint") == record["fingerprint"]
        behind = [u for u in upstream(cfg, node) if verdicts[u].state != "done"]
        if old is None:
            built = output_exists(run, node)
            state, reason = ("stale", "no fingerprint recorded") if built else ("missing", "")
        elif not same:
            reason = difference(old.get("inputs", {}), record["inputs"]) or "inputs changed"
            state = "stale"
        elif behind:
            state, reason = "stale", f"{behind[0]} is {verdicts[behind[0]].state}"
        else:
            state, reason = "done", ""
        verdicts[node] = Verdict(state, reason, same, old is not None and not same, record)

    for node in [until] if until else nodes(cfg):
        visit(node)
    return verdicts


def begin(cfg: Config, run: RunDir, node: str, force: bool = False) -> dict | None:
    """Decide whether the stage building `node` reuses its output or builds it, and say which
    and why in one line ("mixcpt: cpt/mixcpt: rebuilding (cpt.lssd_weight changed: ...)").

    Returns None when the recorded output was built from the inputs on disk now and `force` is
    off: the caller returns what it recorded. Otherwise returns the record to store with the new
    output, after the main process dropped the node's results.json entry and its checkpoints,
    unless those were made from the same inputs (a rerun resuming). Raises `UserError` when an
    output it depends on was built from other inputs than the config's: that stage must be
    rebuilt first. Every stage but data and report calls it on every process of a launch (only
    the main process prints and discards); those two on the main process only.
    """
    # imported here: `status` reads fingerprints without loading torch
    from mixcpt.processes import process_state

    verdicts = assess(cfg, run, until=node)  # node and the nodes it depends on, in build order
    # An output built from other inputs than the config's would feed this stage stale data.
    # Missing outputs are the stage's own business, and folders without a record are read as they
    # are (tests and hand-made folders).
    first = next((n for n, v in verdicts.items() if n != node and v.changed), None)
    if first is not None:
        raise UserError(
            f"{first} is stale ({verdicts[first].reason}); rebuild it first: "
            f"`mixcpt {first.partition('/')[0]} CONFIG --output {run.root}`, or `mixcpt run`"
        )
    verdict, state = verdicts[node], process_state()
    if verdict.same_inputs and not force:
        if state.is_main_process:
            print(f"mixcpt: {node}: reused", flush=True)
        return None
    old = recorded(run, node)
    if force:
        reason = "--force"
    elif old is not None:
        reason = difference(old.get("inputs", {}), verdict.record["inputs"]) or "inputs changed"
    else:
        reason = "no fingerprint recorded" if output_exists(run, node) else "no earlier output"
    if state.is_main_process:
        built = old is not None or output_exists(run, node)
        print(f"mixcpt: {node}: {'rebuilding' if built else 'building'} ({reason})", flush=True)
        _discard_stale(run, node, verdict.record, force)
    stage, _, _ = node.partition("/")
    if stage in TRAINED_STAGES:  # the other processes resume from what the main one kept
        state.wait_for_everyone()
    return verdict.record


def _discard_stale(run: RunDir, node: str, record: dict, force: bool) -> None:
    """Before `node` is built for `record`: drop its results.json entry and timing (mixcpt.timing)
    and, for a training stage, its checkpoints unless they were made for the same fingerprint
    (never resume from others)."""
    run.discard_results(*_results_key(node))
    run.discard_results("timing", node)
    stage, _, arm = node.partition("/")
    if stage not in TRAINED_STAGES:
        return
    work = run.work(arm, stage)
    kept = _read_json(work / RECORD_FILE) or {}
    if force or kept.get("fingerprint") != record["fingerprint"]:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_json_atomic(work / RECORD_FILE, record)


def status_lines(cfg: Config, run: RunDir) -> list[str]:
    """One line per node: its name, then done, stale (and why) or missing, and the other arms
    that use it when it is shared (a stage-1 model or a selection)."""
    verdicts = assess(cfg, run)
    stage1, selection = owners(cfg)
    users = {}
    for stage, owner_of in (("cpt", stage1), ("select", selection)):
        for arm, owner in owner_of.items():
            if owner not in (None, arm):
                users.setdefault(f"{stage}/{owner}", []).append(arm)
    width = max(len(node) for node in verdicts) + 2
    return [
        f"{node:<{width}}{v.state}"
        + (f" ({v.reason})" if v.reason else "")
        + (f"; also used by {', '.join(users[node])}" if node in users else "")
        for node, v in verdicts.items()
    ]
