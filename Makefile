# The two commands of the README. Each installs what it needs into .venv first.
VENV ?= .venv
STAMP := $(VENV)/.raykd-installed

.PHONY: quickstart test test-fast install clean

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default (SmolLM2-135M-Instruct teacher, truncated student).
quickstart: $(STAMP)
	$(VENV)/bin/raykd train configs/quickstart.yaml

# The whole test suite (unit + integration on a local Ray cluster; GPU tests skip without CUDA).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=25

# Unit tests only: seconds.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) runs .pytest_cache
