import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mixcpt.data.packing import IGNORE_INDEX
from mixcpt.evaluate.scoring import (
    encode,
    generate_answers,
    kl_per_window,
    loglikelihoods,
    mean_kl,
    mean_scores,
    multiple_choice_correct,
    perplexity_per_text,
    perplexity_scores,
    score_generation,
)
from mixcpt.responses import features, response_logps, score_responses

ITEMS = [
    {"question": "Where was Alice born?", "choices": ["Paris", "London town", "Vega"], "answer": 0},
    {
        "question": "What is two plus two?",
        "choices": ["four", "five", "the planet Zorbax"],
        "answer": 2,
    },
    {
        "question": "Who works at Acme?",
        "choices": ["Bob", "Alice", "nobody at all", "7"],
        "answer": 1,
    },
    {"question": "Which star does Zorbax orbit?", "choices": ["Vega", "the Sun"], "answer": 1},
]


def perturbed(model, seed: int = 1):
    """A copy of `model` with noise on every weight: a different model on the same tokenizer."""
    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return other


def direct_logprob(model, ids: list[int], n_scored: int) -> float:
    """log p of the last n_scored tokens of ids, from one unbatched, unpadded forward pass."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [T, V]
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n_scored, len(ids)))


def test_multiple_choice_picks_highest_direct_loglikelihood(tiny_model, tiny_tokenizer):
    prompts = [it["question"] for it in ITEMS]
    requests = [(p, " " + c) for p, it in zip(prompts, ITEMS) for c in it["choices"]]
    got = loglikelihoods(
        tiny_model, tiny_tokenizer, requests, batch_size=3
    )  # mixed lengths share batches

    expected, acc, acc_norm = [], 0, 0
    for prompt, item in zip(prompts, ITEMS):
        context = tiny_tokenizer(prompt).input_ids
        lls = []
        for choice in item["choices"]:
            whole = tiny_tokenizer(prompt + " " + choice).input_ids
            lls.append(direct_logprob(tiny_model, whole, len(whole) - len(context)))
        expected += lls
        acc += max(range(len(lls)), key=lambda i: lls[i]) == item["answer"]
        acc_norm += (
            max(range(len(lls)), key=lambda i: lls[i] / len(item["choices"][i])) == item["answer"]
        )
    assert got == pytest.approx(expected, abs=1e-4)
    scores = mean_scores(
        multiple_choice_correct(tiny_model, tiny_tokenizer, prompts, ITEMS, batch_size=2)
    )
    assert scores == {"acc": acc / len(ITEMS), "acc_norm": acc_norm / len(ITEMS)}


def test_rendered_chat_prompt_gets_no_second_bos(tiny_tokenizer):
    chat = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    ids = encode(tiny_tokenizer, chat)
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[1] != tiny_tokenizer.bos_token_id


def test_perplexity_is_exp_mean_nll_and_bits_per_byte_counts_utf8_bytes(tiny_model, tiny_tokenizer):
    texts = [
        "Alice was born in Paris.",
        "Zoë aß Crème brûlée ✓ 日本語",
        "Bob works at Acme as an engineer.",
    ]
    assert sum(len(t.encode("utf-8")) for t in texts) > sum(
        len(t) for t in texts
    )  # really multi-byte
    nll = tokens = 0
    for t in texts:
        ids = tiny_tokenizer(t).input_ids  # BOS first: every text token is predicted
        nll -= direct_logprob(tiny_model, ids, len(ids) - 1)
        tokens += len(ids) - 1
    got = perplexity_scores(perplexity_per_text(tiny_model, tiny_tokenizer, texts, batch_size=2))
    assert got["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(
        nll / math.log(2) / sum(len(t.encode()) for t in texts), rel=1e-5
    )


def test_perplexity_of_long_text_in_short_windows_predicts_every_token(tiny_model, tiny_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 6
    n_tokens = len(tiny_tokenizer(text).input_ids) - 1
    got = perplexity_scores(perplexity_per_text(tiny_model, tiny_tokenizer, [text], max_length=8))
    # bits per byte and perplexity are two views of one total NLL over all n_tokens tokens
    nll_from_bpb = got["bits_per_byte"] * math.log(2) * len(text.encode())
    assert got["perplexity"] == pytest.approx(math.exp(nll_from_bpb / n_tokens), rel=1e-5)


def test_generation_is_greedy_and_cut_at_stop_string(tiny_model, tiny_tokenizer):
    prompts = ["Alice was born in", "Q: what is two plus two? A:"]
    free = generate_answers(
        tiny_model, tiny_tokenizer, prompts, max_new_tokens=10, stop=[], batch_size=2
    )
    for prompt, text in zip(prompts, free):  # batched, left-padded == one greedy loop per prompt
        ids = tiny_tokenizer(prompt).input_ids
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(tiny_model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert text == tiny_tokenizer.decode(
            ids[len(tiny_tokenizer(prompt).input_ids) :], skip_special_tokens=True
        )
    stop = next(c for c in free[0][2:] if c.isascii() and c.strip())
    cut = generate_answers(tiny_model, tiny_tokenizer, prompts[:1], max_new_tokens=10, stop=[stop])
    assert cut == [free[0].split(stop, 1)[0]]


def test_score_generation_exact_and_contains():
    scores = score_generation(
        ["The Paris.", "paris, france", "London", "four"],
        [["Paris"], ["paris"], ["Berlin", "Rome"], ["4", "Four"]],
    )
    assert scores == {"exact_match": 2 / 4, "contains": 3 / 4}


def test_kl_to_base_zero_for_same_model_and_matches_direct_kl(tiny_model, tiny_tokenizer):
    texts = ["Alice was born in Paris in 1970.", "The planet Zorbax orbits the star Vega."]
    assert mean_kl(kl_per_window(tiny_model, tiny_model, tiny_tokenizer, texts)) == pytest.approx(
        0.0, abs=1e-6
    )
    other = perturbed(tiny_model)
    total = count = 0
    for t in texts:
        ids = torch.tensor(
            [tiny_tokenizer(t).input_ids[:-1]]
        )  # positions that predict a next token
        with torch.no_grad():
            p = F.log_softmax(tiny_model(ids).logits[0], -1)
            q = F.log_softmax(other(ids).logits[0], -1)
        total += (p.exp() * (p - q)).sum().item()
        count += ids.shape[1]
    assert mean_kl(
        kl_per_window(tiny_model, other, tiny_tokenizer, texts, batch_size=2)
    ) == pytest.approx(total / count, rel=1e-5)


def test_rows_feeding_the_same_ids_share_one_forward_with_the_same_scores(
    tiny_model, tiny_tokenizer
):
    """One-token continuations of one context feed the same ids (the context): one forward for
    all of them, as lm-evaluation-harness does, and the scores of separate forwards."""
    context = tiny_tokenizer("Where was Alice born? Answer:").input_ids
    rows = [features(context, [t]) for t in (5, 9, 17)]  # three one-token answers
    rows.append(features(context, [5, 9]))  # feeds context + [5]: a forward of its own
    fed = []
    hook = tiny_model.register_forward_hook(
        lambda _m, _a, kwargs, _out: fed.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    try:
        sums, counts = score_responses(tiny_model, rows, 8, tiny_tokenizer.pad_token_id, "t")
    finally:
        hook.remove()
    assert fed == [2]  # one forward of the two distinct inputs
    expected = [direct_logprob(tiny_model, r["input_ids"], len(r["input_ids"]) - len(context))
                for r in rows]  # fmt: skip
    assert sums == pytest.approx(expected, abs=1e-5) and counts == [1, 1, 1, 2]


def test_response_logps_from_hidden_states_equal_those_from_logits(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(3, tiny_model.config.vocab_size, (3, 12))
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX
    labels[2, 10:] = IGNORE_INDEX  # right padding
    out = tiny_model(input_ids=ids, output_hidden_states=True)
    from_logits = response_logps(out.logits, labels)
    from_hidden = response_logps(out.hidden_states[-1], labels, tiny_model.lm_head.weight)
    torch.testing.assert_close(from_hidden[0], from_logits[0], atol=1e-5, rtol=0)
    assert torch.equal(from_hidden[1], from_logits[1])
    # rows 0 and 2 scored on row 0's logits
    shared = response_logps(out.logits, labels[[0, 2]], logit_rows=torch.tensor([0, 0]))
    assert shared[0][0] == from_logits[0][0]
    assert shared[1].tolist() == [5, 3]
