import pytest

from mixcpt.evaluate.claims import EQUIVALENCE_MARGIN, verdict
from mixcpt.evaluate.intervals import summarise


@pytest.mark.parametrize(
    "test, ci, higher_is_better, expected",
    [
        ("better", [0.01, 0.2], True, "supported"),
        ("better", [-0.3, -0.01], True, "contradicted"),
        ("better", [-0.1, 0.1], True, "inconclusive"),
        ("better", [0.0, 0.0], True, "inconclusive"),  # a tie (both at 0) shows nothing
        ("better", [-0.2, -0.1], False, "supported"),  # KL: A lower than B is A better
        ("better", [0.1, 0.2], False, "contradicted"),
        ("better", None, True, "inconclusive"),  # no interval, no verdict
        ("equivalent", [-0.02, 0.03], True, "supported"),
        ("equivalent", [EQUIVALENCE_MARGIN + 0.01, 0.2], True, "contradicted"),
        ("equivalent", [-0.3, -EQUIVALENCE_MARGIN - 0.01], True, "contradicted"),
        ("equivalent", [-0.04, 0.08], True, "inconclusive"),
    ],
)
def test_verdict_of_an_interval(test, ci, higher_is_better, expected):
    assert verdict(test, ci, higher_is_better) == expected


def _claims(fake_eval_table, cells, n=40):
    return {c["id"]: c for c in summarise([fake_eval_table(cells, n)], [0])["claims"]}


def test_claims_are_decided_by_paired_intervals_and_absent_arms_are_listed(fake_eval_table):
    cells = {
        ("base", "base"): {"domain": 0.25, "general": 0.8},
        ("mixcpt", "cpt"): {"domain": 0.6, "general": 0.75, "kl": 0.1},
        ("mixcpt", "sft"): {"domain": 0.6, "general": 0.7, "kl": 0.2, "chat_domain": 0.9},
        ("baseline", "cpt"): {"domain": 0.6, "general": 0.3, "kl": 0.5},
        ("baseline", "sft"): {"domain": 0.6, "general": 0.7, "kl": 0.2, "chat_domain": 0.2},
    }
    claims = _claims(fake_eval_table, cells)
    one = claims[1]
    # decided through chat (0.9 vs 0.2 of 40 items, the same items): supported; the plain
    # format, equal for both arms, is shown and does not decide
    assert one["verdict"] == "supported"
    chat, plain = one["measures"]
    assert chat["format"] == "chat" and chat["decides"] and chat["verdict"] == "supported"
    assert chat["stage"] == {"mixcpt": "sft", "baseline": "sft"}  # no dpo: the last aligned
    assert chat["a"]["mean"] == pytest.approx(0.9) and chat["b"]["mean"] == pytest.approx(0.2)
    low, high = chat["difference"]["ci"]
    assert 0 < low < 0.7 < high and chat["difference"]["mean"] == pytest.approx(0.7)
    assert not plain["decides"] and plain["verdict"] == "inconclusive"
    assert plain["difference"]["ci"] == [0.0, 0.0]
    # retention: better general QA and lower KL after stage 1, but equal after alignment
    two = claims[2]
    by_stage = {(m["measure"], m["when"]): m["verdict"] for m in two["measures"]}
    assert by_stage[("general QA", "after stage 1")] == "supported"
    assert by_stage[("KL to base", "after stage 1")] == "supported"
    assert by_stage[("general QA", "after alignment")] == "inconclusive"
    assert two["verdict"] == "inconclusive"
    for i, arm in [(3, "mixture-ce"), (4, "random-k"), (5, "whole-pool")]:
        assert claims[i]["verdict"] == "inconclusive"
        assert claims[i]["reason"] == f"arm {arm} not in this run"


def test_the_traditional_arm_is_found_under_its_name_or_its_older_name(fake_eval_table):
    cells = {
        ("base", "base"): {"domain": 0.25, "general": 0.8},
        ("mixcpt", "cpt"): {"domain": 0.6, "general": 0.75, "kl": 0.1},
        ("mixcpt", "sft"): {"domain": 0.6, "general": 0.7, "kl": 0.2, "chat_domain": 0.9},
    }
    traditional = {"domain": 0.6, "general": 0.7, "kl": 0.2, "chat_domain": 0.2}
    for name in ("traditional", "baseline"):
        claims = _claims(fake_eval_table, {**cells, (name, "sft"): traditional})
        assert claims[1]["arms"] == ["mixcpt", name]
        assert claims[1]["verdict"] == "supported"
        assert claims[1]["measures"][0]["b"]["mean"] == pytest.approx(0.2)


def test_a_claim_contradicted_by_the_other_arm(fake_eval_table):
    cells = {
        ("base", "base"): {"domain": 0.25, "general": 0.8},
        ("mixcpt", "cpt"): {"domain": 0.5, "general": 0.3, "kl": 0.6},
        ("mixture-ce", "cpt"): {"domain": 0.5, "general": 0.7, "kl": 0.2},
        ("mixcpt", "dpo"): {"domain": 0.5, "general": 0.7, "chat_domain": 0.5},
        ("whole-pool", "dpo"): {"domain": 0.5, "general": 0.7, "chat_domain": 0.5},
    }
    claims = _claims(fake_eval_table, cells, n=200)
    assert claims[3]["verdict"] == "contradicted"  # CE alone forgot less here
    # the same answers on the same items: the difference is 0 in every resample, within margin
    assert claims[5]["verdict"] == "supported"
    assert all(m["difference"]["ci"] == [0.0, 0.0] for m in claims[5]["measures"])
