# The two commands a newcomer runs: `make run` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
# The hot path compiled in place (setup.py, pgproxy/hotpath.py), after any change to the package.
COMPILED := $(VENV)/.compiled
APT_PACKAGES := postgresql postgresql-client
NODE_DRIVERS := tests/drivers/node
NODE_STAMP := $(NODE_DRIVERS)/node_modules/.package-lock.json
export DEBIAN_FRONTEND := noninteractive

.PHONY: run test lint typecheck unit e2e bench setup compile compiler system-packages other-drivers \
	pgbouncer jemalloc clean

run: setup compile
	$(PY) -m pgproxy.demo

test: setup other-drivers jemalloc compile
	$(PY) -m ruff format --check pgproxy tests bench setup.py
	$(PY) -m ruff check pgproxy tests bench setup.py
	$(PY) -m mypy pgproxy bench
	PGPROXY_EXPECT_COMPILED=1 $(PY) -m pytest -q

lint: setup
	$(PY) -m ruff format --check pgproxy tests bench setup.py
	$(PY) -m ruff check pgproxy tests bench setup.py

typecheck: setup
	$(PY) -m mypy pgproxy bench

unit: setup compile
	$(PY) -m pytest -q tests/unit

e2e: setup other-drivers jemalloc compile
	$(PY) -m pytest -q tests/e2e

# The issue's whole matrix (~55 min on 2 cores): writes bench/RESULTS.md and bench/results.png.
bench: setup pgbouncer jemalloc compile
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) bench/run.py --all

setup: system-packages $(STAMP)

$(STAMP):
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "pgproxy needs Python 3.11+"'
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || $(call apt_install,python3-venv)
	rm -f $(VENV)/.installed-*
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	# Interpreted here; `make compile` builds the hot path in place, again after each change.
	PGPROXY_COMPILE=0 $(PY) -m pip install -q -e '.[dev]'
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

# The drivers of tests/e2e/test_other_drivers.py that do not come from PyPI: the PostgreSQL JDBC
# driver from Debian (and a JDK only when javac is missing), node-postgres from the lock file when
# node and npm are here. Each test is skipped, with the reason, when its runtime is missing.
other-drivers:
	@if [ -f /usr/share/java/postgresql.jar ] && command -v javac >/dev/null; then :; \
	elif command -v javac >/dev/null; then \
	    $(call apt_install,libpostgresql-jdbc-java,the JDBC tests are skipped); \
	else \
	    $(call apt_install,libpostgresql-jdbc-java default-jdk-headless,the JDBC tests are skipped); \
	fi
	@if ! command -v npm >/dev/null; then \
	    echo "no node/npm: the node-postgres tests are skipped"; \
	elif [ ! $(NODE_STAMP) -nt $(NODE_DRIVERS)/package-lock.json ]; then \
	    echo "installing node-postgres in $(NODE_DRIVERS) with npm ci"; \
	    cd $(NODE_DRIVERS) && npm ci --no-audit --no-fund --loglevel=error; \
	fi

# mypyc's C output, compiled in place beside the sources (`*.so`, ignored by git). Tests and
# the bench run what the container image runs; a stale build is refused by the tests.
compile: setup compiler $(COMPILED)

$(COMPILED): $(STAMP) setup.py $(wildcard pgproxy/*.py pgproxy/*/*.py)
	PGPROXY_COMPILE=1 $(PY) setup.py -q build_ext --inplace --force -j 2
	touch $@

# A C compiler and the headers of the Python the virtualenv runs, for mypyc.
compiler:
	@command -v gcc >/dev/null || $(call apt_install,gcc libc6-dev)
	@$(PYTHON) -c 'import pathlib, sys, sysconfig; \
	    sys.exit(not pathlib.Path(sysconfig.get_paths()["include"], "Python.h").exists())' \
	    || $(call apt_install,python3-dev)

pgbouncer:
	@command -v pgbouncer >/dev/null || ls /usr/sbin/pgbouncer >/dev/null 2>&1 \
	    || $(call apt_install,pgbouncer)

# The allocator the container image preloads (README, Memory): the image test runs pgproxy with
# it, and the bench runs pgproxy as the image does.
jemalloc:
	@ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1 \
	    || $(call apt_install,libjemalloc2,the image test and the bench run pgproxy on pymalloc)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info
	find pgproxy -name '*.so' -delete
	rm -f pgproxy__mypyc.*.so

# apt-get install as root; otherwise say exactly what to run, and stop unless the second
# argument says what is lost without the packages (then it is only a note).
define apt_install
	if [ "$$(id -u)" = 0 ]; then \
	    echo "installing $(strip $(1)) with apt-get"; \
	    apt-get update -qq && apt-get install -y -qq -o Dpkg::Options::=--force-confold $(1) >/dev/null; \
	else \
	    echo "missing system packages; run:  sudo apt-get install -y $(strip $(1))   and retry"; \
	    $(if $(2),echo "  (until then $(2))",exit 1); \
	fi
endef
