"""What `kvpool bench load` records per request, and how it sums them up: the summary, the
timeline, the text report and the plot."""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Record:
    """One request, as its client saw it. Times are seconds since the load started."""

    client: int
    document: int
    started_s: float
    ended_s: float
    code: str  # "OK" or the gRPC status code name
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    cached_local_tokens: int = 0
    cached_store_tokens: int = 0
    completion_tokens: int = 0
    worker: str = ""
    detail: str = ""  # the error message, for failed requests

    @property
    def cached_tokens(self) -> int:
        return self.cached_local_tokens + self.cached_store_tokens


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def summarize(records: list[Record], duration_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.code == "OK"]
    failed = [r for r in records if r.code != "OK"]
    # Requests in flight when the duration ended still count; the rate uses the time they took.
    elapsed = max([duration_s, *(r.ended_s for r in records)])
    ttfts = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    latencies = [(r.ended_s - r.started_s) * 1000.0 for r in ok]
    prompt = sum(r.prompt_tokens for r in ok)
    local = sum(r.cached_local_tokens for r in ok)
    store = sum(r.cached_store_tokens for r in ok)
    hits = [r for r in ok if r.cached_tokens > 0]
    misses = [r.ttft_ms for r in ok if r.cached_tokens == 0 and r.ttft_ms is not None]
    hit_ttfts = [r.ttft_ms for r in hits if r.ttft_ms is not None]
    return {
        "requests": len(ok),
        "errors": len(failed),
        "errors_by_code": dict(Counter(r.code for r in failed)),
        "error_examples": sorted({f"{r.code}: {r.detail}" for r in failed})[:5],
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(len(ok) / elapsed, 3) if elapsed else 0.0,
        "completion_tokens_per_s": round(sum(r.completion_tokens for r in ok) / elapsed, 2)
        if elapsed
        else 0.0,
        "ttft_ms": {
            "p50": _ms(percentile(ttfts, 50)),
            "p90": _ms(percentile(ttfts, 90)),
            "p99": _ms(percentile(ttfts, 99)),
            "max": _ms(max(ttfts, default=None)),
            "hit_p50": _ms(percentile(hit_ttfts, 50)),
            "miss_p50": _ms(percentile(misses, 50)),
        },
        "latency_ms": {
            "p50": _ms(percentile(latencies, 50)),
            "p99": _ms(percentile(latencies, 99)),
        },
        "prompt_tokens_mean": round(prompt / len(ok), 1) if ok else 0.0,
        "hit_rate_tokens": round((local + store) / prompt, 4) if prompt else 0.0,
        "hit_rate_tokens_by_tier": {
            "local": round(local / prompt, 4) if prompt else 0.0,
            "store": round(store / prompt, 4) if prompt else 0.0,
        },
        "requests_with_hit": round(len(hits) / len(ok), 4) if ok else 0.0,
        "requests_by_worker": dict(Counter(r.worker for r in ok)),
    }


def timeline(records: list[Record]) -> list[dict[str, Any]]:
    """Per second of the run (by when requests ended): completions, errors, median TTFT."""
    seconds: dict[int, list[Record]] = {}
    for r in records:
        seconds.setdefault(int(r.ended_s), []).append(r)
    rows = []
    for second in range(max(seconds, default=-1) + 1):
        done = seconds.get(second, [])
        ttfts = [r.ttft_ms for r in done if r.code == "OK" and r.ttft_ms is not None]
        rows.append(
            {
                "second": second,
                "completed": sum(r.code == "OK" for r in done),
                "errors": sum(r.code != "OK" for r in done),
                "ttft_p50_ms": _ms(percentile(ttfts, 50)),
            }
        )
    return rows


def format_summary(s: dict[str, Any]) -> str:
    t, lat = s["ttft_ms"], s["latency_ms"]
    tiers = s["hit_rate_tokens_by_tier"]
    lines = [
        f"requests      {s['requests']} in {s['elapsed_s']} s = {s['requests_per_s']} req/s "
        f"({s['completion_tokens_per_s']} generated tokens/s)",
        f"TTFT ms       p50 {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  max {t['max']}  "
        f"(hits p50 {t['hit_p50']}, misses p50 {t['miss_p50']})",
        f"latency ms    p50 {lat['p50']}  p99 {lat['p99']}",
        f"hit rate      {s['hit_rate_tokens']:.1%} of {s['prompt_tokens_mean']} prompt tokens "
        f"(local {tiers['local']:.1%}, store {tiers['store']:.1%}); "
        f"{s['requests_with_hit']:.1%} of requests had a hit",
        f"errors        {s['errors']} {s['errors_by_code'] or ''}",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    from kvpool.bench.report import figure, save_plot

    fig, axes = figure(ncols=2, size=(6.0, 4.0))
    scatter, rate = axes[0]
    requests = [r for r in result["requests"] if r["code"] == "OK"]
    for label, hit, marker in (("prefix hit", True, "."), ("miss", False, "x")):
        chosen = [r for r in requests if _had_hit(r) == hit]
        scatter.scatter(
            [r["started_s"] for r in chosen],
            [r["ttft_ms"] for r in chosen],
            s=10,
            marker=marker,
            label=f"{label} ({len(chosen)})",
        )
    ttft = result["summary"]["ttft_ms"]
    for name, style in (("p50", "--"), ("p99", ":")):
        if ttft[name] is not None:
            label = f"{name} {ttft[name]:.0f} ms"
            scatter.axhline(ttft[name], linestyle=style, color="gray", label=label)
    if requests:
        scatter.set_yscale("log")
    scatter.set_xlabel("request sent at, s")
    scatter.set_ylabel("time to first token, ms (log)")
    scatter.set_title(f"TTFT of each request, {result['clients']} clients")
    scatter.grid(True, which="both", alpha=0.3)
    scatter.legend(fontsize=8)

    rows = result["timeline"]
    seconds = [r["second"] for r in rows]
    rate.bar(seconds, [r["completed"] for r in rows], width=1.0, label="completed")
    rate.bar(
        seconds,
        [r["errors"] for r in rows],
        width=1.0,
        bottom=[r["completed"] for r in rows],
        color="red",
        label="errors",
    )
    s = result["summary"]
    rate.set_xlabel("second of the run")
    rate.set_ylabel("requests finished")
    rate.set_title(
        f"{s['requests_per_s']} req/s, hit rate {s['hit_rate_tokens']:.0%}, {s['errors']} errors"
    )
    rate.grid(True, axis="y", alpha=0.3)
    rate.legend(fontsize=8)
    save_plot(path, fig)


def _had_hit(record: dict[str, Any]) -> bool:
    return record["cached_local_tokens"] + record["cached_store_tokens"] > 0
