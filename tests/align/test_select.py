import json
import logging
import math

import pytest
import torch

from mixcpt.align.select import choose, choose_fas, run_select
from mixcpt.models import load_model, load_tokenizer


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@torch.no_grad()
def direct_mean_nll(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """Mean NLL of the response tokens, one unpadded sequence, straight from log_softmax."""
    logp = torch.log_softmax(
        model(torch.tensor([prompt_ids + response_ids])).logits[0], -1
    )  # [T, V]
    return -sum(
        logp[len(prompt_ids) - 1 + t, tok].item() for t, tok in enumerate(response_ids)
    ) / len(response_ids)


def test_selection_ranks_by_true_mean_response_nll(cfg, run, pool_rows):
    summary = run_select(cfg, run, "mixcpt")

    model, tok = load_model(run.stage("mixcpt", "cpt")), load_tokenizer(run.stage("mixcpt", "cpt"))
    records = {r["id"]: r for r in read_jsonl(run.selection("mixcpt") / "selection.jsonl")}
    for kind, rows, response_of in (
        ("instruction", pool_rows[0], lambda r: r["plain_response"]),
        ("preference", pool_rows[1], lambda r: r["chosen"]),
    ):
        direct = {}
        for row in rows:
            if records[row["id"]].get("skipped"):
                continue
            response_ids = tok(response_of(row), add_special_tokens=False).input_ids + [
                tok.eos_token_id
            ]
            direct[row["id"]] = direct_mean_nll(
                model, tok(row["plain_prompt"]).input_ids, response_ids
            )
            assert records[row["id"]]["nll"] == pytest.approx(direct[row["id"]], abs=1e-4)
            assert records[row["id"]]["score"] == pytest.approx(
                math.exp(direct[row["id"]]), rel=1e-4
            )
            assert records[row["id"]]["n_response_tokens"] == len(response_ids)
        easiest = sorted(direct, key=direct.get)[: cfg.select.k]
        assert {i for i, r in records.items() if r["kind"] == kind and r["selected"]} == set(
            easiest
        )
        assert summary[f"{kind}s"]["selected"] == cfg.select.k

    # The selected rows are written unchanged, in pool order.
    kept = read_jsonl(run.selection("mixcpt") / "instructions.jsonl")
    assert kept == [r for r in pool_rows[0] if records[r["id"]]["selected"]]
    assert run.read_results()["stages"]["mixcpt/select"] == summary


def test_selection_is_deterministic_and_skips_rerun(make_cfg, run, tmp_path):
    cfg = make_cfg(select={"strategy": "random"})
    run_select(cfg, run, "mixcpt")
    first = (run.selection("mixcpt") / "selection.jsonl").read_bytes()
    mtime = (run.selection("mixcpt") / "selection.jsonl").stat().st_mtime_ns
    done = run.read_results()["stages"]["mixcpt/select"]
    assert run_select(cfg, run, "mixcpt") == done  # done: not redone
    assert (run.selection("mixcpt") / "selection.jsonl").stat().st_mtime_ns == mtime

    (tmp_path / "again").mkdir()
    again = type(run)(tmp_path / "again")
    (again.root / "data").symlink_to(run.data)
    (again.root / "mixcpt").mkdir()
    (again.root / "mixcpt" / "cpt").symlink_to(run.stage("mixcpt", "cpt"))
    run_select(cfg, again, "mixcpt")
    assert (again.selection("mixcpt") / "selection.jsonl").read_bytes() == first


def test_strategies_behave_as_named():
    scores = {0: 3.0, 1: 1.0, 2: 5.0, 3: 2.0, 5: 4.0}
    assert choose(scores, 2, "easiest", seed=0) == {1, 3}
    assert choose(scores, 2, "hardest", seed=0) == {2, 5}
    picked = choose(scores, 3, "random", seed=7)
    assert len(picked) == 3 and picked <= set(scores)
    assert choose(scores, 3, "random", seed=7) == picked
    assert (
        len({frozenset(choose(scores, 3, "random", seed=s)) for s in range(10)}) > 1
    )  # the seed matters
    assert choose(scores, 10, "easiest", seed=0) == set(scores)


def test_k_larger_than_pool_keeps_everything_usable(make_cfg, run, pool_rows, caplog):
    cfg = make_cfg(select={"k": 100, "strategy": "hardest"})
    with caplog.at_level(logging.WARNING):
        summary = run_select(cfg, run, "mixcpt")
    assert "select.k=100 is larger than the 8 usable instruction samples" in caplog.text
    assert "1 with identical chosen and rejected" in caplog.text
    records = read_jsonl(run.selection("mixcpt") / "selection.jsonl")
    assert len(records) == len(pool_rows[0]) + len(
        pool_rows[1]
    )  # nothing lost: every sample is listed
    skipped = {r["id"]: r["skipped"] for r in records if "skipped" in r}
    assert skipped == {"i8": "empty response", "p8": "identical chosen and rejected"}
    assert all(r["selected"] == (r["id"] not in skipped) for r in records)
    assert summary["preferences"] == {
        **summary["preferences"],
        "pool": 9,
        "skipped": 1,
        "selected": 8,
    }
    assert len(read_jsonl(run.selection("mixcpt") / "preferences.jsonl")) == 8


def test_fas_ratio_score_is_chat_over_plain_nll(make_cfg, run, pool_rows):
    """The ablation keeps the first fas's score: whole chat response / whole plain response."""
    run_select(make_cfg(select={"score": "fas_ratio"}), run, "mixcpt")
    model, tok = load_model(run.stage("mixcpt", "cpt")), load_tokenizer(run.stage("mixcpt", "cpt"))
    records = {r["id"]: r for r in read_jsonl(run.selection("mixcpt") / "selection.jsonl")}
    row = pool_rows[0][0]
    prompt = tok.apply_chat_template(
        row["messages"][:1], tokenize=False, add_generation_prompt=True
    )
    response = tok.apply_chat_template(row["messages"], tokenize=False)[len(prompt) :]
    chat_nll = direct_mean_nll(
        model,
        tok(prompt, add_special_tokens=False).input_ids,
        tok(response, add_special_tokens=False).input_ids,
    )
    assert records[row["id"]]["nll_chat"] == pytest.approx(chat_nll, abs=1e-4)
    for r in records.values():
        if "skipped" not in r:
            assert r["score"] == pytest.approx(r["nll_chat"] / r["nll"])

    # selected: the 3 lowest ratios
    easiest = sorted(
        (r for r in records.values() if r["kind"] == "instruction" and "skipped" not in r),
        key=lambda r: (r["score"], int(r["id"][1:])),
    )[:3]
    assert {r["id"] for r in easiest} == {
        r["id"] for r in records.values() if r["kind"] == "instruction" and r["selected"]
    }


def test_fas_is_the_format_cost_chosen_within_the_easiest_plain_quantile(make_cfg, run, pool_rows):
    cfg = make_cfg(select={"score": "fas", "k": 2, "fas_quantile": 0.5})
    summary = run_select(cfg, run, "mixcpt")
    assert summary["fas_quantile"] == 0.5
    model, tok = load_model(run.stage("mixcpt", "cpt")), load_tokenizer(run.stage("mixcpt", "cpt"))
    records = {r["id"]: r for r in read_jsonl(run.selection("mixcpt") / "selection.jsonl")}

    # one sample by hand: the response's own tokens (no EOS, no end of turn) after either prompt
    row = pool_rows[0][1]
    answer = row["messages"][-1]["content"]
    for prompt, special, nll_key in (
        (row["plain_prompt"], True, "nll"),
        (
            tok.apply_chat_template(
                row["messages"][:1], tokenize=False, add_generation_prompt=True
            ),
            False,
            "nll_chat",
        ),
    ):
        prompt_ids = tok(prompt, add_special_tokens=special).input_ids
        whole = tok(prompt + answer, add_special_tokens=special).input_ids
        assert whole[: len(prompt_ids)] == prompt_ids  # no token straddles the prompt's end here
        direct = direct_mean_nll(model, prompt_ids, whole[len(prompt_ids) :])
        assert records[row["id"]][nll_key] == pytest.approx(direct, abs=1e-4)

    for kind in ("instruction", "preference"):
        scored = [r for r in records.values() if r["kind"] == kind and "skipped" not in r]
        for r in scored:
            assert r["score"] == pytest.approx(r["nll_chat"] - r["nll"])
        # candidates: the half of the usable pool with the lowest plain NLL (8 usable: 4)
        by_nll = sorted(scored, key=lambda r: (r["nll"], int(r["id"][1:])))
        candidates = by_nll[:4]
        assert {r["id"] for r in scored if r["fas_candidate"]} == {r["id"] for r in candidates}
        # chosen: the 2 lowest format costs among them
        lowest_cost = sorted(candidates, key=lambda r: (r["score"], int(r["id"][1:])))[:2]
        assert {r["id"] for r in scored if r["selected"]} == {r["id"] for r in lowest_cost}


def test_fas_choice_rule():
    plain = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    cost = {0: 5.0, 1: 0.1, 2: -1.0, 3: -9.0}
    # within the easiest half {0, 1}: the lowest cost, not the pool's lowest (3, unknown content)
    assert choose_fas(plain, cost, 1, 0.5, "easiest", seed=0) == ({1}, {0, 1})
    assert choose_fas(plain, cost, 1, 0.5, "hardest", seed=0) == ({2}, {2, 3})
    # a quantile holding fewer than k samples widens to k
    assert choose_fas(plain, cost, 3, 0.25, "easiest", seed=0) == ({0, 1, 2}, {0, 1, 2})
    picked, candidates = choose_fas(plain, cost, 2, 0.5, "random", seed=0)
    assert len(picked) == 2 and candidates == set(plain)


def test_two_processes_score_the_pool_in_shares_and_choose_alike(make_cfg, run, tmp_path, torchrun):
    """`mixcpt select` under torchrun: each process scores every other sample, and the
    selection written is the one a single process makes."""
    import shutil

    import yaml

    cfg = make_cfg(select={"k": 3, "batch_size": 2})
    two = tmp_path / "two"
    shutil.copytree(run.root, two)
    run_select(cfg, run, "mixcpt")
    config = tmp_path / "select.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    proc = torchrun("-m", "mixcpt.cli", "select", config, "--output", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"mixcpt: select: process {rank} of 2 scores" in proc.stdout
    one_records = read_jsonl(run.selection("mixcpt") / "selection.jsonl")
    two_records = read_jsonl(two / "mixcpt" / "selection" / "selection.jsonl")
    assert [r["selected"] for r in two_records] == [r["selected"] for r in one_records]
    for a, b in zip(one_records, two_records, strict=True):
        assert (a["id"], a["n_response_tokens"]) == (b["id"], b["n_response_tokens"])
        if a["score"] is not None:
            assert b["score"] == pytest.approx(a["score"], rel=1e-4)
