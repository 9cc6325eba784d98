# Two commands: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: serve test lint format bench images mutants clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is pinned so that pip takes the local CPU build instead of several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' -e clients/python
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m server.demo

test: $(STAMP)
	scripts/ensure-redis
	scripts/ensure-nginx
	scripts/ensure-chromium
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy server prefix_store clients/python/prefixserve_client

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Each benchmark writes bench/results/<name>.json (committed); bench.report renders them into bench/README.md.
bench: $(STAMP)
	scripts/ensure-redis
	$(PY) -m bench.throughput --threads 1
	$(PY) -m bench.cache_rotation
	$(PY) -m bench.store_bench
	$(PY) -m bench.fairness
	$(PY) -m bench.report --write

# Deliberate breakages applied to copies of the tree; each must make the tests named in scripts/mutants fail.
mutants: $(STAMP)
	scripts/ensure-redis
	scripts/ensure-nginx
	$(PY) scripts/mutants

# The CPU image and local Redis/nginx stand-ins, with podman (docs/deployment.md); CUDA=1 adds the CUDA image.
images:
	scripts/images $(if $(CUDA),--cuda)

clean:
	rm -rf $(VENV) var
