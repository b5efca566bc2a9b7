"""Chat templates shipped for base models that have none (`sft.chat_template: NAME`).

A base model's tokenizer (Llama-3-8B, Mistral-7B-v0.1...) usually has no chat template, and SFT,
DPO, fas selection and chat-format evaluation all need one. `sft.chat_template` takes either a
Jinja template or one of these names:

    chatml   <|im_start|>ROLE\\nCONTENT<|im_end|>\\n per turn (Qwen, many fine-tunes); no BOS
    llama3   BOS, then <|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|> per turn,
             Meta's Llama-3 Instruct format (the Llama-3 base tokenizer has these tokens)

A tokenizer that lacks a template's marker tokens spells them as ordinary text, which works but
costs a few tokens per turn. The generation prompt of each is a prefix of the rendered chat, as
mixcpt.responses requires.
"""

from __future__ import annotations

CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{{ message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
}


def resolve_chat_template(value: str) -> str:
    """The Jinja text `sft.chat_template` stands for: a shipped template's for its name, else
    `value` itself when it is Jinja. Raises ValueError for anything else (a misspelt name would
    otherwise be a template that renders the name and nothing of the chat)."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{{" not in value and "{%" not in value:
        raise ValueError(
            f"{value!r} is neither a shipped template ({', '.join(CHAT_TEMPLATES)}) nor a Jinja "
            "template"
        )
    return value
