# rtmanager — developer and CI entry points. `make` (or `make help`) lists targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
# Debian's docker.io client matches the engine it talks to (API 1.41).
DOCKER ?= $(shell if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else echo docker; fi)

# `make test`: tests create their own databases from this admin URL.
test: export DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres
test: export RTM_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/%2f
test: export RTM_REDIS_URL ?= redis://127.0.0.1:6379

# `make bench`: the bench creates its own database from this admin URL.
bench bench-smoke soak: export DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres
bench bench-smoke soak: export RTM_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/%2f
bench bench-smoke soak: export RTM_REDIS_URL ?= redis://127.0.0.1:6379

# `make run`: a local service against the demo images.
run: export DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/rtmanager
run: export RTM_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/%2f
run: export RTM_REDIS_URL ?= redis://127.0.0.1:6379
run: export RTM_LOG_FORMAT ?= pretty
run: export RTM_STATE_ROOT ?= $(CURDIR)/.run/games

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "; printf "Usage: make \033[36m<target>\033[0m\n\nTargets:\n"} \
		/^[a-zA-Z0-9_-]+:.*## / { printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

.PHONY: deps
deps: ## Start (installing if needed) Docker, PostgreSQL, Redis and RabbitMQ on this host
	scripts/bootstrap.sh

.PHONY: images
images: ## Build the local engine images (rtm-test/*, rtm-demo/*); skips up-to-date tags
	scripts/images.sh

.PHONY: build
build: ## Build the release binary
	$(CARGO) build --release

# One scenario at a time: each brings up its own dependencies and workers.
FAULT_SUITE = env -u RUST_LOG $(CARGO) test --test faults -- --test-threads=1

.PHONY: test
test: deps images ## Run the whole suite: unit, contract, integration, then the fault suite (about 5 min)
	env -u RUST_LOG $(CARGO) test --lib --bins --test contract --test it
	$(FAULT_SUITE)

.PHONY: lint
lint: ## Check formatting and run clippy (warnings are errors)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

.PHONY: bench
bench: deps images ## Benchmark the release binary against its floors (under 10 min); prints the table, writes BENCH.md
	env -u RUST_LOG $(CARGO) bench --bench platform

.PHONY: bench-smoke
bench-smoke: deps images ## The bench with tiny counts (about a minute), table in target/bench-smoke.md (CI runs it)
	env -u RUST_LOG $(CARGO) bench --bench platform -- --smoke

.PHONY: soak
soak: deps images ## The bench with the 10-minute memory soak (BENCH_SOAK=600); writes BENCH.md
	env -u RUST_LOG BENCH_SOAK=600 $(CARGO) bench --bench platform

.PHONY: run
run: deps images ## Run the service locally (pretty logs, state under .run/games)
	mkdir -p "$$RTM_STATE_ROOT"
	$(CARGO) run --release -- serve

.PHONY: clean-docker
clean-docker: ## Remove every container labelled rtmanager.managed=true (and nothing else)
	@ids=$$($(DOCKER) ps -aq --filter label=rtmanager.managed=true); \
	if [ -n "$$ids" ]; then echo "removing $$(echo $$ids | wc -w) container(s)"; $(DOCKER) rm -f $$ids >/dev/null; \
	else echo "no rtmanager.managed=true containers"; fi

.PHONY: faults
faults: deps images ## Run the fault suite (worker processes killed, private dependencies restarted); writes FAULTS.md
	$(FAULT_SUITE)
