"""A stage's checkpoints remember what they were started with
(`train.resumable.check_started_with`): resuming them under other settings is a ConfigError naming
the keys, never a silent mix."""

from __future__ import annotations

import json

import pytest

from mixcpt.errors import ConfigError
from mixcpt.train.resumable import STARTED_WITH, check_started_with

STARTED = {
    "cpt": {"lssd_weight": 1.0, "training": {"learning_rate": 3e-3, "save_steps": 3}},
    "seed": 0,
    "model": {"path": "/models/base", "dtype": "float32"},
    "teacher": {"teacher_hash": "ab12", "top_k": 64},
}


def changed(**updates) -> dict:
    """STARTED with dotted keys replaced."""
    tree = json.loads(json.dumps(STARTED))
    for dotted, value in updates.items():
        *path, last = dotted.split("__")
        node = tree
        for key in path:
            node = node[key]
        node[last] = value
    return tree


def test_a_fresh_start_records_and_a_resume_compares(tmp_path):
    check_started_with(tmp_path, STARTED, resume=None, writer=True)
    assert json.loads((tmp_path / STARTED_WITH).read_text()) == STARTED
    check_started_with(tmp_path, STARTED, resume="checkpoint-3", writer=True)  # same: fine
    # a fresh start (no complete checkpoint) under new settings replaces the record
    check_started_with(tmp_path, changed(seed=1), resume=None, writer=True)
    assert json.loads((tmp_path / STARTED_WITH).read_text())["seed"] == 1


@pytest.mark.parametrize(
    "updates, named",
    [
        (
            {"cpt__training__learning_rate": 1e-3},
            "cpt.training.learning_rate: 0.003 then, 0.001 now",
        ),
        ({"teacher__teacher_hash": "cd34"}, "teacher.teacher_hash: ab12 then, cd34 now"),
        ({"model__path": "/models/other"}, "model.path: /models/base then, /models/other now"),
    ],
)
def test_a_resume_under_other_settings_names_them(tmp_path, updates, named):
    check_started_with(tmp_path, STARTED, resume=None, writer=True)
    with pytest.raises(ConfigError) as err:
        check_started_with(tmp_path, changed(**updates), resume="checkpoint-3", writer=True)
    assert str(err.value).startswith(f"{named}: the checkpoints in {tmp_path} were started with")
    assert f"delete {tmp_path} to restart this stage" in str(err.value)


def test_settings_that_change_no_step_may_change_and_many_differences_are_counted(tmp_path):
    check_started_with(tmp_path, STARTED, resume=None, writer=True)
    check_started_with(tmp_path, changed(cpt__training__save_steps=10), "checkpoint-3", True)
    check_started_with(tmp_path, changed(cpt__training__report_to="none"), "checkpoint-3", True)
    many = changed(seed=5, cpt__lssd_weight=0.5, model__dtype="bfloat16", teacher__top_k=8)
    with pytest.raises(ConfigError, match=r"\(and 1 more\)"):
        check_started_with(tmp_path, many, resume="checkpoint-3", writer=True)
    with pytest.raises(ConfigError, match="cpt.extra: <absent> then, 1 now"):
        check_started_with(tmp_path, changed(cpt__extra=1), resume="checkpoint-3", writer=True)


def test_checkpoints_without_a_record_resume_with_a_warning(tmp_path, capsys):
    check_started_with(tmp_path, STARTED, resume="checkpoint-3", writer=True)
    assert "resuming without checking" in capsys.readouterr().err
    assert not (tmp_path / STARTED_WITH).exists()
