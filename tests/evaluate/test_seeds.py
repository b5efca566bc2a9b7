import json

import pytest

from mixcpt.evaluate.seeds import aggregate_seeds, seed_run
from mixcpt.rundir import RunDir

CELLS = {
    ("base", "base"): {"domain": 0.25, "general": 0.8},
    ("mixcpt", "cpt"): {"domain": 0.6, "general": 0.75, "kl": 0.1},
    ("mixcpt", "sft"): {"domain": 0.6, "general": 0.7, "kl": 0.2, "chat_domain": 0.9},
    ("baseline", "cpt"): {"domain": 0.6, "general": 0.3, "kl": 0.5},
    ("baseline", "sft"): {"domain": 0.6, "general": 0.7, "kl": 0.2, "chat_domain": 0.2},
}


def write_seed_results(run: RunDir, tables: dict) -> None:
    """DIR/seed-<s>/results.json with the eval table of each seed, as the eval stage leaves it."""
    for seed, table in tables.items():
        for key in ("rows", "benchmarks"):
            seed_run(run, seed).update_results("eval", key, table[key])


def test_the_aggregate_of_two_seeds_has_means_intervals_claims_and_a_report(
    tmp_path, fake_eval_table
):
    run = RunDir(tmp_path / "run")
    second = {**CELLS, ("mixcpt", "cpt"): {"domain": 0.8, "general": 0.75, "kl": 0.3}}
    write_seed_results(run, {3: fake_eval_table(CELLS), 4: fake_eval_table(second)})

    html_path, md_path = aggregate_seeds(run, [3, 4])

    results = json.loads(run.results_path.read_text())
    assert results["seeds"] == {"values": [3, 4], "folders": ["seed-3", "seed-4"]}
    rows = {(r["arm"], r["stage"]): r for r in results["eval"]["rows"]}
    cpt = rows[("mixcpt", "cpt")]
    assert cpt["seeds"] == [3, 4] and cpt["scores"]["dom"]["acc_norm"] == pytest.approx(0.7)
    low, high = cpt["intervals"]["scores"]["dom"]
    assert low < 0.7 < high
    assert rows[("mixcpt", "sft")]["chat_scores"]["dom"]["acc_norm"] == pytest.approx(0.9)
    assert results["eval"]["bootstrap"]["seeds"] == [3, 4]
    claims = {c["id"]: c for c in results["claims"]}
    assert claims[1]["verdict"] == "supported" and claims[1]["measures"][0]["seeds"] == [3, 4]
    md = md_path.read_text()
    assert "## Claims" in md and "seed 3 in seed-3/" in md
    assert "| 1. After alignment, Mix-CPT" in md and "✔ supported" in md
    assert "arm mixture-ce not in this run" in md
    assert "two-level percentile bootstrap, 2000 resamples" in md
    assert "<h2>Claims</h2>" in html_path.read_text()


def test_a_seed_without_an_eval_table_is_named(tmp_path, fake_eval_table):
    from mixcpt.errors import UserError

    run = RunDir(tmp_path / "run")
    write_seed_results(run, {0: fake_eval_table(CELLS)})
    with pytest.raises(UserError, match="seed-1: no eval table"):
        aggregate_seeds(run, [0, 1])
