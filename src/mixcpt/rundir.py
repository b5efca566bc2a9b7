"""The run folder: where every stage reads its inputs and writes its outputs.

    DIR/data/{mix,domain,pool}/   D_MIX, D_K (the domain stream), the general pool (data stage)
    DIR/data/replay/              D_R, the replay stream, when data.replay is set
    DIR/base/                     the base model when mixcpt had to build or convert it (demo, GGUF)
    DIR/<arm>/<stage>/            HF model folders of each arm the config trains (mixcpt,
                                  traditional, ...), stage in {cpt, sft, dpo}; an arm that shares
                                  stage 1 with an earlier arm has no cpt folder of its own
    DIR/<arm>/selection/          the k selected samples and every sample's score
    DIR/.work/<arm>-<stage>/      Trainer checkpoints of a stage in progress (resume reads them)
    DIR/logs/<arm>/<stage>/       TensorBoard event files of each training stage (report_to)
    DIR/results.json              every stage's metrics and timing (mixcpt.timing), updated by
                                  write-then-rename
    DIR/report.{html,md}          the report

Folders are built under a temporary name and renamed at the end, so a killed run never leaves a
half-written folder that looks finished. Each output records what it was built from
(mixcpt.fingerprints): a stage is done when that record matches the config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixcpt.atomic import write_json_atomic
from mixcpt.errors import InputError

if TYPE_CHECKING:
    from mixcpt.config import ModelConfig

TRAINED_STAGES = ("cpt", "sft", "dpo")


def base_model_path(model_cfg: ModelConfig, run_base: Path) -> str:
    """Where the base model is read from: the run's own `base/` folder when mixcpt built or
    converted one there (demo, GGUF), else the configured path or hub id."""
    return str(run_base) if run_base.exists() else model_cfg.path


class RunDir:
    """The paths of one run folder and its results.json."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- layout -------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def base(self) -> Path:
        return self.root / "base"

    def selection(self, arm: str) -> Path:
        """The selection `arm` made with its stage-1 model (the select stage)."""
        return self.root / arm / "selection"

    @property
    def results_path(self) -> Path:
        return self.root / "results.json"

    def stage(self, arm: str, stage: str) -> Path:
        """Final HF model folder of `stage` ("cpt", "sft", "dpo") in `arm` ("mixcpt", ...)."""
        assert arm and stage in TRAINED_STAGES, (arm, stage)
        return self.root / arm / stage

    def finished_model(self, arm: str, stage: str) -> Path:
        """`stage(arm, stage)` when that stage has finished; else an InputError saying which
        stage to run first."""
        folder = self.stage(arm, stage)
        if not folder.is_dir():
            raise InputError(folder, None, f"model folder missing; run the `{stage}` stage first")
        return folder

    def logs(self, arm: str, stage: str) -> Path:
        """TensorBoard folder of a training stage; kept after the stage, unlike `work`."""
        return self.root / "logs" / arm / stage

    def work(self, arm: str, stage: str) -> Path:
        """Checkpoint folder of a stage in progress; removed once the stage is done."""
        return self.root / ".work" / f"{arm}-{stage}"

    # ---- results.json -------------------------------------------------------------------
    def read_results(self) -> dict[str, Any]:
        if not self.results_path.exists():
            return {}
        return json.loads(self.results_path.read_text(encoding="utf-8"))

    def recorded_metrics(self, key: str) -> dict:
        """The metrics a finished stage recorded under results["stages"][key] ({} when none)."""
        return self.read_results().get("stages", {}).get(key, {})

    def update_results(self, section: str, key: str, value: Any) -> None:
        """Set `results[section][key] = value`, keeping everything else; atomic on disk."""
        results = self.read_results()
        results.setdefault(section, {})[key] = value
        write_json_atomic(self.results_path, results)

    def set_results(self, section: str, value: Any) -> None:
        """Set `results[section] = value` (a whole top-level entry, such as "claims"), keeping
        everything else; atomic on disk."""
        results = self.read_results()
        results[section] = value
        write_json_atomic(self.results_path, results)

    def discard_results(self, section: str, key: str | None = None) -> None:
        """Remove `results[section][key]`, or the whole section when `key` is None, keeping
        everything else; atomic on disk, and nothing is written when there is nothing to remove."""
        results = self.read_results()
        if section not in results or (key is not None and key not in results[section]):
            return
        if key is None:
            del results[section]
        else:
            del results[section][key]
        write_json_atomic(self.results_path, results)
