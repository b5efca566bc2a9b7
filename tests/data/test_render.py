from mixcpt.config import TemplateConfig
from mixcpt.data.render import render_messages, render_plain_prompt, render_plain_response

T = TemplateConfig(
    instruction="Q: {instruction}\n", input="Context: {input}\n", response="A: {response}"
)


def test_alpaca_sample_keeps_every_field_in_order():
    text = render_plain_prompt("Translate", "bonjour", T) + render_plain_response("hello", T)
    assert text == "Q: Translate\nContext: bonjour\nA: hello"


def test_empty_input_adds_no_input_part():
    assert render_plain_prompt("Say hi", "", T) == "Q: Say hi\nA: "


def test_default_template_is_plain_text_without_chat_markup():
    t = TemplateConfig()
    text = render_plain_prompt("Add", "2 and 3", t) + render_plain_response("5", t)
    assert text == "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n5"


def test_multi_turn_chat_keeps_system_and_every_turn():
    prompt, response = render_messages(
        [
            {"role": "system", "content": "Be nice"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"},
        ],
        T,
    )
    assert prompt == "Be nice\n\nQ: u1\nA: a1\n\nQ: u2\nA: "
    assert response == "a2"


def test_template_suffix_after_response_is_kept():
    t = TemplateConfig(instruction="<q>{instruction}</q>", input="", response="<a>{response}</a>")
    assert render_plain_prompt("x", "", t) + render_plain_response("y", t) == "<q>x</q><a>y</a>"
