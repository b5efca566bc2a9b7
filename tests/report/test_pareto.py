"""The Pareto plot: every arm as a point of domain gained against general ability lost, with the
non-dominated ones joined as the frontier."""

from __future__ import annotations

import base64
import re

import pytest

from mixcpt.evaluate.intervals import summarise
from mixcpt.report import write_report
from mixcpt.report.pareto import ALIGNED, STAGE_ONE, pareto_front, pareto_points, pareto_table
from mixcpt.rundir import RunDir

CELLS = {
    ("base", "base"): {"domain": 0.2, "general": 0.6, "kl": 0.0},
    ("mixcpt", "cpt"): {"domain": 0.6, "general": 0.5, "kl": 0.1},
    ("baseline", "cpt"): {"domain": 0.7, "general": 0.3, "kl": 0.4},
    # less domain and more general loss than mixcpt, but less KL
    ("mixture-ce", "cpt"): {"domain": 0.5, "general": 0.4, "kl": 0.05},
    ("random-k", "cpt"): {"domain": 0.6, "general": 0.5, "kl": 0.1},  # mixcpt's model
    ("mixcpt", "sft"): {"domain": 0.65, "general": 0.55, "kl": 0.2},
    ("mixcpt", "dpo"): {"domain": 0.7, "general": 0.55, "kl": 0.25},
    ("baseline", "sft"): {"domain": 0.6, "general": 0.45, "kl": 0.5},
}


def test_the_frontier_keeps_the_non_dominated_points_and_ties():
    points = [
        (0.3, 0.2),  # 0
        (0.1, 0.3),  # 1: dominated by 0 (less gain, more loss)
        (0.4, 0.25),  # 2: more gain for more loss: on the frontier
        (0.3, 0.2),  # 3: equal to 0: neither dominates the other
        (0.3, 0.25),  # 4: as much gain as 0 for more loss: dominated
        (0.4, 0.25 + 1e-9),  # 5: dominated by 2, by a hair
    ]
    assert pareto_front(points) == [0, 3, 2]  # along the line, by gain
    # as much loss as the other up to float noise (0.1 + 0.2 != 0.3), and less gain: dominated
    assert pareto_front([(0.4, 0.1 + 0.2), (0.2, 0.3)]) == [0]
    assert pareto_front([]) == []
    # worse than the base (no gain, no loss) on both axes: dominated by not training at all
    assert pareto_front([(-0.1, 0.5)]) == []
    assert pareto_front([(-0.1, 0.5)], base=None) == [0]
    assert pareto_front([(0.0, 0.0), (-0.1, -0.1)]) == [1, 0]  # the base's equal is kept


@pytest.fixture
def results(fake_eval_table):
    table = summarise([fake_eval_table(CELLS)], [0])
    return {"eval": {k: table[k] for k in ("rows", "benchmarks", "bootstrap")}}


def test_points_are_gains_and_losses_against_the_base_with_paired_intervals(results):
    points = {p.arms: p for p in pareto_points(results, STAGE_ONE)}
    # random-k shares mixcpt's stage-1 model: one point; the perplexity benchmark counts nowhere
    assert set(points) == {("mixcpt", "random-k"), ("baseline",), ("mixture-ce",)}
    mixcpt = points[("mixcpt", "random-k")]
    assert (mixcpt.stage, mixcpt.gain, mixcpt.loss, mixcpt.kl) == pytest.approx(
        ("cpt", 0.4, 0.1, 0.1)
    )
    for p in points.values():
        for value, ci in ((p.gain, p.gain_ci), (p.loss, p.loss_ci), (p.kl, p.kl_ci)):
            assert ci[0] <= value <= ci[1]
    # paired with the base as the retention delta of the one general accuracy benchmark is
    row = next(r for r in results["eval"]["rows"] if (r["arm"], r["stage"]) == ("mixcpt", "cpt"))
    low, high = row["intervals"]["delta"]["gen"]
    assert mixcpt.loss_ci == pytest.approx([-high, -low])
    aligned = {p.arms: p for p in pareto_points(results, ALIGNED)}
    assert aligned[("mixcpt",)].stage == "dpo" and aligned[("baseline",)].stage == "sft"
    assert aligned[("mixcpt",)].gain == pytest.approx(0.5)


def test_the_table_marks_the_frontier_of_each_panel(results):
    header, cells = pareto_table(results, STAGE_ONE)
    frontier = {row[0]: (row[5], row[6]) for row in cells}
    assert header[2:5] == ["domain gain", "general loss", "KL to base"]
    assert frontier == {
        "mixcpt, random-k": ("✔", "✔"),
        "baseline": ("✔", "✔"),  # the most domain gained
        "mixture-ce": ("", "✔"),
    }
    assert cells[0][2].startswith("0.4 [")  # the mean and its interval


def test_the_report_shows_a_pareto_plot_and_table_after_each_stage(results, tmp_path):
    run = RunDir(tmp_path / "run")
    for key, value in results["eval"].items():
        run.update_results("eval", key, value)
    html_path, md_path = write_report(run)
    page = html_path.read_text()
    for when in (STAGE_ONE, ALIGNED):
        found = re.search(rf'alt="Pareto plot {when}" src="data:image/png;base64,([^"]+)"', page)
        assert found and base64.b64decode(found.group(1)).startswith(b"\x89PNG")
        assert f"## Pareto {when}" in md_path.read_text()
    assert page.count("<th>frontier (loss)</th>") == 2
