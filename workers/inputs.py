"""A request's input (text, chat messages or token ids) and how it becomes prompt tokens, alone or
as the next turn of a conversation whose tokens are already fixed.

A session's history is the exact token sequence fed so far, and a new turn must only append to
it, so the history stays a prefix and its blocks stay cache hits. Plain text and token ids append
as they are. Chat messages are rendered as a continuation: the chat template is applied to a
placeholder assistant message followed by the new messages, and only the text after the
placeholder is kept. That text closes the previous assistant turn (its end-of-turn marker, unless
the history already ends with it) and opens the new ones, exactly as the template would render
the whole conversation, without re-rendering (and re-tokenizing) the history.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from kvpool.errors import InvalidArgument
from workers.engine import ROLES, Engine

_PLACEHOLDER = "\x00kvpool-previous-turn\x00"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidArgument(f"message role must be one of {ROLES}, got {self.role!r}")


@dataclass(frozen=True, slots=True)
class PromptInput:
    """Exactly one of `prompt`, `messages` or `token_ids` is set."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("prompt", "messages", "token_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            named = ", ".join(given) or "none"
            raise InvalidArgument(
                f"give exactly one of prompt, messages or token_ids (got {named})"
            )

    def as_dicts(self) -> list[dict[str, str]] | None:
        if self.messages is None:
            return None
        return [{"role": m.role, "content": m.content} for m in self.messages]


def encode_input(engine: Engine, given: PromptInput, history: Sequence[int] = ()) -> list[int]:
    """The whole prompt: `history` (a session's tokens so far) followed by the new input."""
    if not history:
        return engine.encode(
            prompt=given.prompt, messages=given.as_dicts(), token_ids=given.token_ids
        )
    if given.messages is None:
        return [*history, *engine.encode(prompt=given.prompt, token_ids=given.token_ids)]
    return [*history, *_continuation(engine, given.as_dicts() or [], history)]


def _continuation(
    engine: Engine, messages: list[dict[str, str]], history: Sequence[int]
) -> list[int]:
    """Tokens that render `messages` as the next turns after an assistant reply in `history`."""
    if any(m["role"] == "system" for m in messages):
        raise InvalidArgument(
            "a session's later turns cannot carry a system message; put it in the first turn"
        )
    # Rendering a placeholder system message too keeps the template from inserting its default
    # system prompt, which belongs only at the very start of a conversation.
    framed = [
        {"role": "system", "content": "-"},
        {"role": "assistant", "content": _PLACEHOLDER},
        *messages,
    ]
    engine.encode_messages(messages)  # validates roles and contents with the engine's messages
    text = engine.tokenizer.apply_chat_template(framed, tokenize=False, add_generation_prompt=True)
    if _PLACEHOLDER not in text:
        raise InvalidArgument(
            f"model {engine.loaded.name!r}'s chat template cannot continue a session in messages "
            "form; send the next turn as a plain prompt"
        )
    tail = text[text.index(_PLACEHOLDER) + len(_PLACEHOLDER) :]
    ids = list(engine.tokenizer(tail, add_special_tokens=False)["input_ids"])
    # The history already ends the assistant turn when its last token was end-of-sequence.
    if ids and history[-1] in engine.eos_token_ids and ids[0] == history[-1]:
        ids = ids[1:]
    return ids
