"""One vLLM engine in a process of its own, running a list of jobs; run by `kvpool bench vllm`
and the connector's tests with the python of `make vllm`'s venv:

    .venv-vllm/bin/python -m kvpool.bench.vllm_engine JOB.json

JOB.json: {"model": PATH, "connector": {extra config} | null, "native_offload": false,
"log_stats": false, "jobs": [...]}, each job one of

    {"prompt": TEXT or "prompt_token_ids": [...], "max_tokens": N, "cache_salt": TENANT}
                         -> a result line (cache_salt optional)
    {"reset_prefix_cache": true}   empty vLLM's own prefix cache (what it offloaded stays)
    {"signal": PATH}     create PATH (the engine is up, or a job before it is done)
    {"wait": PATH}       block until PATH exists (the caller changes the world meanwhile)
    {"metrics": PREFIX}  a METRICS line: vLLM's metrics (`LLM.get_metrics()`, which needs
                         "log_stats": true) whose names start with PREFIX

Prints one JSON line per prompt job: the greedy text and token ids, the prompt's length, the
tokens vLLM did not compute (its own prefix cache plus what the connector loaded), and the
wall time of the request. The engine is shut down at the end, so the connector's write-behind
puts everything it queued before the process exits.
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _engine(job: dict[str, Any]) -> Any:
    from vllm import LLM

    transfer = None
    if job.get("connector") is not None:
        transfer = {
            "kv_connector": "KVPoolConnector",
            "kv_connector_module_path": "kvpool.integrations.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": job["connector"],
        }
    elif job.get("native_offload"):
        transfer = {
            "kv_connector": "OffloadingConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"cpu_bytes_to_use": 1 << 30},
        }
    return LLM(
        model=job["model"],
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=True,
        max_model_len=job.get("max_model_len", 4096),
        kv_cache_memory_bytes=job.get("kv_cache_bytes", 512 << 20),
        seed=0,
        kv_transfer_config=transfer,
        disable_log_stats=not job.get("log_stats", False),
    )


def _metrics(llm: Any, prefix: str) -> list[dict[str, Any]]:
    """[{"name", "labels", and "value" (counters, gauges) or "count" and "sum" (histograms)}]"""
    found = []
    for metric in llm.get_metrics():
        if metric.name.startswith(prefix):
            entry = {"name": metric.name, "labels": dict(metric.labels)}
            if hasattr(metric, "count"):
                entry.update(count=metric.count, sum=metric.sum)
            else:
                entry["value"] = getattr(metric, "value", None)
            found.append(entry)
    return found


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    from vllm import SamplingParams

    llm = _engine(job)
    for step in job["jobs"]:
        if "signal" in step:
            Path(step["signal"]).touch()
            continue
        if "wait" in step:
            while not os.path.exists(step["wait"]):
                time.sleep(0.05)
            continue
        if "metrics" in step:
            print("METRICS " + json.dumps(_metrics(llm, step["metrics"])), flush=True)
            continue
        if step.get("reset_prefix_cache"):
            llm.reset_prefix_cache()
            continue
        prompt: dict[str, Any] = (
            {"prompt_token_ids": step["prompt_token_ids"]}
            if "prompt_token_ids" in step
            else {"prompt": step["prompt"]}
        )
        if step.get("cache_salt"):
            prompt["cache_salt"] = step["cache_salt"]
        params = SamplingParams(max_tokens=step.get("max_tokens", 16), temperature=0.0)
        started = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        seconds = time.perf_counter() - started
        result = {
            "text": out.outputs[0].text,
            "token_ids": list(out.outputs[0].token_ids),
            "prompt_tokens": len(out.prompt_token_ids or ()),
            "prompt_token_ids": list(out.prompt_token_ids or ()),
            "cached_tokens": out.num_cached_tokens or 0,
            "ms": seconds * 1000,
        }
        print("RESULT " + json.dumps(result), flush=True)
    llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
