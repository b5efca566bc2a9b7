"""Scoring an in-memory causal LM: multiple choice by log-likelihood, greedy generation with
exact match, perplexity and bits per byte, and KL(base || model) for retention.

Log-likelihoods follow lm-evaluation-harness: the context's trailing whitespace moves to the
continuation, and context + continuation is tokenised as one string; the continuation's tokens
are those that end past the context (`mixcpt.responses`, shared with selection and training).
`acc_norm` divides each choice's log-likelihood by its length in characters.

Each score has a per-item form (`multiple_choice_correct`, `generation_correct`,
`perplexity_per_text`, `kl_per_window`) that the eval stage keeps, so that intervals can be
bootstrapped over items (mixcpt.evaluate.intervals); the `score_*` functions pool it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mixcpt.data.packing import IGNORE_INDEX
from mixcpt.evaluate.benchmarks import normalize_answer
from mixcpt.responses import (
    encode_split,
    features,
    fit_to_length,
    pad_batch,
    score_responses,
    special_tokens_wanted,
)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text`, BOS added unless the text already starts with it."""
    return tokenizer.encode(text, add_special_tokens=special_tokens_wanted(tokenizer, text))


def _prefix_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token every scored text is conditioned on, so its first real token is predicted too."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _batches(order: list[int], batch_size: int, desc: str):
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        yield order[start : start + batch_size]


def continuation_tokens(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) with lm-evaluation-harness's whitespace rule: the
    context's trailing whitespace moves to the continuation; then the whole string is tokenised
    once and split at the context's end (`responses.encode_split`)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    add_special = special_tokens_wanted(tokenizer, context)
    return encode_split(tokenizer, context, continuation, add_special)


def loglikelihoods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[tuple[str, str]],
    batch_size: int = 8,
    max_length: int = 1024,
) -> list[float]:
    """log p(continuation | context) for each (context, continuation) pair; the context is
    left-truncated so the model sees at most `max_length` tokens."""
    encoded = [[continuation_tokens(tokenizer, *request)] for request in requests]
    rows = [features(*sample[0]) for sample in fit_to_length(encoded, max_length + 1, "choices")]
    sums, _ = score_responses(model, rows, batch_size, tokenizer.pad_token_id, "choices")
    return sums


def multiple_choice_correct(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    items: list[dict],
    batch_size: int = 8,
    max_length: int = 1024,
) -> dict[str, list[int]]:
    """Per item, 1 when the choice with the highest log-likelihood given the prompt is the answer
    (`acc`), and when the one with the highest log-likelihood per character is (`acc_norm`).

    `items[i]` has "choices" and "answer"; each choice is scored as the continuation
    " " + choice (no space when the prompt already ends in whitespace).
    """
    requests = []
    for prompt, item in zip(prompts, items):
        delimiter = "" if prompt[-1:].isspace() else " "
        requests += [(prompt, delimiter + choice) for choice in item["choices"]]
    lls = iter(loglikelihoods(model, tokenizer, requests, batch_size, max_length))
    correct = {"acc": [], "acc_norm": []}
    for item in items:
        choice_lls = [next(lls) for _ in item["choices"]]
        normed = [ll / max(len(c), 1) for ll, c in zip(choice_lls, item["choices"])]
        best = max(range(len(choice_lls)), key=choice_lls.__getitem__)
        best_norm = max(range(len(normed)), key=normed.__getitem__)
        correct["acc"].append(int(best == item["answer"]))
        correct["acc_norm"].append(int(best_norm == item["answer"]))
    return correct


def mean_scores(per_item: dict[str, list[float]]) -> dict[str, float]:
    """{metric: mean over items} of {metric: per-item values}."""
    return {metric: sum(values) / len(values) for metric, values in per_item.items()}


@torch.inference_mode()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions of `prompts`, each cut at its first stop string (or EOS)."""
    model.eval()
    outputs = [""] * len(prompts)
    encoded = [encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    for idx in _batches(order, batch_size, "generate"):
        width = max(len(encoded[i]) for i in idx)
        # left padding: every prompt ends where generation starts
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        # [B, width + new]
        generated = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stop_strings=list(stop) or None,
            tokenizer=tokenizer,
        )
        for row, i in enumerate(idx):
            text = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
            for s in stop:
                text = text.split(s, 1)[0]
            outputs[i] = text
    return outputs


def generation_correct(predictions: list[str], answers: list[list[str]]) -> dict[str, list[int]]:
    """Per item, `exact_match`: 1 when the normalised prediction equals a normalised answer;
    `contains`: 1 when a normalised answer occurs in the normalised prediction."""
    correct = {"exact_match": [], "contains": []}
    for pred, refs in zip(predictions, answers):
        pred, refs = normalize_answer(pred), [normalize_answer(r) for r in refs]
        correct["exact_match"].append(int(pred in refs))
        correct["contains"].append(int(any(r in pred for r in refs)))
    return correct


def score_generation(predictions: list[str], answers: list[list[str]]) -> dict[str, float]:
    """`exact_match` and `contains` of `generation_correct`, as fractions of the items."""
    return mean_scores(generation_correct(predictions, answers))


def text_windows(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> tuple[list[dict], list[int]]:
    """`features` rows of at most `max_length + 1` ids (the model sees `max_length` of them, as in
    lm-evaluation-harness's rolling windows) such that every token of every text (after the
    prefix token) is predicted exactly once, each window conditioned on its first id; and the
    index of the text each window comes from."""
    windows, owners = [], []
    for i, text in enumerate(texts):
        ids = encode(tokenizer, text)
        if not ids or ids[0] != _prefix_id(tokenizer):
            ids = [_prefix_id(tokenizer)] + ids
        for start in range(1, len(ids), max_length):
            windows.append(features(ids[start - 1 : start], ids[start : start + max_length]))
            owners.append(i)
    return windows, owners


def perplexity_per_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    batch_size: int = 8,
    max_length: int = 1024,
) -> dict[str, list[float]]:
    """Per text: `nll` (summed over its predicted tokens, in nats), `tokens` (how many were
    predicted) and `bytes` (its UTF-8 length)."""
    windows, owners = text_windows(tokenizer, texts, max_length)
    logps, counts = score_responses(
        model, windows, batch_size, tokenizer.pad_token_id, "perplexity"
    )
    nll, tokens = [0.0] * len(texts), [0] * len(texts)
    for owner, logp, count in zip(owners, logps, counts):
        nll[owner] -= logp
        tokens[owner] += count
    return {"nll": nll, "tokens": tokens, "bytes": [len(t.encode("utf-8")) for t in texts]}


def perplexity_scores(per_text: dict[str, list[float]]) -> dict[str, float]:
    """Corpus-level `perplexity` = exp(total NLL / predicted tokens) and `bits_per_byte` =
    total NLL in bits / UTF-8 bytes of the texts (comparable across tokenizers), from
    `perplexity_per_text`."""
    nll, n_tokens, n_bytes = (sum(per_text[k]) for k in ("nll", "tokens", "bytes"))
    return {"perplexity": math.exp(nll / n_tokens), "bits_per_byte": nll / math.log(2) / n_bytes}


@torch.inference_mode()
def kl_per_window(
    base_model: PreTrainedModel,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    batch_size: int = 8,
    max_length: int = 1024,
) -> dict[str, list[float]]:
    """Per window of the texts (`text_windows`): `sum` over its predicted tokens of KL(p_base ||
    p_model) = sum_v p_base (log p_base - log p_model), and `count`, how many tokens that is."""
    base_model.eval()
    model.eval()
    windows, _ = text_windows(tokenizer, texts, max_length)
    sums, counts = [0.0] * len(windows), [0] * len(windows)
    for idx in _batches(list(range(len(windows))), batch_size, "KL to base"):
        batch = pad_batch([windows[i] for i in idx], tokenizer.pad_token_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        # the last id predicts nothing: the models see at most max_length positions
        inputs = {
            "input_ids": batch["input_ids"][:, :-1],
            "attention_mask": batch["attention_mask"][:, :-1],
        }
        scored = batch["labels"][:, 1:] != IGNORE_INDEX  # [B, T-1]: position t predicts t + 1
        base_logits, logits = base_model(**inputs).logits, model(**inputs).logits  # [B, T-1, V]
        if base_logits.shape[-1] != logits.shape[-1]:
            raise ValueError(
                f"vocabulary sizes differ: base {base_logits.shape[-1]}, model {logits.shape[-1]}"
            )
        base_logp = F.log_softmax(base_logits.float(), dim=-1)  # [B, T-1, V]
        logp = F.log_softmax(logits.float(), dim=-1)  # [B, T-1, V]
        kl = (base_logp.exp() * (base_logp - logp)).sum(-1)  # [B, T-1]
        kl = torch.where(scored, kl, 0.0)  # padding may hold anything, even NaN
        for row, i in enumerate(idx):
            sums[i], counts[i] = kl[row].sum().item(), int(scored[row].sum())
    return {"sum": sums, "count": counts}


def mean_kl(per_window: dict[str, list[float]]) -> float:
    """Mean KL per predicted token, pooled over the windows of `kl_per_window`: total `sum` over
    total `count`; how far the model's next-token distributions moved from the base's."""
    return sum(per_window["sum"]) / sum(per_window["count"])
