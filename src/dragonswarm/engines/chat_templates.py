"""Chat templates for GGUF files that do not carry their own `tokenizer.chat_template`.

The model's own template always wins. Some published GGUFs (the bundled Gemma 3 270M
among them) omit it; for those the template of the model family, keyed by
`general.architecture`, is used instead of guessing a generic one.
"""

from __future__ import annotations

# Gemma's turn format: a system message is folded into the first user turn, and the
# assistant's role is called "model".
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (prefix if loop.first else '') + (m['content'] | trim) }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

BY_ARCHITECTURE = {"gemma": GEMMA, "gemma2": GEMMA, "gemma3": GEMMA, "gemma3n": GEMMA}


def chat_template(metadata: dict[str, str]) -> str | None:
    """The template to format chat messages with, or None if the model has none."""
    own = metadata.get("tokenizer.chat_template")
    if own:
        return own
    return BY_ARCHITECTURE.get(metadata.get("general.architecture", ""))
