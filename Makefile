# SphereDB developer entry points. `make demo` and `make test` work on a fresh machine:
# they install the one system package the build needs (libclang, for RocksDB's bindings).

CARGO ?= cargo

.PHONY: deps demo test lint build bench-compare idle-ranges jepsen-deps jepsen-ci jepsen-long

deps:
	@./scripts/install-deps.sh

build: deps
	$(CARGO) build --bin spheredb

demo: build
	$(CARGO) run --quiet --bin spheredb -- demo

# The workspace tests include the Jepsen tester's own tests (jepsen/tests/tester.rs), which
# partition clusters with iptables.
test: deps jepsen-deps
	./scripts/test-install-deps.sh
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

# 1,000 ranges on a 3-node cluster (999 splits), then the nodes' CPU while they idle.
# Release build (a debug build spends several times the CPU per Raft message); minutes
# long; prints "IDLE CPU ..." with the numbers.
idle-ranges: deps
	$(CARGO) test --release -p spheredb-engine --test ranges thousand_idle_ranges_report_idle_cpu -- --ignored --nocapture

jepsen-deps:
	@./scripts/install-jepsen-deps.sh

# Short fault-injection check (about 75 s): register and set workloads on a 3-node
# cluster of the debug build under kill and partition faults. Needs root (iptables).
# Run folders go to jepsen/store/.
jepsen-ci: deps jepsen-deps
	$(CARGO) build --bin spheredb --bin spheredb-jepsen
	./target/debug/spheredb-jepsen test --bin target/debug/spheredb --workload register \
		--nemesis kill,partition --time-limit 30 --quiet-ms 2000 --fault-ms 3000 --seed 1
	./target/debug/spheredb-jepsen test --bin target/debug/spheredb --workload set \
		--nemesis kill,partition --time-limit 30 --quiet-ms 2000 --fault-ms 3000 --seed 1

# Long run (about 12 minutes): every fault, clock skew included (libfaketime), on 5 nodes.
jepsen-long: deps
	@./scripts/install-jepsen-deps.sh --clock
	$(CARGO) build --bin spheredb --bin spheredb-jepsen
	./target/debug/spheredb-jepsen test --bin target/debug/spheredb --workload register \
		--nemesis all --nodes 5 --time-limit 300 --concurrency 10 --seed 2
	./target/debug/spheredb-jepsen test --bin target/debug/spheredb --workload set \
		--nemesis all --nodes 5 --time-limit 300 --concurrency 10 --seed 2
