"""Two real vLLM engines, each in a process of its own (the python of `make vllm`'s venv), share
prompt prefixes through kvpool's connector, a real `kvpool store serve` and a real redis-server.

Engine A computes three prompts and its connector saves their blocks. Then one block of the
first prompt is damaged in Redis, and engine B, which never saw any of them:
  - loads the second prompt from the store and answers exactly as A did (fp32 blocks);
  - answers the first exactly as A did, though a block of it is damaged (a miss, recomputed);
  - loads nothing for the second prompt under another tenant's cache_salt;
  - answers the third exactly as A did after the store was killed (every request a plain miss);
  - counts all of it, in vLLM's metrics (`LLM.get_metrics()`, the registry `vllm serve` shows
    at /metrics) and on the connector's own `metrics_port`: tokens and bytes loaded from the
    store, the damaged block, the plans chosen, the blocks saved.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from services.store.client import StoreClient
from services.store.redis_process import settled_block_keys
from workers.models import load_model, smollm2_cache_path

pytestmark = [pytest.mark.integration, pytest.mark.model]

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CORPUS = ROOT.parent / "shared" / "corpus"
TOKEN = "vllm-connector-test-token"
SECRET = "0123456789abcdef0123456789abcdef"
DECODED = 200  # tokens of A's long answer: past at least one 128-token block boundary


def _prompts() -> list[str]:
    texts = sorted(CORPUS.glob("*.txt"))[:3] if CORPUS.is_dir() else []
    if len(texts) < 3:  # the corpus lives beside the checkout; a fresh clone elsewhere has none
        texts = sorted((ROOT / "docs").glob("*.md"))[:3]
    return [" ".join(t.read_text().split()[:700]) for t in texts]


@pytest.fixture
def store(redis_server, free_port, tmp_path):
    port = free_port()
    env = {**os.environ, "KVPOOL_STORE_AUTH_TOKEN": TOKEN}
    argv = [sys.executable, "-m", "kvpool.cli", "store", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", "0", "--backend", redis_server]  # fmt: skip
    log = open(tmp_path / "store.log", "wb")  # noqa: SIM115 (the process's)
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    with StoreClient(f"127.0.0.1:{port}", auth_token=TOKEN, timeout_s=60) as client:
        client.wait_ready(60)
    yield proc, f"127.0.0.1:{port}", redis_server
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def _engine(
    tmp_path: Path, name: str, store: str, jobs: list[dict], metrics_port: int | None = None
) -> subprocess.Popen:
    connector = {
        "store": store,
        "codec": "raw",
        "auth_token": TOKEN,
        "namespace_secret": SECRET,
        "timeout_s": 2.0,
    }
    if metrics_port is not None:
        connector["metrics_port"] = metrics_port
    job = {
        "model": str(smollm2_cache_path()),
        "connector": connector,
        "log_stats": metrics_port is not None,  # vLLM's metrics, for the engine that is counted
        "jobs": jobs,
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return subprocess.Popen(
        [str(VLLM_PYTHON), "-m", "kvpool.bench.vllm_engine", str(tmp_path / f"{name}.json")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / f"{name}.log", "wb"),
        text=True,
    )  # fmt: skip


def _results(proc: subprocess.Popen, tmp_path: Path, name: str, timeout_s: float = 600) -> dict:
    """The engine's output lines by kind, in order: {"RESULT": [...], "METRICS": [...]}."""
    out, _ = proc.communicate(timeout=timeout_s)
    log = (tmp_path / f"{name}.log").read_text()[-4000:]
    assert proc.returncode == 0, f"engine {name} failed: {log}"
    lines: dict[str, list] = {"RESULT": [], "METRICS": []}
    for line in out.splitlines():
        kind, _, payload = line.partition(" ")
        if kind in lines:
            lines[kind].append(json.loads(payload))
    return lines


def _vllm(snapshot: list[dict], name: str, **labels: str) -> float:
    """A vLLM counter's value (a histogram's count), summed over the series with these labels."""
    return sum(
        e.get("value", e.get("count")) for e in snapshot
        if e["name"] == "vllm:kvpool_" + name and labels.items() <= e["labels"].items()
    )  # fmt: skip


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, "the engine exited before it got there"
        assert time.monotonic() < deadline, f"no {path.name} in {timeout_s} s"
        time.sleep(0.2)


def test_two_vllm_engines_share_prefixes_through_kvpool_and_survive_damage_and_outage(
    store, tmp_path, free_port
):
    assert VLLM_PYTHON.exists(), "make vllm builds .venv-vllm (make test depends on it)"
    load_model("smollm2-135m", device="cpu")  # converts the packaged weights once
    proc, target, redis_url = store
    first, second, third = _prompts()
    raw = redis.Redis.from_url(redis_url)

    a = _engine(tmp_path, "a", target, [
        {"prompt": first, "max_tokens": 12},
        {"signal": str(tmp_path / "a-first")},
        {"wait": str(tmp_path / "a-go")},
        {"prompt": second, "max_tokens": 12},
        {"prompt": third, "max_tokens": 12},
        {"prompt": second, "max_tokens": DECODED},  # its answer completes blocks of its own
    ])  # fmt: skip
    _wait_for(tmp_path / "a-first", a)
    first_keys = settled_block_keys(redis_url, at_least=3)
    (tmp_path / "a-go").touch()
    a_first, a_second, a_third, a_long = _results(a, tmp_path, "a")["RESULT"]
    assert a_first["cached_tokens"] == 0 and a_first["prompt_tokens"] > 3 * 128
    all_keys = settled_block_keys(redis_url, at_least=len(first_keys) + 6)

    # Damage one block of the first prompt (its payload, past the header): a miss, never used.
    damaged = sorted(first_keys)[0]
    value = bytearray(raw.get(damaged))
    value[-10] ^= 0xFF
    raw.set(damaged, bytes(value))

    # A conversation's next turn: the second prompt, A's long answer, and more.
    turn = [*a_long["prompt_token_ids"], *a_long["token_ids"][: DECODED - 8]]
    metrics_port = free_port()
    b = _engine(tmp_path, "b", target, [
        {"prompt": second, "max_tokens": 12},
        {"metrics": "vllm:kvpool_"},
        {"prompt_token_ids": turn, "max_tokens": 4},
        {"prompt": first, "max_tokens": 12},
        {"prompt": second, "max_tokens": 12, "cache_salt": "another-tenant"},
        {"metrics": "vllm:kvpool_"},
        {"signal": str(tmp_path / "b-ready")},
        {"wait": str(tmp_path / "b-go")},
        {"prompt": third, "max_tokens": 12},
        {"metrics": "vllm:kvpool_"},
    ], metrics_port=metrics_port)  # fmt: skip
    _wait_for(tmp_path / "b-ready", b)
    own = _scrape(metrics_port)  # kvpool's own /metrics, from B's engine core
    proc.kill()  # the store goes away: B's last prompt is a plain miss
    proc.wait(30)
    (tmp_path / "b-go").touch()
    lines = _results(b, tmp_path, "b")
    b_second, b_turn, b_first, b_other_tenant, b_third = lines["RESULT"]
    after_hit, before_outage, after_outage = lines["METRICS"]

    # A fresh engine loaded A's blocks of the second prompt and gave A's greedy text exactly.
    assert b_second["cached_tokens"] >= (b_second["prompt_tokens"] - 1) // 128 * 128 > 0
    assert b_second["token_ids"] == a_second["token_ids"]
    # A's answer was saved too (save_decode): the next turn loaded blocks past the prompt's.
    prompt_blocks = a_long["prompt_tokens"] // 128
    assert b_turn["cached_tokens"] >= (prompt_blocks + 1) * 128
    assert b_turn["cached_tokens"] == (len(turn) - 1) // 128 * 128
    assert b_turn["token_ids"] == a_long["token_ids"][DECODED - 8 : DECODED - 4]
    # The damaged block stopped its prefix: the answer is still A's.
    assert b_first["token_ids"] == a_first["token_ids"]
    # Another tenant's request found nothing: not A's blocks, not B's own prefix cache.
    assert b_other_tenant["cached_tokens"] == 0
    assert b_other_tenant["token_ids"] == a_second["token_ids"]
    # With the store dead the request is a miss, with no error and the same answer.
    assert b_third["cached_tokens"] == 0 and b_third["token_ids"] == a_third["token_ids"]
    assert len(all_keys) > len(first_keys)

    # vLLM's metrics counted the store hit: every token B had cached came from the store.
    assert _vllm(after_hit, "loaded_tokens", tier="store") == b_second["cached_tokens"]
    assert _vllm(after_hit, "loaded_tokens", tier="node") == 0  # the connector reads the store only
    assert _vllm(after_hit, "loaded_bytes", tier="store") > 0
    assert _vllm(after_hit, "load_seconds") == 1  # one load, one sample
    assert _vllm(after_hit, "plans", plan="fetch") + _vllm(after_hit, "plans", plan="split") == 1
    assert _vllm(after_hit, "load_errors") == 0
    # The damaged block was a load error; the other tenant's request had nothing to load.
    assert _vllm(before_outage, "load_errors", reason="damaged") >= 1
    assert _vllm(before_outage, "load_errors") == _vllm(before_outage, "load_errors",
                                                        reason="damaged")  # fmt: skip
    assert _vllm(before_outage, "plans", plan="none") == 1
    assert _vllm(before_outage, "plans") == 4
    # kvpool's own /metrics has the same totals (every step's stats had arrived by then).
    for name, label, value in [("loaded_tokens", "tier", "store"), ("loaded_bytes", "tier",
                               "store"), ("load_errors", "reason", "damaged"),
                               ("plans", "plan", "none"), ("plans", "plan", "fetch")]:  # fmt: skip
        key = (f"kvpool_connector_{name}_total", ((label, value),))
        assert own[key] == _vllm(before_outage, name, **{label: value}), key
    # The store down: a plain miss (plan none), and the other tenant's blocks had been saved.
    assert _vllm(after_outage, "plans", plan="none") == 2
    assert _vllm(after_outage, "saved_blocks", outcome="stored") > 0
    assert _vllm(after_outage, "saved_bytes") > 0
    assert _vllm(after_outage, "save_seconds") >= 1
