# medclear — every target does its own set-up (Debian packages, .venv, pinned install,
# generated protobuf code) and is quick when that is already done.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
GENERATED := medclear/v1/.generated
PROTOS := $(wildcard proto/medclear/v1/*.proto)
SMSC_DEPS := tests/support/smsc/node_modules/.installed
# Apache Kafka from Maven Central (kafka/pom.xml), every jar pinned by kafka/jars.sha256
KAFKA_DIR := .kafka
KAFKA_INSTALLED := $(KAFKA_DIR)/lib/.installed
KAFKA_CDS := $(KAFKA_DIR)/kafka.jsa
MVN := mvn -B -q --strict-checksums -Dmaven.repo.local=$(abspath $(KAFKA_DIR)/m2) -f kafka/pom.xml

.PHONY: setup demo test test-unit lint typecheck proto lock kafka-lock clean help bench
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: $(INSTALLED) $(GENERATED) $(SMSC_DEPS) $(KAFKA_CDS)  ## apt packages, .venv, pinned install, generated code, SMSC (npm ci), Apache Kafka (Maven)

# the broker's jars, resolved by Maven (checksums checked against Maven Central's), then
# each checked against the committed list: a jar that differs stops the install
$(KAFKA_INSTALLED): kafka/pom.xml kafka/jars.sha256 .system-packages.stamp
	@echo "medclear setup: Apache Kafka from Maven Central (kafka/pom.xml)"
	rm -rf $(KAFKA_DIR)/lib
	$(MVN) dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(abspath $(KAFKA_DIR)/lib)
	cd $(KAFKA_DIR)/lib && sha256sum --quiet --strict -c ../../kafka/jars.sha256
	test "$$(ls $(KAFKA_DIR)/lib/*.jar | wc -l)" -eq "$$(wc -l < kafka/jars.sha256)"
	@touch $@

# the classes a broker loads, archived once (AppCDS): every start of a node is ~2 s quicker
$(KAFKA_CDS): $(KAFKA_INSTALLED) $(INSTALLED) $(GENERATED)
	$(BIN)/medclear kafka class-archive

kafka-lock: .system-packages.stamp  ## after changing kafka/pom.xml: resolve it, rewrite kafka/jars.sha256
	rm -rf $(KAFKA_DIR)/lib
	$(MVN) dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(abspath $(KAFKA_DIR)/lib)
	cd $(KAFKA_DIR)/lib && sha256sum *.jar | sort -k2 > ../../kafka/jars.sha256
	@touch $(KAFKA_INSTALLED)

# the loopback SMSC of the tests and the embedded stack (npm `smpp`, pinned by its lock file)
$(SMSC_DEPS): tests/support/smsc/package.json tests/support/smsc/package-lock.json
	cd tests/support/smsc && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

.system-packages.stamp: scripts/setup-system.sh
	scripts/setup-system.sh
	@touch $@

$(INSTALLED): pyproject.toml requirements.lock .system-packages.stamp
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip==26.3
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	@touch $@

$(GENERATED): $(INSTALLED) $(PROTOS) scripts/gen_protos.py
	$(BIN)/python scripts/gen_protos.py

proto: $(INSTALLED)  ## regenerate the Python code from proto/ (never edited by hand)
	$(BIN)/python scripts/gen_protos.py

DEMO_FLAGS ?=
demo: setup  ## the main job: the whole stack with simulated POS traffic (DEMO_FLAGS="--agents" …)
	$(BIN)/medclear demo $(DEMO_FLAGS)

test: setup  ## the whole test suite (unit + integration on real servers)
	$(BIN)/pytest

test-unit: setup  ## pure-core tests only
	$(BIN)/pytest tests/unit

lint: setup  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup  ## mypy, strict
	$(BIN)/mypy

lock: $(INSTALLED)  ## rewrite requirements.lock from the installed venv
	{ echo '# Exact versions of every package medclear installs (direct and transitive), used as pip -c.'; \
	  echo '# Regenerate: make lock'; \
	  $(BIN)/python -m pip freeze --exclude-editable | sort -f; } > requirements.lock

clean:  ## remove the venv, the broker's jars and generated code (keeps .medclear state)
	rm -rf $(VENV) medclear/v1 .system-packages.stamp $(KAFKA_DIR)

bench: setup  ## benchmarks (minutes): CLI start-up; seeding 100,000 and down; HSM added latency; full vs null pipeline, open loop, scaling; 100,000 hostile requests; transactions; broker drills on 3 brokers
	$(BIN)/medclear bench startup
	$(BIN)/medclear bench seed --persons 100000
	$(BIN)/medclear bench run --persons 1000 --swipes 2000 --concurrency 1,64
	$(BIN)/medclear bench pipeline
	$(BIN)/medclear bench fuzz --fresh --requests 100000
	$(BIN)/medclear bench transactions --brokers 1
	$(BIN)/medclear bench transactions --brokers 3
	$(BIN)/medclear drill broker-kill --fresh --brokers 3
	$(BIN)/medclear drill broker-outage --fresh --brokers 3 --seconds 60
	$(BIN)/medclear drill kill-loop --fresh --times 20
