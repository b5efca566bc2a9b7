"""A prompt and its response as token ids, and the log-probability of the response: the one
tokenisation and the one scorer that selection, SFT, DPO and evaluation share.

The whole text (prompt + response) is tokenised once, as the model sees it in stage 1 and as it
produces it, and split at the prompt's last character with the tokenizer's offset mapping: the
response is the suffix of the whole text's ids from the first token that ends past the prompt (a
token straddling the boundary belongs to the response). Tokenising the two parts separately
gives other ids: SentencePiece-style tokenizers put a `▁` on the response's first piece, and
byte-level BPE splits "Answer: " + "Paris" unlike "Answer: Paris".

Two renderings exist:
- plain: the stage-1 text (no chat template), with the tokenizer's own special tokens (BOS) and
  EOS appended, as documents are in the packed stream;
- chat: the model's chat template; the response is what the template adds for the assistant
  turn, EOS appended when the template does not emit it, so generation learns to stop.
A row of `features` labels its response tokens and is IGNORE_INDEX elsewhere, so every loss and
score here counts response tokens only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mixcpt.chat_templates import CHAT_TEMPLATES
from mixcpt.config import Config
from mixcpt.data.packing import IGNORE_INDEX
from mixcpt.errors import ConfigError
from mixcpt.models import load_tokenizer
from mixcpt.train.forward import LossForward

log = logging.getLogger(__name__)

Encoded = tuple[list[int], list[int]]  # (prompt ids, response ids)


def special_tokens_wanted(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    """Whether the tokenizer should add its special tokens (BOS) to `text`: not when the text
    already starts with BOS, as a rendered chat template does, so BOS is never doubled."""
    bos = tokenizer.bos_token
    return not (bos and text.startswith(bos))


def encode_split(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, add_special_tokens: bool
) -> Encoded:
    """(prompt ids, response ids): `prompt + response` tokenised once, split at the prompt's
    end; their concatenation is exactly the whole text's ids."""
    if not tokenizer.is_fast:  # no offset mapping: split after the prompt's own token count
        whole = tokenizer(prompt + response, add_special_tokens=add_special_tokens).input_ids
        n_prompt = len(tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids)
        return whole[:n_prompt], whole[n_prompt:]
    encoded = tokenizer(
        prompt + response, add_special_tokens=add_special_tokens, return_offsets_mapping=True
    )
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    # Special tokens have empty offsets (0, 0): a leading BOS stays with the prompt.
    cut = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
    return ids[:cut], ids[cut:]


def encode_plain(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> Encoded:
    """The stage-1 rendering: exactly the ids the data stage packs for `prompt + response`
    (special tokens as the tokenizer adds them, EOS appended), split at the prompt."""
    prompt_ids, response_ids = encode_split(tokenizer, prompt, response, add_special_tokens=True)
    return prompt_ids, response_ids + [tokenizer.eos_token_id]


def chat_tokenizer(cfg: Config, folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `folder`, with a chat template (`ensure_chat_template`)."""
    tokenizer = load_tokenizer(folder, cfg.model.trust_remote_code)
    ensure_chat_template(tokenizer, cfg.sft.chat_template, folder)
    return tokenizer


def ensure_chat_template(
    tokenizer: PreTrainedTokenizerBase, configured: str | None, model_dir: str | Path
) -> None:
    """Give `tokenizer` a chat template: its own when it has one, else `configured` (set on the
    tokenizer so that it is saved with the stage's model). Raises ConfigError when neither
    exists."""
    if tokenizer.chat_template:
        return
    if not configured:
        raise ConfigError(
            f"sft.chat_template: the tokenizer of {model_dir} has no chat template; set "
            f"sft.chat_template to a Jinja template or one of {', '.join(CHAT_TEMPLATES)}"
        )
    tokenizer.chat_template = configured


def render_chat(
    tokenizer: PreTrainedTokenizerBase, prompt_messages: list[dict], response: str
) -> tuple[str, str]:
    """(prompt text ending with the generation prompt, the text the assistant turn adds) of
    `prompt_messages` answered by `response`, through the tokenizer's chat template. Raises
    ConfigError when the generation prompt is not a prefix of the chat: the response could then
    not be told apart from the prompt."""
    prompt = tokenizer.apply_chat_template(
        prompt_messages, tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(
        [*prompt_messages, {"role": "assistant", "content": response}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ConfigError(
            "sft.chat_template: the chat template renders the prompt differently once the "
            "assistant turn is added; use a template whose generation prompt is a prefix of the "
            f"chat (such as {', '.join(CHAT_TEMPLATES)})"
        )
    return prompt, full[len(prompt) :]


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, prompt_messages: list[dict], response: str
) -> Encoded:
    """The chat rendering of `prompt_messages` answered by `response` (see the module docstring).
    Raises ConfigError when the template's generation prompt is not a prefix of the chat."""
    prompt, rendered_response = render_chat(tokenizer, prompt_messages, response)
    # The template writes BOS itself where the model wants one, so no special tokens are added.
    prompt_ids, response_ids = encode_split(
        tokenizer, prompt, rendered_response, add_special_tokens=False
    )
    if tokenizer.eos_token_id not in response_ids:
        response_ids.append(tokenizer.eos_token_id)
    return prompt_ids, response_ids


def share_prompt(encodings: list[Encoded]) -> list[Encoded]:
    """Encodings of one prompt with different responses (a DPO pair), re-split so that every
    one has the same prompt ids: the longest common prefix of their whole-text ids, at most the
    shortest prompt. Each is split on its own whole text, so a token straddling the prompt's end
    can differ between them; the responses then start with that token, and both sides are scored
    under the same conditioning."""
    wholes = [prompt + response for prompt, response in encodings]
    cut = min(len(prompt) for prompt, _ in encodings)
    for i in range(cut):
        if any(whole[i] != wholes[0][i] for whole in wholes):
            cut = i
            break
    return [(whole[:cut], whole[cut:]) for whole in wholes]


def fit_to_length(
    samples: list[list[Encoded]], max_length: int, source: str
) -> list[list[Encoded]]:
    """Cut every (prompt, response) of each sample to at most `max_length` tokens.

    A sample is one or more encodings of the same prompt (a DPO pair has two). Its prompts are
    truncated from the LEFT (their end, next to the response, matters most) to leave room for
    its longest response, which is kept whole; only a response longer than max_length - 1 is
    itself cut on the right. Counts of both are logged in one warning naming `source`.
    """
    fitted, prompts_cut, responses_cut = [], 0, 0
    for sample in samples:
        longest = max(len(prompt) + len(response) for prompt, response in sample)
        if longest > max_length:
            prompts_cut += 1
            if any(len(response) > max_length - 1 for _, response in sample):
                responses_cut += 1
                sample = [(prompt, response[: max_length - 1]) for prompt, response in sample]
            room = max_length - max(len(response) for _, response in sample)
            sample = [(prompt[-room:], response) for prompt, response in sample]
        fitted.append(sample)
    if prompts_cut:
        also = f" ({responses_cut} responses were also cut on the right)" if responses_cut else ""
        log.warning(
            "%s: %d of %d prompts longer than max_length=%d were truncated from the left%s",
            source, prompts_cut, len(samples), max_length, also,
        )  # fmt: skip
    return fitted


def features(prompt_ids: list[int], response_ids: list[int]) -> dict[str, list[int]]:
    """input_ids = prompt + response; labels = IGNORE_INDEX on the prompt, the ids on the
    response."""
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def pad_batch(rows: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `features` rows into input_ids, attention_mask, labels [B, T] (labels
    IGNORE_INDEX on padding)."""
    width = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        pad = width - len(r["input_ids"])
        batch["input_ids"].append(r["input_ids"] + [pad_token_id] * pad)
        batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        batch["labels"].append(r["labels"] + [IGNORE_INDEX] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def padded_forward_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The forward arguments of a right-padded batch (`pad_batch`): the ids, no KV cache, and no
    attention mask. In a causal LM a row's real tokens never attend to the padding after them, so
    their outputs are the same without it; with it, attention leaves its plain causal path (with
    SDPA, 7% of a forward over 8 x 560 tokens here). lm-evaluation-harness scores so too."""
    return {"input_ids": batch["input_ids"], "use_cache": False}


def response_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None = None,
    logit_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label) over the labelled positions of each row, and their count.

    logits [B, T, V] or [B, T-1, V] (the last position predicts nothing, so a forward may leave
    it out); or, with the output layer's `weight` [V, H], the final hidden states [B, T(-1), H]
    (`train.forward.LossForward`), whose logits are then made at the labelled positions only.
    labels [R, T'] unshifted (labels[t] is token t; logits[t] predicts token t + 1), T' <= T; row
    r of labels reads row `logit_rows[r]` of logits (default: row r), so rows with the same input
    can share one forward. Returns (sum_logps [R] float32, n_tokens [R] long); differentiable in
    the logits (or hidden states and weight). Only labelled positions are taken to float32, never
    the whole [B, T, V].
    """
    logits, labels = logits[:, : labels.shape[1] - 1], labels[:, 1:]  # [B, T'-1, .], [R, T'-1]
    scored = labels != IGNORE_INDEX  # [R, T'-1]
    row, position = scored.nonzero(as_tuple=True)  # [N] each scored token's row and position
    if logit_rows is None:
        rows = logits[scored]  # [N, V | H]
    else:
        rows = logits[logit_rows[row], position]
    if weight is not None:  # the output layer, as the model applies it (under its autocast)
        if not torch.is_autocast_enabled(rows.device.type):
            rows = rows.to(weight.dtype)
        rows = F.linear(rows, weight)  # [N, V]
    log_p = F.log_softmax(rows.float(), dim=-1)  # [N, V]
    token_logps = log_p.gather(-1, labels[scored].unsqueeze(-1)).squeeze(-1)  # [N]
    sums = torch.zeros(len(labels), dtype=token_logps.dtype, device=logits.device)
    return sums.index_add(0, row, token_logps), scored.sum(-1)  # [R], [R]


@torch.no_grad()
def score_responses(
    model: PreTrainedModel,
    rows: list[dict[str, list[int]]],
    batch_size: int,
    pad_token_id: int,
    desc: str,
) -> tuple[list[float], list[int]]:
    """Per row of `features`: the summed log-prob of its labelled tokens and their count.

    Rows are batched longest first (less padding; the order changes no result) on the model's
    device; results come back in the input order. A row's last token is never fed: it predicts
    nothing, so a row of n + 1 ids costs a forward over n positions, and rows that feed the same
    ids share it (the one-token answers of a multiple-choice question, as in
    lm-evaluation-harness). The output layer runs on the labelled positions only where the model
    allows (`train.forward.LossForward`).
    """
    model.eval()
    device = next(model.parameters()).device
    forward = LossForward(model)
    run_by = {}  # the ids a row feeds -> the row whose forward they share
    sharing = [run_by.setdefault(tuple(r["input_ids"][:-1]), i) for i, r in enumerate(rows)]
    members = {i: [] for i in run_by.values()}  # run row -> the rows it is scored for
    for i, j in enumerate(sharing):
        members[j].append(i)
    order = sorted(members, key=lambda i: -len(rows[i]["input_ids"]))
    sums, counts = [0.0] * len(rows), [0] * len(rows)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start : start + batch_size]
        batch = {
            k: v[:, :-1].to(device)  # [b, T-1]
            for k, v in pad_batch([rows[i] for i in idx], pad_token_id).items()
        }
        hidden, weight, _ = forward(model, batch, padded_forward_inputs(batch))  # [b, T-1, .]
        scored = [m for i in idx for m in members[i]]
        logit_rows = torch.tensor([p for p, i in enumerate(idx) for _ in members[i]])
        labels = pad_batch([rows[m] for m in scored], pad_token_id)["labels"].to(device)
        batch_sums, batch_counts = response_logps(hidden, labels, weight, logit_rows.to(device))
        for i, s, n in zip(scored, batch_sums.tolist(), batch_counts.tolist()):
            sums[i], counts[i] = s, n
    return sums, counts
