# Two commands set everything up on a fresh Debian machine: `make demo` and `make test`.
# Both install what they need (Debian packages, a virtualenv, the project in it) and can
# be run again without harm: each step is skipped when its stamp is newer than its inputs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMPS := build/stamps

# Prefect must not phone home or hang without internet.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_LOGGING_LEVEL ?= WARNING

DEBIAN_PACKAGES := golang-go golang-github-vmware-govmomi-dev chromium postgresql-15 prometheus \
                   python3-venv ca-certificates \
                   libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core poppler-utils

.PHONY: all deps test demo server bench lab-up lab-down clean

all: deps

$(STAMPS)/debian: Makefile
	@mkdir -p $(STAMPS)
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

$(STAMPS)/venv: pyproject.toml $(STAMPS)/debian
	@mkdir -p $(STAMPS)
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

include lab/launcher/build.mk
build/vcsim-lab: | $(STAMPS)/debian   # Go and govmomi's sources come from Debian

deps: $(STAMPS)/venv build/vcsim-lab

test: deps
	$(BIN)/ruff check vmrep tasks flows reports deployments lab tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -ra

demo: deps
	$(BIN)/python -m deployments.demo

server: deps
	$(BIN)/python -m deployments.serve

bench: deps
	$(BIN)/python bench/bench_replication.py
	$(BIN)/python bench/bench_recovery.py
	$(BIN)/python bench/bench_monitor.py

lab-up: deps
	$(BIN)/vmrep lab up

lab-down:
	$(BIN)/vmrep lab down

clean:
	rm -rf build .pytest_cache
