# The two commands a newcomer runs: `make run` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
APT_PACKAGES := postgresql postgresql-client
export DEBIAN_FRONTEND := noninteractive

.PHONY: run test lint typecheck unit e2e bench setup system-packages pgbouncer clean

run: setup
	$(PY) -m pgproxy.demo

test: setup
	$(PY) -m ruff format --check pgproxy tests bench
	$(PY) -m ruff check pgproxy tests bench
	$(PY) -m mypy pgproxy
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff format --check pgproxy tests bench
	$(PY) -m ruff check pgproxy tests bench

typecheck: setup
	$(PY) -m mypy pgproxy

unit: setup
	$(PY) -m pytest -q tests/unit

e2e: setup
	$(PY) -m pytest -q tests/e2e

bench: setup pgbouncer
	$(PY) bench/run.py

setup: system-packages $(STAMP)

$(STAMP):
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "pgproxy needs Python 3.11+"'
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || $(call apt_install,python3-venv)
	rm -f $(VENV)/.installed-*
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# PostgreSQL's server binaries (initdb, postgres, pg_ctl, pgbench) and psql, for the throwaway
# clusters of `make run`, the tests and the bench. Debian installs them under
# /usr/lib/postgresql/<version>/bin; a main cluster is not wanted, so none is created.
system-packages:
	@if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && command -v psql >/dev/null \
	    || { [ -n "$$PG_BINDIR" ] && [ -x "$$PG_BINDIR/postgres" ]; }; then :; \
	else \
	    if [ "$$(id -u)" = 0 ]; then \
	        mkdir -p /etc/postgresql-common; \
	        grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf \
	            || echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf; \
	    fi; \
	    $(call apt_install,$(APT_PACKAGES)); \
	fi

pgbouncer:
	@command -v pgbouncer >/dev/null || ls /usr/sbin/pgbouncer >/dev/null 2>&1 \
	    || $(call apt_install,pgbouncer)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info

# apt-get install as root; otherwise say exactly what to run.
define apt_install
	if [ "$$(id -u)" = 0 ]; then \
	    echo "installing $(1) with apt-get"; \
	    apt-get update -qq && apt-get install -y -qq -o Dpkg::Options::=--force-confold $(1) >/dev/null; \
	else \
	    echo "missing system packages; run:  sudo apt-get install -y $(1)   and retry"; exit 1; \
	fi
endef
