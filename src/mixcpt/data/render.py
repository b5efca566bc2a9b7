"""Rendering samples to plain text for the stage-1 stream (design.md §1): no chat template.

An instruction sample becomes one document: instruction, optional input, response, each through
the configured `TemplateConfig`. A preference sample is rendered the same way with its *chosen*
response only. Every field of a sample ends up in the text: nothing is dropped (a known
failure of other tools' pre-training stages on Alpaca data).
"""

from __future__ import annotations

from mixcpt.config import TemplateConfig


def render_plain_prompt(instruction: str, input: str, template: TemplateConfig) -> str:
    """The text before the response: instruction part, input part when non-empty, response
    prefix."""
    text = template.instruction.format(instruction=instruction)
    if input:
        text += template.input.format(input=input)
    prefix, _, _ = template.response.partition("{response}")
    return text + prefix


def render_plain_response(response: str, template: TemplateConfig) -> str:
    """The response and whatever the template puts after it."""
    _, _, suffix = template.response.partition("{response}")
    return response + suffix


def render_messages(messages: list[dict], template: TemplateConfig) -> tuple[str, str]:
    """Render a chat (list of {role, content}, last turn from the assistant) as (prompt, response).

    Earlier turns are rendered in order into the prompt, so a multi-turn sample keeps every turn.
    A system message opens the prompt as its own paragraph.
    """
    system = "".join(m["content"] + "\n\n" for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    prompt, pending_user = system, None
    for m in turns[:-1]:
        if m["role"] == "user":
            pending_user = (
                m["content"] if pending_user is None else pending_user + "\n" + m["content"]
            )
        else:
            prompt += render_plain_prompt(pending_user or "", "", template)
            prompt += render_plain_response(m["content"], template) + "\n\n"
            pending_user = None
    prompt += render_plain_prompt(pending_user or "", "", template)
    return prompt, render_plain_response(turns[-1]["content"], template)
