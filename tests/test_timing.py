"""mixcpt.timing: what a stage's timing entry says (the quickstart test times a whole run)."""

import pytest

from mixcpt.timing import describe, measure


def test_an_entry_gives_the_count_the_stage_reports_and_its_rate():
    entry = measure("cpt/mixcpt", {"tokens": 40960, "steps": 10, "resumed_from": None}, None, 4.0)
    assert entry == {
        "wall_s": 4.0,
        "processed": 40960,
        "unit": "tokens",
        "per_s": 10240.0,
        "reused": False,
    }
    assert describe(entry) == "40,960 tokens, 10,240 tokens/s"
    pools = {"instructions": {"pool": 30, "skipped": 2}, "preferences": {"pool": 10, "skipped": 0}}
    assert measure("select", pools, None, 2.0)["processed"] == 38


def test_a_resumed_stage_counts_only_the_steps_it_took_after_the_checkpoint():
    metrics = {"pairs": 80, "steps": 10, "resumed_from": "/run/.work/mixcpt-dpo/checkpoint-4"}
    entry = measure("dpo/mixcpt", metrics, None, 3.0)
    assert entry["processed"] == 48 and entry["resumed_at_step"] == 4
    assert entry["per_s"] == pytest.approx(16.0)
    assert describe(entry) == "48 pairs, 16 pairs/s"
