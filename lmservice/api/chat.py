"""Chat messages -> one prompt string.

With a tokenizer that has a `chat_template`, that template renders the
messages (with the generation prompt added). GPT-2 has none, so the plain
template below is used; it is documented in docs/api.md:

    <role>: <content>\\n      one line per message, in order
    assistant:               the generation prompt

The model continues after "assistant:". Nothing here adds stop strings: a
client that wants the reply to end at the next turn sends `"stop": ["\\nuser:"]`.
"""

from __future__ import annotations

from typing import Any

from lmservice.api.errors import APIError
from lmservice.api.schemas.openai import ChatMessage


def message_text(message: ChatMessage) -> str:
    """Content as text: a string, or the text parts of a list of content parts (other parts are a 400)."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages: unsupported content part type {part.get('type')!r} (only 'text')",
                           param="messages")
        texts.append(part["text"])
    return "".join(texts)


def render_plain(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant:" if add_generation_prompt else "")


def render_chat_prompt(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    plain = [{"role": m.role, "content": message_text(m)} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # a template may reject roles or orders it does not know
            raise APIError(400, f"messages: the model's chat template rejected them: {e}", param="messages") from e
    return render_plain(plain, add_generation_prompt)
