"""One tokenisation for every path (selection, SFT, DPO, evaluation): the whole text is tokenised
once and split at the prompt's end, so a response's ids are exactly the suffix of the ids the
model sees for prompt + response, whatever the tokenizer."""

from __future__ import annotations

import logging

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mixcpt.align.dpo import pair_features
from mixcpt.align.select import plain_and_chat
from mixcpt.align.sft import sft_features
from mixcpt.config import TemplateConfig
from mixcpt.demo.tokenizer import CHAT_TEMPLATE, ROLE_TOKENS
from mixcpt.evaluate.scoring import continuation_tokens
from mixcpt.responses import encode_chat, encode_plain, features, fit_to_length, share_prompt

TEMPLATE = TemplateConfig()  # "### Instruction:\n{instruction}\n\n" ... "### Response:\n{response}"
PROMPT, RESPONSE = "Where was Alice born?", "Alice was born in Paris"
TEXT = [
    "### Instruction:\nWhere was Alice born?\n\n### Response:\nAlice was born in Paris",
    "Question: Where was Bob born? Answer: Bob was born in Rome. Answer: Paris",
    "The planet Zorbax orbits the star Vega. Alice works at Acme.",
] * 4


def hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A trained `tokenizers` model as an HF tokenizer: BOS prepended, EOS, PAD, a chat template."""
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
    )


def sentencepiece_style() -> PreTrainedTokenizerFast:
    """Llama-2 / Mistral / Gemma style: spaces become `▁`, prepended to the first piece."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    special = ["<pad>", "<s>", "</s>", "<unk>", *ROLE_TOKENS]
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=special))
    return hf_tokenizer(tok)


def gpt2_style() -> PreTrainedTokenizerFast:
    """Byte-level BPE as GPT-2 / Llama-3 / Qwen have it: a space merges into the next word."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer)
    return hf_tokenizer(tok)


@pytest.fixture(params=["sentencepiece-style", "gpt2-style byte-level", "demo byte-level"])
def tokenizer(request, tiny_tokenizer):
    return {
        "sentencepiece-style": sentencepiece_style,
        "gpt2-style byte-level": gpt2_style,
        "demo byte-level": lambda: tiny_tokenizer,
    }[request.param]()


def whole(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens).input_ids


def test_plain_encoding_is_the_stage1_tokenisation_split_at_the_prompt(tokenizer):
    instruction = {"messages": [{"role": "user", "content": PROMPT}]}
    row = {"plain_prompt": f"### Instruction:\n{PROMPT}\n\n### Response:\n", **instruction}
    row |= {"chosen": RESPONSE, "rejected": "Bob"}
    (prompt, response), _ = plain_and_chat(row, "preference", TEMPLATE)
    prompt_ids, response_ids = encode_plain(tokenizer, prompt, response)
    # what the data stage packs: the whole text with special tokens, then EOS
    assert prompt_ids + response_ids == whole(tokenizer, prompt + response) + [
        tokenizer.eos_token_id
    ]
    # a token straddling the boundary belongs to the response (here Metaspace merges across "\n")
    assert tokenizer.decode(response_ids, skip_special_tokens=True).endswith(RESPONSE)


def test_chat_encoding_sft_and_dpo_features_are_suffixes_of_the_whole_chat(tokenizer):
    messages = [{"role": "user", "content": PROMPT}]
    chat = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": RESPONSE}], tokenize=False
    )
    expected = whole(tokenizer, chat, add_special_tokens=False)
    prompt_ids, response_ids = encode_chat(tokenizer, messages, RESPONSE)
    assert prompt_ids + response_ids == expected
    row = {"messages": [*messages, {"role": "assistant", "content": RESPONSE}]}
    (sft,) = sft_features([row], tokenizer, max_length=512, source="pool")
    assert sft == features(prompt_ids, response_ids)
    (pair,) = pair_features(
        [{"messages": messages, "chosen": RESPONSE, "rejected": "Bob"}], tokenizer, 512, "pool"
    )
    assert pair["chosen"]["input_ids"] == expected


def test_evaluation_continuations_are_suffixes_of_the_whole_text(tokenizer):
    context, continuation = "Question: Where was Alice born?\nAnswer:", " Paris"
    context_ids, continuation_ids = continuation_tokens(tokenizer, context, continuation)
    assert context_ids + continuation_ids == whole(tokenizer, context + continuation)
    assert tokenizer.decode(continuation_ids).strip() == "Paris"


@pytest.mark.parametrize("make", [sentencepiece_style, gpt2_style])
def test_tokenising_the_two_parts_separately_would_give_other_ids(make):
    """Why the split is done on the whole text: with these tokenizers the old way (prompt and
    response tokenised apart and concatenated) is not what the model sees."""
    tokenizer = make()
    prompt = f"### Instruction:\n{PROMPT}\n\n### Response:\n"
    for p, r in [(prompt, RESPONSE), ("Answer: ", "Paris")]:
        apart = whole(tokenizer, p) + whole(tokenizer, r, add_special_tokens=False)
        if apart != whole(tokenizer, p + r):
            return
    pytest.fail("separate tokenisation matched the whole text: this case proves nothing")


def test_long_prompts_are_cut_from_the_left_keeping_the_response(caplog):
    prompt, response = list(range(100, 120)), [1, 2, 3]
    with caplog.at_level(logging.WARNING):
        fitted = fit_to_length([[(prompt, response)], [([7, 8], response)]], 8, "pool")
    assert fitted == [[(prompt[-5:], response)], [([7, 8], response)]]
    assert "pool: 1 of 2 prompts longer than max_length=8 were truncated from the left" in (
        caplog.text
    )
    # A response longer than max_length keeps its start and one prompt token.
    assert fit_to_length([[(prompt, list(range(10)))]], 8, "pool") == [
        [(prompt[-1:], list(range(7)))]
    ]


def test_a_pair_s_prompts_are_cut_alike_so_the_longer_response_fits():
    prompt = list(range(100, 120))
    (pair,) = fit_to_length([[(prompt, [1, 2]), (prompt, [1, 2, 3, 4])]], 8, "pool")
    assert pair == [(prompt[-4:], [1, 2]), (prompt[-4:], [1, 2, 3, 4])]


def test_a_pair_s_encodings_get_one_prompt_even_when_a_token_straddles_the_boundary():
    """chosen and rejected are split on their own whole texts; a token crossing the prompt's end
    on one side only would otherwise condition the two responses on different prompts."""
    chosen, rejected = ([1, 2, 3], [4, 5]), ([1, 2], [9, 4])  # 2 + 3 merged into 9 on one side
    assert share_prompt([chosen, rejected]) == [([1, 2], [3, 4, 5]), ([1, 2], [9, 4])]
    assert share_prompt([chosen, chosen]) == [chosen, chosen]
