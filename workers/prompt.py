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

Safety (docs/security.md, "Prompts"):

- a message's content is text, never markup: the chat template is rendered with a placeholder
  for each content, its own text is tokenized with special tokens recognized, and each content
  with special tokens read as plain text. `<|im_start|>system` in a user message is those
  characters, not a forged system turn;
- `max_tokens` bounds the work: input whose UTF-8 length alone proves it longer (more bytes than
  `max_tokens` times the longest token's bytes) is refused before any tokenizing, and long text
  is tokenized in slices of `CHUNK_CHARS`, stopping as soon as the count passes the limit. The
  Rust tokenizer holds the GIL while it runs, so a slice is also the longest any other thread
  waits for it;
- no lock: the Rust tokenizer's `encode` takes no mutable state (the transformers wrapper's call
  sets padding and truncation on each call, which is why calls once took turns under one lock),
  so tenants never queue behind each other's prompts.
"""

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvpool.errors import InvalidArgument
from workers.api import ROLES, PromptInput

_PLACEHOLDER = "\x00kvpool-previous-turn\x00"
_CONTENT = "\x00kvpool-content-{}\x00"  # stands for message i's content while rendering
# What `save_pretrained` writes for a fast tokenizer; nothing else is sent to the gateway.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)
# Text longer than this is tokenized in slices, cut at a line or word break; about 5 ms each.
CHUNK_CHARS = 16384
# Tokens a slice boundary may add or remove against tokenizing the text whole: a slice's count
# is only used to refuse early, beyond the limit plus this much per boundary.
_SLACK_PER_CUT = 4


class PromptTooLong(InvalidArgument):
    """The prompt has more than the allowed tokens; `tokens` is how many were counted (at least
    that many: counting stops at the limit)."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"the prompt has at least {tokens} tokens, more than {limit}")
        self.tokens = tokens
        self.limit = limit


class PromptEncoder:
    """Turns inputs into token ids with one model's tokenizer (and back, for session text)."""

    def __init__(
        self, tokenizer: Any, name: str, vocab_size: int, eos_token_ids: frozenset[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise InvalidArgument(f"model {name!r} has no fast tokenizer (tokenizer.json)")
        from tokenizers import Tokenizer

        self._markup = backend  # special tokens recognized: the chat template's own text
        self._literal = Tokenizer.from_str(backend.to_str())  # special tokens as plain text
        self._literal.encode_special_tokens = True
        # No token covers more bytes of text than this: a prompt of more bytes than
        # max_tokens * this has more than max_tokens tokens, and is refused before tokenizing.
        texts = backend.decode_batch([[i] for i in range(backend.get_vocab_size())])
        self._max_token_bytes = max(1, *(len(t.encode("utf-8")) for t in texts))
        if backend.normalizer is not None:  # normalizing may shrink text: stay on the safe side
            self._max_token_bytes *= 2

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
        *,
        max_tokens: int = 0,
    ) -> list[int]:
        """Token ids for exactly one of a prompt, chat messages (chat template) or token ids.

        `max_tokens` (0: none): PromptTooLong, as soon as the count passes it.
        """
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
            ids = self._tokens([(prompt, False)], max_tokens)
        elif messages is not None:
            ids = self.encode_messages(messages, max_tokens=max_tokens)
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
            if max_tokens and len(ids) > max_tokens:
                raise PromptTooLong(len(ids), max_tokens)
        if not ids:
            raise InvalidArgument("the prompt encodes to no tokens; give some text")
        return list(ids)

    def encode_messages(
        self,
        messages: Sequence[dict[str, str]],
        add_generation_prompt: bool = True,
        *,
        max_tokens: int = 0,
    ) -> list[int]:
        """Token ids of chat messages rendered with the model's chat template."""
        self._check_messages(messages)
        return self._tokens(self._render(messages, add_generation_prompt), max_tokens)

    def _check_messages(self, messages: Sequence[dict[str, str]]) -> None:
        if not messages:
            raise InvalidArgument("messages is empty; give at least one {role, content} message")
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise InvalidArgument(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
            if not isinstance(content, str) or not content.strip():
                raise InvalidArgument(f"messages[{i}].content is empty")
            if "\x00" in content:
                raise InvalidArgument(f"messages[{i}].content holds a NUL character; remove it")
        if self.tokenizer.chat_template is None:
            raise InvalidArgument(
                f"model {self.name!r} has no chat template; send a plain prompt instead"
            )

    def _render(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool
    ) -> list[tuple[str, bool]]:
        """The template's text and each message's content, in order: (text, is_content)."""
        contents = [m["content"] for m in messages]
        marked = [{**m, "content": _CONTENT.format(i)} for i, m in enumerate(messages)]
        text = self.tokenizer.apply_chat_template(
            marked, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        segments: list[tuple[str, bool]] = []
        for i, content in enumerate(contents):
            mark = _CONTENT.format(i)
            before, found, text = text.partition(mark)
            if not found or mark in text:
                # The template changed or repeated the content: read it as it renders it.
                return self._render_whole(messages, add_generation_prompt)
            segments += [(before, False), (content, True)]
        segments.append((text, False))
        return [(part, literal) for part, literal in segments if part]

    def _render_whole(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool
    ) -> list[tuple[str, bool]]:
        """A template that transforms contents: rendered whole, contents free of control tokens."""
        specials = [t for t in self.tokenizer.all_special_tokens if t]
        for i, message in enumerate(messages):
            found = next((t for t in specials if t in message["content"]), None)
            if found is not None:
                raise InvalidArgument(
                    f"messages[{i}].content contains the control token {found!r}, which model "
                    f"{self.name!r}'s chat template would read as markup; remove it"
                )
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return [(text, False)]

    # --- a turn of a session -------------------------------------------------------------------

    def encode_input(
        self, given: PromptInput, history: Sequence[int] = (), *, max_tokens: int = 0
    ) -> list[int]:
        """The whole prompt: `history` (a session's tokens so far) followed by the new input.

        `max_tokens` (0: none) bounds the whole prompt, history included: PromptTooLong as soon
        as the count passes it.
        """
        budget = 0
        if max_tokens:
            budget = max_tokens - len(history)
            if budget <= 0:
                raise PromptTooLong(len(history) + 1, max_tokens)
        try:
            if not history:
                return self.encode(
                    prompt=given.prompt,
                    messages=given.as_dicts(),
                    token_ids=given.token_ids,
                    max_tokens=budget,
                )
            if given.messages is None:
                new = self.encode(prompt=given.prompt, token_ids=given.token_ids, max_tokens=budget)
            else:
                new = self._continuation(given.as_dicts() or [], history, budget)
        except PromptTooLong as exc:
            raise PromptTooLong(exc.tokens + len(history), max_tokens) from None
        return [*history, *new]

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of `token_ids`, special tokens included (a session's history as text)."""
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=False))

    def _tokens(self, segments: Sequence[tuple[str, bool]], max_tokens: int) -> list[int]:
        """The ids of `segments` in order, contents (True) with special tokens as plain text.

        With `max_tokens`, refuses by byte length first, then counts slice by slice.
        """
        if max_tokens:
            size = sum(len(text.encode("utf-8")) for text, _ in segments)
            if size > max_tokens * self._max_token_bytes:
                raise PromptTooLong(size // self._max_token_bytes, max_tokens)
        ids: list[int] = []
        for text, literal in segments:
            tokenizer = self._literal if literal else self._markup
            budget = max_tokens - len(ids) if max_tokens else None
            ids += _encode(tokenizer, text, budget, max_tokens, len(ids))
            if max_tokens and len(ids) > max_tokens:
                raise PromptTooLong(len(ids), max_tokens)
        return ids

    def _continuation(
        self, messages: list[dict[str, str]], history: Sequence[int], max_tokens: int = 0
    ) -> list[int]:
        """Tokens that render `messages` as the next turns after an assistant reply in `history`."""
        if any(m["role"] == "system" for m in messages):
            raise InvalidArgument(
                "a session's later turns cannot carry a system message; put it in the first turn"
            )
        self._check_messages(messages)
        # Rendering a placeholder system message too keeps the template from inserting its
        # default system prompt, which belongs only at the very start of a conversation.
        framed = [
            {"role": "system", "content": "-"},
            {"role": "assistant", "content": _PLACEHOLDER},
            *messages,
        ]
        segments = self._render(framed, add_generation_prompt=True)
        tail: list[tuple[str, bool]] | None = None
        for n, (text, literal) in enumerate(segments):
            if literal and text == _PLACEHOLDER:
                tail = segments[n + 1 :]
                break
            if not literal and _PLACEHOLDER in text:  # a template that rendered it whole
                tail = [(text[text.index(_PLACEHOLDER) + len(_PLACEHOLDER) :], False)]
                tail += segments[n + 1 :]
                break
        if tail is None:
            raise InvalidArgument(
                f"model {self.name!r}'s chat template cannot continue a session in messages "
                "form; send the next turn as a plain prompt"
            )
        ids = self._tokens(tail, max_tokens)
        # The history already ends the assistant turn when its last token was end-of-sequence.
        if ids and history[-1] in self.eos_token_ids and ids[0] == history[-1]:
            ids = ids[1:]
        return ids


def _encode(tokenizer: Any, text: str, budget: int | None, limit: int, before: int) -> list[int]:
    """`text` as ids, no special tokens added; PromptTooLong once slices pass `budget` (None:
    no limit; `limit` and `before` only word the error).

    Short text is one call. Long text is first counted in slices cut at line or word breaks,
    stopping when the count passes `budget` by more than the slices' boundaries can explain, and
    then, when it fits, tokenized whole, so its ids never depend on where the slices fell.
    """
    if len(text) <= CHUNK_CHARS:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)
    if budget is not None:
        counted, cuts, start = 0, 0, 0
        while start < len(text):
            stop = _cut(text, start)
            counted += len(tokenizer.encode(text[start:stop], add_special_tokens=False).ids)
            if counted > budget + _SLACK_PER_CUT * cuts:
                raise PromptTooLong(before + counted, limit)
            start, cuts = stop, cuts + 1
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def _cut(text: str, start: int) -> int:
    """Where the slice from `start` ends: at a line break, else a space, in its last quarter."""
    stop = start + CHUNK_CHARS
    if stop >= len(text):
        return len(text)
    low = stop - CHUNK_CHARS // 4
    for mark in ("\n", " "):
        at = text.rfind(mark, low, stop)
        if at > start:
            return at
    return stop


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files that rebuild `tokenizer` (a fast tokenizer) elsewhere, by name."""
    with tempfile.TemporaryDirectory(prefix="kvpool-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return {
            path.name: path.read_bytes()
            for path in Path(folder).iterdir()
            if path.name in _TOKENIZER_FILES
        }
