# SphereDB developer entry points. `make demo` and `make test` work on a fresh machine:
# they install the one system package the build needs (libclang, for RocksDB's bindings).

CARGO ?= cargo

.PHONY: deps demo test lint build

deps:
	@./scripts/install-deps.sh

build: deps
	$(CARGO) build --bin spheredb

demo: build
	$(CARGO) run --quiet --bin spheredb -- demo

test: deps
	$(CARGO) test --workspace

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
