"""Tokenization: a request's input (text, chat messages or token ids) as prompt token ids, alone or
as the next turn of a conversation whose tokens are already fixed.

Torch-free, so the gateway tokenizes (one trip to a worker fewer before the first token) with the
very files the workers' tokenizer was saved to (`tokenizer_files`, `PromptEncoder.from_files`):
both sides then produce the same ids. Only the tokenizer is loaded, never the model.

A session's history is the exact token sequence fed so far, and a new turn must only append to
it, so the history stays a prefix and its blocks stay cache hits. Plain text and token ids append
as they are. Chat messages are rendered as a continuation: the chat template is applied to a
placeholder assistant message followed by the new messages, and only the text after the
placeholder is kept. That text closes the previous assistant turn (its end-of-turn marker, unless
the history already ends with it) and opens the new ones, exactly as the template would render
the whole conversation, without re-rendering (and re-tokenizing) the history.
"""

import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvpool.errors import InvalidArgument
from workers.api import ROLES, PromptInput

_PLACEHOLDER = "\x00kvpool-previous-turn\x00"
# What `save_pretrained` writes for a fast tokenizer; nothing else is sent to the gateway.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)


class PromptEncoder:
    """Turns inputs into token ids with one model's tokenizer (and back, for session text)."""

    def __init__(
        self, tokenizer: Any, name: str, vocab_size: int, eos_token_ids: frozenset[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        # A fast tokenizer may reset its padding and truncation state on each call, and Rust's
        # borrow check then fails a concurrent call ("Already borrowed"); the gateway's request
        # threads share one encoder, so calls take turns (each is a millisecond or so).
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, loaded: Any) -> "PromptEncoder":
        """The encoder of a `workers.models.LoadedModel` (duck-typed: no torch import here)."""
        return cls(
            loaded.tokenizer,
            name=loaded.name,
            vocab_size=int(loaded.model.config.vocab_size),
            eos_token_ids=loaded.eos_token_ids,
        )

    @classmethod
    def from_files(
        cls, files: Mapping[str, bytes], name: str, vocab_size: int, eos_token_ids: frozenset[int]
    ) -> "PromptEncoder":
        """An encoder from the files `tokenizer_files` read on a worker."""
        # PreTrainedTokenizerFast, not AutoTokenizer: the latter imports torch.
        from transformers import PreTrainedTokenizerFast

        unknown = sorted(set(files) - set(_TOKENIZER_FILES))
        if unknown or "tokenizer.json" not in files:
            raise InvalidArgument(
                f"tokenizer files must include tokenizer.json and only {_TOKENIZER_FILES}; "
                f"got {sorted(files)}"
            )
        with tempfile.TemporaryDirectory(prefix="kvpool-tokenizer-") as folder:
            for file_name, data in files.items():
                (Path(folder) / file_name).write_bytes(data)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        return cls(tokenizer, name=name, vocab_size=vocab_size, eos_token_ids=eos_token_ids)

    # --- one input -----------------------------------------------------------------------------

    def encode(
        self,
        prompt: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        token_ids: Sequence[int] | None = None,
    ) -> list[int]:
        """Token ids for exactly one of a prompt, chat messages (chat template) or token ids."""
        given = [
            name
            for name, value in (
                ("prompt", prompt),
                ("messages", messages),
                ("token_ids", token_ids),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise InvalidArgument(
                f"give exactly one of prompt, messages or token_ids (got {given or 'none'})"
            )
        if prompt is not None:
            if not prompt.strip():
                raise InvalidArgument("prompt is empty; give some text to continue")
            ids = self._ids(prompt)
        elif messages is not None:
            ids = self.encode_messages(messages)
        else:
            ids = list(token_ids or [])
            if not ids:
                raise InvalidArgument("token_ids is empty; give at least one token id")
            bad = [
                t
                for t in ids
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size
            ]
            if bad:
                raise InvalidArgument(
                    f"token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}"
                )
        if not ids:
            raise InvalidArgument("the prompt encodes to no tokens; give some text")
        return list(ids)

    def encode_messages(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of chat messages rendered with the model's chat template."""
        if not messages:
            raise InvalidArgument("messages is empty; give at least one {role, content} message")
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise InvalidArgument(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
            if not isinstance(content, str) or not content.strip():
                raise InvalidArgument(f"messages[{i}].content is empty")
        if self.tokenizer.chat_template is None:
            raise InvalidArgument(
                f"model {self.name!r} has no chat template; send a plain prompt instead"
            )
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return self._ids(text)

    # --- a turn of a session -------------------------------------------------------------------

    def encode_input(self, given: PromptInput, history: Sequence[int] = ()) -> list[int]:
        """The whole prompt: `history` (a session's tokens so far) followed by the new input."""
        if not history:
            return self.encode(
                prompt=given.prompt, messages=given.as_dicts(), token_ids=given.token_ids
            )
        if given.messages is None:
            return [*history, *self.encode(prompt=given.prompt, token_ids=given.token_ids)]
        return [*history, *self._continuation(given.as_dicts() or [], history)]

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of `token_ids`, special tokens included (a session's history as text)."""
        with self._lock:
            return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=False))

    def _ids(self, text: str) -> list[int]:
        """`text` as token ids, no special tokens added (the chat template writes its own)."""
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _continuation(self, messages: list[dict[str, str]], history: Sequence[int]) -> list[int]:
        """Tokens that render `messages` as the next turns after an assistant reply in `history`."""
        if any(m["role"] == "system" for m in messages):
            raise InvalidArgument(
                "a session's later turns cannot carry a system message; put it in the first turn"
            )
        # Rendering a placeholder system message too keeps the template from inserting its
        # default system prompt, which belongs only at the very start of a conversation.
        framed = [
            {"role": "system", "content": "-"},
            {"role": "assistant", "content": _PLACEHOLDER},
            *messages,
        ]
        self.encode_messages(messages)  # validates roles and contents
        text = self.tokenizer.apply_chat_template(
            framed, tokenize=False, add_generation_prompt=True
        )
        if _PLACEHOLDER not in text:
            raise InvalidArgument(
                f"model {self.name!r}'s chat template cannot continue a session in messages "
                "form; send the next turn as a plain prompt"
            )
        tail = text[text.index(_PLACEHOLDER) + len(_PLACEHOLDER) :]
        ids = self._ids(tail)
        # The history already ends the assistant turn when its last token was end-of-sequence.
        if ids and history[-1] in self.eos_token_ids and ids[0] == history[-1]:
            ids = ids[1:]
        return ids


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files that rebuild `tokenizer` (a fast tokenizer) elsewhere, by name."""
    with tempfile.TemporaryDirectory(prefix="kvpool-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return {
            path.name: path.read_bytes()
            for path in Path(folder).iterdir()
            if path.name in _TOKENIZER_FILES
        }
