"""Samples as token ids, and the log-probability of their responses.

A sample is a prompt and a response, tokenised *separately* and concatenated (as
lm-evaluation-harness does for context and continuation), so the response tokens are the same
whatever the prompt ends with. Two renderings exist:
- plain: the stage-1 text (no chat template), EOS appended as in the packed stream;
- chat: the model's chat template; the response is what the template adds for the assistant turn.
Labels copy the response tokens and are IGNORE_INDEX on the prompt, so every loss and score
here counts response tokens only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mixcpt.data.packing import IGNORE_INDEX
from mixcpt.errors import ConfigError

log = logging.getLogger(__name__)

Encoded = tuple[list[int], list[list[int]]]  # (prompt ids, one or more response ids sharing it)


def ensure_chat_template(
    tokenizer: PreTrainedTokenizerBase, configured: str | None, model_dir: Path
) -> None:
    """Give `tokenizer` a chat template: its own when it has one, else `configured` (set on the
    tokenizer so that it is saved with the stage's model). Raises ConfigError when neither exists."""
    if tokenizer.chat_template:
        return
    if not configured:
        raise ConfigError(
            f"sft.chat_template: the tokenizer of {model_dir} has no chat template; "
            "set sft.chat_template to a Jinja chat template"
        )
    tokenizer.chat_template = configured


def encode_plain(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str
) -> tuple[list[int], list[int]]:
    """The stage-1 rendering: the prompt with the tokenizer's own special tokens (BOS), the
    response followed by EOS (documents end with EOS in the packed stream)."""
    prompt_ids = tokenizer(prompt).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [
        tokenizer.eos_token_id
    ]
    return prompt_ids, response_ids


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, prompt_messages: list[dict], response: str
) -> tuple[list[int], list[int]]:
    """The chat rendering: prompt = the template up to the generation prompt, response = what the
    template adds for the assistant turn (its end-of-turn tokens included); EOS appended only when
    the template does not emit it, so generation learns to stop."""
    prompt = tokenizer.apply_chat_template(
        prompt_messages, tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(
        [*prompt_messages, {"role": "assistant", "content": response}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ConfigError(
            "the chat template renders the prompt differently once the assistant turn is added; "
            "set sft.chat_template to a template whose generation prompt is a prefix of the chat"
        )
    # The template writes BOS itself where the model wants one, so no special tokens are added here.
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    response_ids = tokenizer(full[len(prompt) :], add_special_tokens=False).input_ids
    if tokenizer.eos_token_id not in response_ids:
        response_ids.append(tokenizer.eos_token_id)
    return prompt_ids, response_ids


def fit_to_length(samples: list[Encoded], max_length: int, source: str) -> list[Encoded]:
    """Cut each (prompt, responses) to at most `max_length` tokens per prompt+response.

    The prompt is truncated from the LEFT (its end, next to the response, matters most) and the
    responses are kept whole; only a response longer than max_length - 1 is itself cut on the
    right. Counts of both are logged in one warning naming `source`.
    """
    fitted, prompts_cut, responses_cut = [], 0, 0
    for prompt, responses in samples:
        longest = max(len(r) for r in responses)
        if len(prompt) + longest > max_length:
            prompts_cut += 1
            if longest > max_length - 1:
                responses_cut += 1
                responses = [r[: max_length - 1] for r in responses]
            prompt = prompt[-(max_length - max(len(r) for r in responses)) :]
        fitted.append((prompt, responses))
    if prompts_cut:
        log.warning(
            "%s: %d of %d prompts longer than max_length=%d were truncated from the left%s",
            source,
            prompts_cut,
            len(samples),
            max_length,
            f" ({responses_cut} responses were also cut on the right)" if responses_cut else "",
        )
    return fitted


def features(prompt_ids: list[int], response_ids: list[int]) -> dict[str, list[int]]:
    """input_ids = prompt + response; labels = IGNORE_INDEX on the prompt, the token ids on the response."""
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def pad_batch(rows: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `features` rows into input_ids, attention_mask, labels [B, T] (labels IGNORE_INDEX on padding)."""
    width = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        pad = width - len(r["input_ids"])
        batch["input_ids"].append(r["input_ids"] + [pad_token_id] * pad)
        batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        batch["labels"].append(r["labels"] + [IGNORE_INDEX] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label) over the labelled positions of each row, and their count.

    logits [B, T, V], labels [B, T] unshifted (labels[t] is token t; logits[t] predicts token t+1).
    Returns (sum_logps [B] float32, n_tokens [B] long).
    """
    logits, labels = logits[:, :-1], labels[:, 1:]  # [B, T-1, V], [B, T-1]
    # Row by row, so that float32 logits exist for one sequence at a time, not the whole batch.
    nll = torch.stack(
        [
            F.cross_entropy(row.float(), row_labels, ignore_index=IGNORE_INDEX, reduction="none")
            for row, row_labels in zip(logits, labels)
        ]
    )  # [B, T-1]
    return -nll.sum(-1), (labels != IGNORE_INDEX).sum(-1)  # [B], [B]


@torch.no_grad()
def score_features(
    model: PreTrainedModel,
    rows: list[dict[str, list[int]]],
    batch_size: int,
    pad_token_id: int,
    desc: str,
) -> tuple[list[float], list[int]]:
    """Per row of `features`: the summed log-prob of its response tokens and their count.

    Rows are batched longest first (less padding; the order does not change any result) on the
    model's device; results come back in the input order.
    """
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    sums, counts = [0.0] * len(rows), [0] * len(rows)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start : start + batch_size]
        batch = pad_batch([rows[i] for i in idx], pad_token_id)
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits  # [b, T, V]
        batch_sums, batch_counts = response_logps(logits, batch["labels"].to(device))
        for i, s, n in zip(idx, batch_sums.tolist(), batch_counts.tolist()):
            sums[i], counts[i] = s, n
    return sums, counts
