"""Stage 2a: score the general pool with an arm's stage-1 model and keep k samples of each kind
(design §1). Arms with the same stage-1 model and select settings share one selection
(mixcpt.pipeline.selection_owner); arms that align on the whole pool make none.

Scores (lower = easier for the stage-1 model):
- ppl: exp(mean NLL of the response tokens given the prompt), plain stage-1 rendering;
- fas: the format cost Δ = mean NLL of the response's own tokens after the chat template's
  prompt minus the same after the plain stage-1 prompt (`format_cost`). `easiest` keeps, among
  the samples whose plain NLL is in the lowest `select.fas_quantile` of the pool (content the
  model already knows), the k with the smallest Δ: what is left to learn is the format alone
  (`choose_fas`);
- fas_ratio (ablation): mean response NLL with the chat template / the same with the plain
  rendering, each over its rendering's whole response (template tokens, EOS). A ratio rewards a
  high plain NLL, so it keeps long responses the model does not know and never memorised ones.
A preference pair is scored by its chosen response.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

from mixcpt.align.samples import POOL_FILES, read_samples, usable_indices, write_samples
from mixcpt.atomic import atomic_dir
from mixcpt.config import Config, TemplateConfig
from mixcpt.config.arms import find_arm
from mixcpt.data.render import render_plain_response
from mixcpt.fingerprints import begin, write_record
from mixcpt.models import load_tokenizer, model_from
from mixcpt.pipeline import stage1_owner
from mixcpt.processes import gather_through_files, process_state
from mixcpt.responses import (
    encode_chat,
    encode_plain,
    encode_split,
    ensure_chat_template,
    features,
    fit_to_length,
    render_chat,
    score_responses,
)
from mixcpt.rundir import RunDir

log = logging.getLogger(__name__)


def plain_and_chat(
    row: dict, kind: str, template: TemplateConfig
) -> tuple[tuple[str, str], tuple[list[dict], str]]:
    """((plain prompt, plain response), (chat prompt messages, response)) of an instruction sample
    or of a preference pair's chosen side; the plain texts are those of the stage-1 stream."""
    if kind == "instruction":
        return (row["plain_prompt"], row["plain_response"]), (
            row["messages"][:-1],
            row["messages"][-1]["content"],
        )
    return (row["plain_prompt"], render_plain_response(row["chosen"], template)), (
        row["messages"],
        row["chosen"],
    )


def mean_response_nll(
    model, tokenizer, pairs: list[tuple[list[int], list[int]]], cfg: Config, desc: str
) -> tuple[list[float], list[int]]:
    """Mean NLL of each response given its prompt (response tokens only), and the number of
    response tokens."""
    fitted = fit_to_length([[pair] for pair in pairs], cfg.select.max_length, desc)
    rows = [features(*sample[0]) for sample in fitted]
    sums, counts = score_responses(model, rows, cfg.select.batch_size, tokenizer.pad_token_id, desc)
    return [-s / n for s, n in zip(sums, counts)], counts


def format_cost(
    model, tokenizer, rows: list[dict], usable: list[int], kind: str, cfg: Config
) -> tuple[list[float], list[float], list[int]]:
    """fas's inputs for the `usable` rows: (mean NLL of the response after the plain prompt, the
    same after the chat prompt, the number of response tokens of the plain side).

    Both score the same response: its own text, without the plain template's suffix or EOS and
    without the chat template's end-of-turn tokens, which differ between the renderings. Each side
    tokenises its whole text (prompt + response) once and splits at the prompt's end
    (`encode_split`), so the response tokens are those the model reads in that rendering (a
    token straddling the prompt's end, such as "Answer: " + "Paris" -> " Paris", counts as the
    response's). Δ is the chat side minus the plain side."""
    plain, chat = [], []
    for i in usable:
        (plain_prompt, _), (messages, response) = plain_and_chat(rows[i], kind, cfg.data.template)
        plain.append(encode_split(tokenizer, plain_prompt, response, add_special_tokens=True))
        chat_prompt, _ = render_chat(tokenizer, messages, response)
        # the template writes BOS itself where the model wants one
        chat.append(encode_split(tokenizer, chat_prompt, response, add_special_tokens=False))
    nll, counts = mean_response_nll(model, tokenizer, plain, cfg, f"scoring {kind}s (plain)")
    nll_chat, _ = mean_response_nll(model, tokenizer, chat, cfg, f"scoring {kind}s (chat)")
    return nll, nll_chat, counts


def choose_fas(
    plain_nll: dict[int, float],
    cost: dict[int, float],
    k: int,
    quantile: float,
    strategy: str,
    seed: int,
) -> tuple[set[int], set[int]]:
    """fas selection: (chosen indices, candidates). `easiest`: the candidates are the
    ceil(quantile * n) lowest plain NLLs (at least k of them), the chosen the k lowest format costs
    among them; `hardest` mirrors it (highest plain NLLs, highest costs); `random`: k at random
    from all, every sample a candidate. Ties are broken by index."""
    if strategy == "random":
        return choose(cost, k, "random", seed), set(cost)
    n_candidates = max(math.ceil(quantile * len(plain_nll)), min(k, len(plain_nll)))
    candidates = choose(plain_nll, n_candidates, strategy, seed)
    return choose({i: cost[i] for i in candidates}, k, strategy, seed), candidates


def choose(scores: dict[int, float], k: int, strategy: str, seed: int) -> set[int]:
    """Indices of the k lowest (easiest), highest (hardest) or k random (seeded) scores; ties
    broken by index."""
    if strategy == "random":
        return set(random.Random(seed).sample(sorted(scores), min(k, len(scores))))
    sign = 1 if strategy == "easiest" else -1
    return set(sorted(scores, key=lambda i: (sign * scores[i], i))[:k])


def score_pool(
    model, tokenizer, rows: list[dict], indices: list[int], kind: str, cfg: Config
) -> tuple[list[float], list[float], list[float] | None, list[int]]:
    """(score, plain NLL, chat NLL or None, response tokens) of the samples `indices` of `rows`,
    in that order, under `cfg.select.score` (module docstring)."""
    score = cfg.select.score
    nll_chat = None
    if score == "fas":
        nll, nll_chat, counts = format_cost(model, tokenizer, rows, indices, kind, cfg)
        return [c - p for c, p in zip(nll_chat, nll)], nll, nll_chat, counts
    plain = [
        encode_plain(tokenizer, *plain_and_chat(rows[i], kind, cfg.data.template)[0])
        for i in indices
    ]
    nll, counts = mean_response_nll(model, tokenizer, plain, cfg, f"scoring {kind}s (plain)")
    if score == "fas_ratio":
        chat = [
            encode_chat(tokenizer, *plain_and_chat(rows[i], kind, cfg.data.template)[1])
            for i in indices
        ]
        nll_chat, _ = mean_response_nll(model, tokenizer, chat, cfg, f"scoring {kind}s (chat)")
        # A plain NLL of exactly 0 would mean a perfectly memorised response; keep the ratio finite.
        return [c / max(p, 1e-12) for c, p in zip(nll_chat, nll)], nll, nll_chat, counts
    return [math.exp(x) for x in nll], nll, nll_chat, counts


def score_in_shares(
    model, tokenizer, rows: list[dict], indices: list[int], kind: str, cfg: Config, work_dir: Path
):
    """`score_pool`, each process of a launch scoring every Nth sample of `indices`; the columns
    in order on the main process (through files under `work_dir`, `gather_through_files`), None
    on the others."""
    state = process_state()
    n = state.num_processes
    if n == 1:
        return score_pool(model, tokenizer, rows, indices, kind, cfg)
    mine = indices[state.process_index :: n]
    where = f"process {state.process_index} of {n}"
    print(f"mixcpt: select: {where} scores {len(mine)} of the {len(indices)} {kind}s", flush=True)
    parts = gather_through_files(
        state,
        work_dir,
        f"select-{kind}",
        lambda: score_pool(model, tokenizer, rows, mine, kind, cfg),
    )
    if parts is None:
        return None
    columns = [[None] * len(indices) for _ in range(4)]
    for rank, values in enumerate(parts):
        for column, share in zip(columns, values):
            if share is not None:
                column[rank::n] = share
    scores, nll, nll_chat, counts = columns
    return scores, nll, (nll_chat if cfg.select.score in ("fas", "fas_ratio") else None), counts


def select_kind(
    model, tokenizer, rows: list[dict], kind: str, cfg: Config, work_dir: Path | None = None
) -> tuple[list[dict], list[dict], dict] | None:
    """Score and select one pool. Returns (selected rows in pool order, one record per row,
    summary); under a launch the processes score it in shares (exchanged under `work_dir`) and
    the others return None."""
    usable, skipped = usable_indices(rows, kind, f"{kind} pool")
    score = cfg.select.score
    scored = score_in_shares(model, tokenizer, rows, usable, kind, cfg, work_dir)
    if scored is None:
        return None
    scores, nll, nll_chat, counts = scored

    k = cfg.select.k
    if k > len(usable):
        log.warning(
            "select.k=%d is larger than the %d usable %s samples (pool of %d): keeping all of them",
            k,
            len(usable),
            kind,
            len(rows),
        )
    if score == "fas":
        chosen, candidates = choose_fas(
            dict(zip(usable, nll)),
            dict(zip(usable, scores)),
            k,
            cfg.select.fas_quantile,
            cfg.select.strategy,
            cfg.seed,
        )
    else:
        chosen = choose(dict(zip(usable, scores)), k, cfg.select.strategy, cfg.seed)

    position = {i: j for j, i in enumerate(usable)}
    records = []
    for i, row in enumerate(rows):
        record = {
            "id": row["id"],
            "kind": kind,
            "score": None,
            "nll": None,
            "n_response_tokens": 0,
            "selected": i in chosen,
        }
        if i in skipped:
            record["skipped"] = skipped[i]
        else:
            j = position[i]
            record.update(score=scores[j], nll=nll[j], n_response_tokens=counts[j])
            if score in ("fas", "fas_ratio"):
                record["nll_chat"] = nll_chat[j]
            if score == "fas":
                record["fas_candidate"] = i in candidates
        records.append(record)
    picked = [scores[j] for j, i in enumerate(usable) if i in chosen]
    summary = {
        "pool": len(rows),
        "skipped": len(skipped),
        "selected": len(chosen),
        "mean_score_pool": sum(scores) / len(scores) if scores else None,
        "mean_score_selected": sum(picked) / len(picked) if picked else None,
    }
    return [rows[i] for i in sorted(chosen)], records, summary


def run_select(cfg: Config, run: RunDir, arm: str, force: bool = False) -> dict:
    """Score the pool under `arm`'s stage-1 model (its own, or the one it shares) with the arm's
    select settings and write `run.selection(arm)/` with the selected instructions.jsonl and
    preferences.jsonl (rows unchanged) and selection.jsonl (every sample's id, kind, score, nll,
    n_response_tokens, selected; with fas and fas_ratio also nll_chat, with fas fas_candidate:
    within fas_quantile). Returns the summary recorded in results.json under
    stages/<arm>/select (that of the existing selection when it was made from the same inputs and
    not `force`)."""
    key = f"{arm}/select"
    record = begin(cfg, run, f"select/{arm}", force)
    if record is None:
        return run.recorded_metrics(key)
    stage1 = stage1_owner(cfg, arm)
    cfg = find_arm(cfg, arm).config  # the arm's select (and sft.chat_template) settings
    model_dir = run.finished_model(stage1, "cpt")
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    if cfg.select.score in ("fas", "fas_ratio"):
        ensure_chat_template(tokenizer, cfg.sft.chat_template, model_dir)
    model = model_from(cfg.model, model_dir)
    model.to(process_state().device)

    summary = {
        "score": cfg.select.score,
        "strategy": cfg.select.strategy,
        "k": cfg.select.k,
        "stage1": stage1,
    }
    if cfg.select.score == "fas":
        summary["fas_quantile"] = cfg.select.fas_quantile
    selected, records = {}, []
    for kind, name in POOL_FILES.items():
        rows = read_samples(run.data / "pool" / name, kind)
        chosen = select_kind(model, tokenizer, rows, kind, cfg, run.root / ".work")
        if chosen is None:  # another process of the launch chooses and writes
            continue
        selected[name], kind_records, summary[f"{kind}s"] = chosen
        records += kind_records
    if not process_state().is_main_process:
        return summary
    with atomic_dir(run.selection(arm)) as tmp:
        for name, rows in selected.items():
            write_samples(tmp / name, rows)
        write_samples(tmp / "selection.jsonl", records)
        write_record(tmp, record)
    run.update_results("stages", key, summary)
    return summary
