"""lm-evaluation-harness bridge: run lm-eval tasks by name on an in-memory model.

Built-in tasks (MMLU, ARC, GSM8K, ...) need the hub or a local dataset cache; a task YAML with
`dataset_path: json` and local `data_files` in `eval.lm_eval_include_path` works offline.
lm-eval is an optional extra, imported only here and only when tasks are configured.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mixcpt.errors import ConfigError


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(
            f"eval.lm_eval_tasks needs lm-evaluation-harness ({err}); "
            "install it with `pip install mixcpt[eval]`"
        ) from err
    return lm_eval, HFLM, TaskManager


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    # indexing lm-eval's thousands of task YAMLs takes seconds: once per process, not per model
    return _import_lm_eval()[2](include_path=include_path)


def run_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    include_path: str | None = None,
    batch_size: int = 8,
    max_length: int = 1024,
    limit: int | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` output for `tasks` on `model` (no copy, no reload).

    Raises `ConfigError` for a task name lm-eval does not know, `ImportError` without lm-eval.
    """
    lm_eval, HFLM, _ = _import_lm_eval()
    manager = _task_manager(include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"eval.lm_eval_tasks: unknown lm-eval task(s) {unknown} (include path: {include_path})"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=log_samples,
        bootstrap_iters=0,
    )


def lm_eval_scores(output: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from a `simple_evaluate` output: every numeric metric of the
    default filter ("acc,none" -> "acc"), stderr entries left out."""
    scores = {}
    for task, metrics in output["results"].items():
        scores[task] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))
        }
    return scores
