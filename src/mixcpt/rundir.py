"""The run folder: where every stage reads its inputs and writes its outputs.

    DIR/data/{mix,domain,pool}/   D_MIX, the baseline's D_K stream, the general pool (data stage)
    DIR/base/                     the base model when mixcpt had to build or convert it (demo, GGUF)
    DIR/<arm>/<stage>/            HF model folders: arm in {mixcpt, baseline}, stage in {cpt, sft, dpo}
    DIR/mixcpt/selection/         the k selected samples and every sample's score
    DIR/.work/<arm>-<stage>/      Trainer checkpoints of a stage in progress (resume reads them)
    DIR/results.json              every stage's metrics, updated by write-then-rename
    DIR/report.{html,md}          the report

A stage is done when its final folder exists: folders are built under a temporary name and
renamed at the end, so a killed run never leaves a half-written folder that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ARMS = ("mixcpt", "baseline")
TRAINED_STAGES = ("cpt", "sft", "dpo")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- layout -------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def selection(self) -> Path:
        return self.root / "mixcpt" / "selection"

    @property
    def results_path(self) -> Path:
        return self.root / "results.json"

    def stage(self, arm: str, stage: str) -> Path:
        """Final HF model folder of `stage` ("cpt", "sft", "dpo") in `arm` ("mixcpt", "baseline")."""
        assert arm in ARMS and stage in TRAINED_STAGES, (arm, stage)
        return self.root / arm / stage

    def work(self, arm: str, stage: str) -> Path:
        """Checkpoint folder of a stage in progress; removed once the stage is done."""
        return self.root / ".work" / f"{arm}-{stage}"

    # ---- results.json -------------------------------------------------------------------
    def read_results(self) -> dict[str, Any]:
        if not self.results_path.exists():
            return {}
        return json.loads(self.results_path.read_text(encoding="utf-8"))

    def update_results(self, section: str, key: str, value: Any) -> None:
        """Set `results[section][key] = value`, keeping everything else; atomic on disk."""
        results = self.read_results()
        results.setdefault(section, {})[key] = value
        write_json_atomic(self.results_path, results)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file
    os.replace(tmp, path)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`, on error it is removed.

    Temporary folders of `final` left by a killed process (SIGKILL, power loss: no `except` ran)
    are removed first, so they neither pile up nor are ever mistaken for output.

    An older `final` (a rebuild after the inputs changed) is moved aside before the rename and
    deleted only after it, so at every instant either the old or the new folder is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_leftovers(final: Path) -> None:
    """Delete `.<name>.tmp-PID` / `.<name>.old-PID` siblings of `final` whose process is gone.
    A live PID is left alone: that process may be building the folder right now."""
    for path in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = path.name[len(final.name) + 2 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def last_complete_checkpoint(work: Path) -> str | None:
    """The newest Trainer checkpoint in `work` that was written to the end, or None.

    transformers (5.x) writes `checkpoint-N/` in place, trainer_state.json last, and
    `get_last_checkpoint` returns the highest N whether or not its writing finished. A process
    killed or out of disk space mid-save leaves a partial folder; resuming from it would fail or
    load half a state. Partial folders are deleted here (they belong to this stage's work folder
    only), so the run resumes from the previous, complete checkpoint and rewrites step N.
    """
    if not work.is_dir():
        return None
    complete = []
    for path in sorted(work.glob("checkpoint-*")):
        step = path.name.removeprefix("checkpoint-")
        if not (path.is_dir() and step.isdigit()):
            continue
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            complete.append((int(step), path))
        except (OSError, ValueError):
            shutil.rmtree(path, ignore_errors=True)
    return str(max(complete)[1]) if complete else None
