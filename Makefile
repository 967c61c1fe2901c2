# SphereDB developer entry points. `make demo` and `make test` work on a fresh machine:
# they install the one system package the build needs (libclang, for RocksDB's bindings).

CARGO ?= cargo

.PHONY: deps demo test lint build bench-compare

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

# Side-by-side comparison with etcd in release mode (the first release build takes about
# 20 minutes on 2 cores; the runs about 10). Results go to bench-results/.
bench-compare: deps
	@./benches/install-etcd.sh
	$(CARGO) build --release --bin spheredb --bin spheredb-bench
	./target/release/spheredb-bench compare --workload kv0 --clients 1,16,64,256 --pairs 3 --duration-secs 5 --out-dir bench-results/kv0
	./target/release/spheredb-bench compare --workload ycsb-c --clients 64 --pairs 3 --duration-secs 5 --read-consistency linearizable --out-dir bench-results/reads-linearizable
	./target/release/spheredb-bench compare --workload ycsb-c --clients 64 --pairs 3 --duration-secs 5 --read-consistency lease --out-dir bench-results/reads-lease
