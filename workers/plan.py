"""The fetch plan: per request, fetch the cached prefix, recompute it, or both at once.

Pure: running estimates in, a plan out; no torch, no I/O. A block's K and V depend only on the
tokens before it, so a prefix of n cached blocks can be rebuilt from any split point s: blocks
[l, s) recomputed on the device while blocks [s, n) are fetched, then joined (l blocks are
already in L1, which costs nothing). With T tokens per block, a prompt of P tokens, and

    prefill(a, b)  = f + (b - a) * spt(b)  seconds to prefill tokens a..b with 0..a cached:
                                           f = a forward pass's fixed cost (from prefills of
                                           a few tokens), spt = seconds per token measured
                                           near length b (from prefills of many tokens)
    fetch(s)       = sum over tiers t holding blocks of [s, n): lat_t + bytes_t(s) / bw_t

the predicted time to first token of split point s is

    ttft(s) = max(prefill(l*T, s*T), fetch(s)) + prefill(n*T, P)

s = l is "fetch", s = n is "recompute" (predicted as one prefill(l*T, P)), anything between is
"split". The plan with the smallest prediction wins, and a fetch or split must beat recompute
by MARGIN (10%), so a cached prefix is only used when the estimates say it is clearly faster
than computing it. Estimates are exponentially weighted running
means (`Estimates`), fed by every fetch and every prefill the worker does.

The max() assumes the recompute and the fetch overlap perfectly. They need not: the fetch's
host work (checksums, copies, gRPC) holds Python's GIL, which the recompute's kernel launches
need too (on a GPU), or shares the cores (on a CPU). So each split's overlap phase is timed
against its prediction, and the running ratio (`split_factor`, at least 1) scales the overlap
of every later split's prediction: a worker where splits overlap badly stops choosing them.
The ratio decays back towards 1 with each plan that is not a split, so a split is tried again
once conditions may have changed.
"""

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from workers.api import PLAN_KINDS, check_mode

TIERS = ("node", "store")
EWMA_WEIGHT = 0.5  # of a new observation: two or three requests follow a change of link or load
# A fetch or split must be predicted this much faster than recomputing: estimates are noisy,
# and a cached prefix must never make a request slower than a miss.
MARGIN = 0.1
FEW_TOKENS = 32  # a prefill shorter than this measures a forward pass's fixed cost
MAX_SPLIT_FACTOR = 8.0  # a split's overlap is believed at most this much slower than predicted
SPLIT_FACTOR_DECAY = 0.9  # of the factor's excess over 1, kept by each plan that is not a split


@dataclass(frozen=True, slots=True)
class TierCost:
    """What a fetch from one tier costs: a fixed latency and a rate (decoding included)."""

    latency_s: float
    bytes_per_s: float

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.bytes_per_s <= 0:
            raise ValueError("a tier cost needs latency_s >= 0 and bytes_per_s > 0")

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s if nbytes else 0.0


# Before the first measurement: what these figures are on the machines the design names
# (docs/design.md: Ray's object store into a GPU at 5.5 GB/s, the store at 0.4-0.9 GB/s). A first
# request then behaves as before the plan existed (fetch), and the estimates take over.
PRIOR_TIER_COSTS = {
    "node": TierCost(latency_s=0.002, bytes_per_s=1.5e9),
    "store": TierCost(latency_s=0.003, bytes_per_s=0.4e9),
}
PRIOR_PREFILL_TOKENS_PER_S = {"cpu": 300.0, "cuda": 20_000.0}


@dataclass(frozen=True, slots=True)
class Plan:
    kind: str  # "none" (nothing cached beyond L1), "fetch", "recompute" or "split"
    split_block: int  # blocks [local, split_block) are recomputed, [split_block, cached) fetched
    predicted_s: Mapping[str, float] = field(default_factory=dict)  # by kind, for logs/metrics
    overlap_s: float = 0.0  # a split's predicted overlap phase, max(recompute, fetch), unscaled

    def __post_init__(self) -> None:
        if self.kind not in PLAN_KINDS:
            raise ValueError(f"plan kind must be one of {PLAN_KINDS}, got {self.kind!r}")


def _bucket(tokens: int) -> int:
    return max(0, math.ceil(math.log2(max(tokens, 1))))


class Estimates:
    """Running estimates of each tier's cost and of the prefill rate by prompt length.

    Thread-safe: requests read them while other requests' fetches and prefills update them.
    Memory is bounded: one value per tier and one per power-of-two length bucket.
    """

    def __init__(self, device_type: str = "cpu", weight: float = EWMA_WEIGHT) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"EWMA weight must be in (0, 1], got {weight}")
        self._weight = weight
        self._latency = {t: PRIOR_TIER_COSTS[t].latency_s for t in TIERS}
        self._spb = {t: 1.0 / PRIOR_TIER_COSTS[t].bytes_per_s for t in TIERS}  # seconds per byte
        self._last_spb: dict[str, float] = {}  # each tier's latest fetch, seconds per byte
        self._measured: set[str] = set()
        self._prior_spt = 1.0 / PRIOR_PREFILL_TOKENS_PER_S.get(device_type, 300.0)
        self._spt: dict[int, float] = {}  # length bucket -> seconds per prefilled token
        self._fixed_s = 0.0  # a forward pass's cost whatever its length (launches, LM head)
        self._fixed_measured = False
        self._split_factor = 1.0  # measured / predicted time of a split's overlap phase
        self._lock = threading.Lock()

    def _mix(self, old: float, new: float, first: bool) -> float:
        return new if first else old + self._weight * (new - old)

    def _mix_rate(self, old: float, new: float, first: bool) -> float:
        """A running mean in log space: rates span orders of magnitude (a link shaped to 25
        Mbit/s, then not), and an arithmetic mean of seconds per byte would let one slow sample
        hide a fast link for many requests."""
        if first or old <= 0:
            return new
        return math.exp(math.log(old) + self._weight * (math.log(new) - math.log(old)))

    def observe_fetch(self, tier: str, nbytes: int, seconds: float) -> None:
        """A fetch of `nbytes` from `tier` (its call latency included) took `seconds`."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        if nbytes <= 0 or seconds <= 0:
            return
        with self._lock:
            first = tier not in self._measured
            latency = min(self._latency[tier], seconds)
            per_byte = max(seconds - latency, seconds * 0.5) / nbytes
            self._spb[tier] = self._mix_rate(self._spb[tier], per_byte, first)
            self._last_spb[tier] = per_byte
            self._measured.add(tier)

    def observe_latency(self, tier: str, seconds: float) -> None:
        """A small call to `tier` (a lookup) took `seconds`."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        if seconds < 0:
            return
        with self._lock:
            self._latency[tier] = self._mix(self._latency[tier], seconds, False)

    def observe_prefill(self, tokens: int, end: int, seconds: float) -> None:
        """Prefilling `tokens` tokens that end at sequence length `end` took `seconds`.

        A prefill of a few tokens (after a cache hit) measures the fixed cost of a forward
        pass; a longer one, net of that, the cost per token at its length.
        """
        if tokens <= 0 or seconds <= 0:
            return
        with self._lock:
            if tokens < FEW_TOKENS:
                self._fixed_s = self._mix(self._fixed_s, seconds, not self._fixed_measured)
                self._fixed_measured = True
                return
            bucket = _bucket(end)
            per_token = max(seconds - self._fixed_s, seconds / 2) / tokens
            old = self._spt.get(bucket)
            self._spt[bucket] = self._mix_rate(old or 0.0, per_token, old is None)

    def observe_split(self, predicted_s: float, seconds: float) -> None:
        """A split's overlap phase, predicted (unscaled) at `predicted_s`, took `seconds`."""
        if predicted_s <= 0 or seconds <= 0:
            return
        ratio = min(max(seconds / predicted_s, 1.0), MAX_SPLIT_FACTOR)
        with self._lock:
            self._split_factor = self._mix(self._split_factor, ratio, False)

    def observe_plan(self, kind: str) -> None:
        """A plan other than a split was chosen: the split factor decays towards 1."""
        if kind == "split":
            return
        with self._lock:
            self._split_factor = 1.0 + (self._split_factor - 1.0) * SPLIT_FACTOR_DECAY

    def split_factor(self) -> float:
        with self._lock:
            return self._split_factor

    def tier_cost(self, tier: str) -> TierCost:
        """The tier's cost: the running mean, or its latest fetch when that was slower.

        Cautious on purpose: a link that just got slower is believed at once (a fetch that is
        slower than predicted makes the request slower than a miss), one that got faster only
        as the mean follows it (a recompute that was not needed costs no more than a miss).
        """
        with self._lock:
            per_byte = max(self._spb[tier], self._last_spb.get(tier, 0.0))
            return TierCost(self._latency[tier], 1.0 / per_byte)

    def prefill_s(self, start: int, end: int) -> float:
        """Predicted seconds to prefill tokens [start, end) (at least the last token is fed)."""
        tokens = max(end - start, 1)
        bucket = _bucket(end)
        with self._lock:
            if not self._spt:
                spt = self._prior_spt
            else:  # the nearest measured length; a longer one when equally near (pessimistic)
                nearest = min(self._spt, key=lambda b: (abs(b - bucket), -b))
                spt = self._spt[nearest]
            return self._fixed_s + tokens * spt

    def snapshot(self) -> dict[str, float]:
        """The current estimates (for stats and metrics)."""
        with self._lock:
            values = {f"{t}_bytes_per_s": 1.0 / self._spb[t] for t in TIERS}
            values |= {f"{t}_latency_s": self._latency[t] for t in TIERS}
            values |= {f"prefill_tokens_per_s_{1 << b}": 1.0 / s for b, s in self._spt.items()}
            values["prefill_fixed_s"] = self._fixed_s
            values["split_factor"] = self._split_factor
        return values


@dataclass(frozen=True, slots=True)
class CachedRun:
    """Where a prompt's cached prefix lies: L1, then the node tier, then the store."""

    block_tokens: int
    prompt_tokens: int
    local_blocks: int
    node_blocks: int
    store_blocks: int
    block_bytes: int  # encoded bytes of one block (same in both tiers)

    @property
    def cached_blocks(self) -> int:
        return self.local_blocks + self.node_blocks + self.store_blocks


def choose(run: CachedRun, estimates: Estimates, mode: str = "auto", splits: bool = True) -> Plan:
    """The plan with the lowest predicted time to first token (or the one `mode` forces).

    With `splits` False (a cache the engine must build in chunks: a native sliding window or a
    windowed request), only fetch and recompute are weighed.
    """
    check_mode(mode)
    local, cached, size = run.local_blocks, run.cached_blocks, run.block_tokens
    if cached == local:
        return Plan("none", local)
    node_end = local + run.node_blocks
    costs = {t: estimates.tier_cost(t) for t in TIERS}

    def fetch_s(split: int) -> float:
        node = max(0, node_end - max(split, local))
        store = cached - max(split, node_end)
        return costs["node"].seconds(node * run.block_bytes) + costs["store"].seconds(
            store * run.block_bytes
        )

    rest = estimates.prefill_s(cached * size, run.prompt_tokens)
    recompute = estimates.prefill_s(local * size, run.prompt_tokens)
    predicted = {"recompute": recompute, "fetch": fetch_s(local) + rest}
    if mode == "recompute":
        return Plan("recompute", cached, predicted)
    if mode == "fetch":
        return Plan("fetch", local, predicted)
    factor = estimates.split_factor()
    best, best_s, overlap = local, predicted["fetch"], 0.0
    for split in range(local + 1, cached if splits else local + 1):
        phase = max(estimates.prefill_s(local * size, split * size), fetch_s(split))
        ttft = phase * factor + rest
        if ttft < best_s:
            best, best_s, overlap = split, ttft, phase
    if best != local:
        predicted["split"] = best_s
    if best_s > recompute * (1 - MARGIN):
        return Plan("recompute", cached, predicted)
    if best == local:
        return Plan("fetch", local, predicted)
    return Plan("split", best, predicted, overlap_s=overlap)
