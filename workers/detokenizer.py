"""The text of a growing output, decoded a few tokens at a time, stop strings found in its tail.

Re-decoding the whole output on every token, and searching all of it for every stop string, costs
O(output x stops) per token while holding the GIL: 20,000 stop strings of 40 characters took
0.27 s a token (issue 14). Here each token decodes only the tokens since the last complete
character plus a few tokens of context (the window Hugging Face's and vLLM's incremental
detokenizers use: SentencePiece drops a leading space when a token is decoded alone), and a stop
string is searched for only where it could end in the new text. The gateway caps the stop strings
(`--max-stop-strings`, `--max-stop-chars`), so the per-token cost is bounded too.

`OutputText` is one output's end and streamed text on top of it (end-of-text, a stop string, or
max_new_tokens): every engine feeds it the tokens it picks (`workers.engine.Decoding` for the
transformers engine, `workers.vllm_worker` for vLLM), so the engines end outputs and stream their
text alike.

Torch-free: `decode` is the tokenizer's.
"""

from collections.abc import Callable, Collection, Sequence

from workers.api import SamplingParams, TokenEvent

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to
CONTEXT_TOKENS = 5  # tokens decoded before the new ones, so spacing comes out as in a full decode
# A character is at most 4 bytes; tokens still undecodable after this many never will be, so they
# are committed as the replacement characters a full decode would give them.
MAX_PENDING_TOKENS = 8


class StreamText:
    """Call `add` with each new token; `text`, `visible` and `stop_index` read the result."""

    def __init__(
        self, decode: Callable[[list[int]], str], stop: Sequence[str], prior: Sequence[int] = ()
    ) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._ids = list(prior)
        # ids[:read] are decoded into `_stable` for good; ids[prefix:read] give context.
        read = len(self._ids)
        while read > max(0, len(self._ids) - 4) and decode(self._ids[:read]).endswith(REPLACEMENT):
            read -= 1  # a resumed output may end inside a character
        self._read = read
        self._prefix = max(0, read - CONTEXT_TOKENS)
        self._stable = decode(self._ids[:read])
        self._context = decode(self._ids[self._prefix : read])
        self._tail = ""
        if read < len(self._ids):
            self._tail = self._pending()
        self._checked = 0  # text before this offset holds no stop string (but may start one)

    @property
    def text(self) -> str:
        """The output decoded so far (it may end with an incomplete character's placeholder)."""
        return self._stable + self._tail

    def add(self, token_id: int) -> None:
        self._ids.append(token_id)
        self._tail = self._pending()
        complete = self._tail and not self._tail.endswith(REPLACEMENT)
        if complete or len(self._ids) - self._read >= MAX_PENDING_TOKENS:
            self._stable += self._tail
            self._tail = ""
            self._prefix, self._read = self._read, len(self._ids)
            self._context = self._decode(self._ids[self._prefix : self._read])

    def stop_index(self) -> int | None:
        """Where the first stop string starts in `text`, or None."""
        if not self._stop:
            return None
        text = self.text
        # An occurrence not found before must end after `_checked`.
        start = max(0, self._checked - self._longest + 1)
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        self._checked = len(self._stable)  # the tail may still change; search it again
        return min(hits) if hits else None

    def visible(self) -> str:
        """The part of `text` safe to stream: no half-decoded character, no possible stop start."""
        text = self.text.rstrip(REPLACEMENT)
        hold = 0
        for s in self._stop:
            hold = max(hold, _held(text, s, hold))
        return text[: len(text) - hold]

    def _pending(self) -> str:
        """The text the tokens after `_read` add to `_stable`."""
        new = self._decode(self._ids[self._prefix :])
        if new.startswith(self._context):
            return new[len(self._context) :]
        # The decoder rewrote the context (spacing cleanup): keep what is beyond its length.
        return new[len(self._context) :] if len(new) > len(self._context) else ""


def _held(text: str, stop: str, longer_than: int) -> int:
    """The length of the longest end of `text` that starts `stop` (shorter than it), if above
    `longer_than`, else 0. Only places where the stop's first character occurs are tried, in C:
    trying every length with `endswith` cost 1 ms a token for 16 stops of 256 characters.
    """
    if len(stop) < 2:
        return 0
    window = text[len(text) - min(len(stop) - 1, len(text)) :]
    at = window.find(stop[0])
    while at >= 0 and len(window) - at > longer_than:
        if stop.startswith(window[at:]):
            return len(window) - at
        at = window.find(stop[0], at + 1)
    return 0


class OutputText:
    """One output's tokens as an engine picks them: when it ends, and the text to stream.

    `tokens` starts with the output already streamed (a failover's prior output) and grows by
    `add`; `finish_reason` is "eos", "stop" or "length" (also while it runs); `text` is what was
    streamed so far, a stop string and what follows it cut off.
    """

    __slots__ = ("_emitted", "_eos", "_params", "_text", "done", "finish_reason", "text", "tokens")

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        params: SamplingParams,
        eos_token_ids: Collection[int],
        tokens: list[int],
    ) -> None:
        self._params, self._eos, self.tokens = params, eos_token_ids, tokens
        self._text = StreamText(decode, params.stop, tokens)
        self.text = self._text.visible()
        self._emitted = len(self.text)
        self.finish_reason = "length"
        self.done = False

    def add(self, token: int) -> TokenEvent:
        """Append the next token; its event carries the text it makes safe to stream."""
        self.tokens.append(token)
        if token in self._eos and not self._params.ignore_eos:
            self.finish_reason = "eos"
        text = self._text
        text.add(token)
        stop_at = text.stop_index()
        if stop_at is not None:
            self.finish_reason = "stop"
        last = self.finish_reason != "length" or len(self.tokens) >= self._params.max_new_tokens
        if stop_at is not None:
            visible = text.text[:stop_at]
        elif last:  # nothing can complete a stop string or a character any more
            visible = text.text
        else:
            visible = text.visible()
        delta = visible[self._emitted :] if len(visible) > self._emitted else ""
        self._emitted = max(self._emitted, len(visible))
        self.text = visible
        self.done = last
        return TokenEvent(token_id=token, text=delta)
