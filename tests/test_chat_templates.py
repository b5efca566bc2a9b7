"""The shipped chat templates render their formats, serve mixcpt.responses (generation prompt a
prefix of the chat), and `sft.chat_template` takes their names."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mixcpt.chat_templates import CHAT_TEMPLATES
from mixcpt.config import SFTConfig
from mixcpt.models import load_tokenizer
from mixcpt.responses import encode_chat, render_chat

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where was Alice born?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "When?"},
]
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhere was Alice born?"
    "<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n<|im_start|>user\nWhen?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhere was Alice born?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nParis<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhen?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
}


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_each_template_renders_its_format_and_serves_sft(name, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = CHAT_TEMPLATES[name]
    prompt, response = render_chat(tokenizer, CHAT, "In 1970.")
    assert prompt == EXPECTED[name]
    assert response.startswith("In 1970.")
    _, response_ids = encode_chat(tokenizer, CHAT, "In 1970.")
    assert response_ids[-1] == tokenizer.eos_token_id  # generation learns to stop
    assert tokenizer.decode(response_ids).startswith("In 1970.")


def test_sft_chat_template_takes_a_name_or_jinja():
    assert SFTConfig(chat_template="llama3").chat_template == CHAT_TEMPLATES["llama3"]
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert SFTConfig(chat_template=jinja).chat_template == jinja
    assert SFTConfig().chat_template is None
    with pytest.raises(ValidationError, match="'chatm1' is neither a shipped template"):
        SFTConfig(chat_template="chatm1")
