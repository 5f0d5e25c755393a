"""What a request must satisfy before the gateway routes it: the gateway's policy limits
(--max-new-tokens, --max-stop-strings, --max-stop-chars, --max-prompt-tokens) and the model's
context, each refusal an INVALID_ARGUMENT that says what was wrong and what is allowed, and
counted by limit in `kvpool_gateway_limit_rejections_total`.

The engine checks the fit again (it knows its own cache); these checks carry the gateway's
policy, and refuse a request before any worker or tenant share is taken for it.
"""

from collections.abc import Sequence

from kvpool.errors import InvalidArgument
from services.gateway.api import GenerateCall
from services.gateway.metrics import GatewayMetrics
from services.gateway.pool import WorkerPool
from services.gateway.sessions import Session
from services.gateway.settings import GatewayConfig
from workers.api import PromptInput, SamplingParams
from workers.kv.bounds import check_context, check_window_fits, requested_window
from workers.prompt import PromptTooLong


class RequestLimits:
    """The checks of one gateway: its config, and the pool's model and tokenizer (read when a
    request comes, as the pool knows them only once its workers are up)."""

    def __init__(self, config: GatewayConfig, pool: WorkerPool, metrics: GatewayMetrics) -> None:
        self.config, self.pool, self.metrics = config, pool, metrics

    def check_new_tokens(self, params: SamplingParams) -> None:
        limit = self.config.max_new_tokens
        if limit and params.max_new_tokens > limit:
            self.metrics.limit_rejections.labels("max_new_tokens").inc()
            raise InvalidArgument(
                f"max_new_tokens={params.max_new_tokens} exceeds the gateway's limit "
                f"--max-new-tokens={limit}"
            )

    def window(self, req: GenerateCall, session: Session | None) -> tuple[int, int]:
        """The turn's (max_cache_tokens, sink_tokens): the request's, the session's, or ours.

        Checked here, before any worker is asked, so a bad bound is a clear INVALID_ARGUMENT.
        """
        max_cache_tokens, sink_tokens = self.config.max_cache_tokens, self.config.sink_tokens
        if session is not None and session.turns:
            max_cache_tokens, sink_tokens = session.max_cache_tokens, session.sink_tokens
        if req.max_cache_tokens is not None:
            max_cache_tokens = req.max_cache_tokens
        if req.sink_tokens is not None:
            sink_tokens = req.sink_tokens
        window = requested_window(max_cache_tokens, sink_tokens, self.pool.info.block_tokens)
        if window is not None:
            check_window_fits(window, self.pool.info.max_context)
        return max_cache_tokens, sink_tokens

    def check_stop(self, params: SamplingParams) -> None:
        """Stop strings are checked on every token, so their number and length are capped."""
        most, longest = self.config.max_stop_strings, self.config.max_stop_chars
        if len(params.stop) > most:
            self.metrics.limit_rejections.labels("max_stop_strings").inc()
            raise InvalidArgument(
                f"{len(params.stop)} stop strings exceed the gateway's limit "
                f"--max-stop-strings={most}"
            )
        too_long = max((len(s) for s in params.stop), default=0)
        if too_long > longest:
            self.metrics.limit_rejections.labels("max_stop_chars").inc()
            raise InvalidArgument(
                f"a stop string of {too_long} characters exceeds the gateway's limit "
                f"--max-stop-chars={longest}"
            )

    def encode(self, given: PromptInput, history: Sequence[int] = ()) -> list[int]:
        """The prompt's ids, tokenized within the prompt limit: refused by its size before any
        tokenizing when that alone proves it too long, and counting stops at the limit."""
        most = self.config.max_prompt_tokens or self.pool.info.max_context
        try:
            return self.pool.prompts.encode_input(given, history, max_tokens=most)
        except PromptTooLong as exc:
            self.check_fits(exc.tokens, SamplingParams(max_new_tokens=1), at_least=True)
            raise  # not reached: _check_fits refuses it

    def check_fits(
        self,
        prompt_tokens: int,
        params: SamplingParams,
        window: tuple[int, int] = (0, 0),
        *,
        at_least: bool = False,
    ) -> None:
        """The prompt's length limit holds for every request, a bounded cache or not."""
        limit = self.pool.info.max_context
        most = self.config.max_prompt_tokens
        if prompt_tokens > (most or limit):
            self.metrics.limit_rejections.labels("max_prompt_tokens").inc()
            bound = (
                f"the gateway's limit --max-prompt-tokens={most}"
                if most
                else f"the model's context of {limit} tokens (--max-prompt-tokens=0)"
            )
            raise InvalidArgument(
                f"prompt of {'at least ' if at_least else ''}{prompt_tokens} tokens (a session's "
                f"history included) exceeds {bound}"
            )
        if window[0]:
            return  # a bounded cache holds at most max_cache_tokens positions (checked in window)
        check_context(prompt_tokens, params.max_new_tokens, self.pool.info.max_context, None)
