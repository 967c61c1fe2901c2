# SphereDB developer entry points. `make demo` and `make test` work on a fresh machine:
# they install the one system package the build needs (libclang, for RocksDB's bindings).

CARGO ?= cargo

.PHONY: deps demo test lint build sql-test-deps test-tester bench-compare bench-transfers bench-sql bench-feed idle-ranges jepsen-deps jepsen-ci jepsen-long

deps:
	@./scripts/install-deps.sh

build: deps
	$(CARGO) build --bin spheredb

demo: build
	$(CARGO) run --quiet --bin spheredb -- demo

# The workspace tests include the Jepsen tester's own tests (jepsen/tests/tester.rs), which
# partition clusters with iptables, and the SQL tests, which drive psql and psycopg.
test: deps jepsen-deps sql-test-deps
	./scripts/test-install-deps.sh
	$(CARGO) test --workspace

sql-test-deps:
	@./scripts/install-sql-test-deps.sh

# Every test of the Jepsen tester itself, including those `make test` leaves to the `ci`
# suite (about 12 minutes; root for iptables).
test-tester: deps jepsen-deps
	$(CARGO) test --workspace --test tester -- --include-ignored

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Side-by-side comparison with etcd in release mode (the first release build takes about
# 30 minutes on 2 cores; the runs about 20). Results go to bench-results/. The README's
# performance section comes from exactly these commands.
bench-compare: deps
	@./benches/install-etcd.sh
	$(CARGO) build --release --bin spheredb --bin spheredb-bench
	./target/release/spheredb-bench compare --workload kv0 --clients 1,16,64,256 --pairs 2 --duration-secs 10 --out-dir bench-results/kv0
	./target/release/spheredb-bench compare --workload kv0 --clients 256 --rates 2000,5000 --systems spheredb,spheredb-1range,etcd --pairs 2 --duration-secs 10 --out-dir bench-results/kv0-open-loop
	./target/release/spheredb-bench compare --workload ycsb-c --clients 64 --pairs 2 --duration-secs 10 --read-consistency linearizable --out-dir bench-results/reads-linearizable

# Transfers in transactions (one range: one-phase commit; two ranges: two phases) against
# PostgreSQL 15 on the same machine, 1/16/64 clients, ABBA pairs (about 10 minutes after
# the release build). Results go to bench-results/transfers/.
bench-transfers: deps
	@./benches/install-postgres.sh
	$(CARGO) build --release --bin spheredb --bin spheredb-bench
	./target/release/spheredb-bench transfers --clients 1,16,64 --pairs 2 --duration-secs 10 --out-dir bench-results/transfers

# SQL against PostgreSQL 15 over the PostgreSQL wire protocol: point selects, single-row
# inserts and upserts, and pgbench's TPC-B-like transaction at 1/16/64 clients, ABBA pairs
# (about 20 minutes after the release build). Results go to bench-results/sql/.
bench-sql: deps
	@./benches/install-postgres.sh
	$(CARGO) build --release --bin spheredb --bin spheredb-bench
	./target/release/spheredb-bench sql --clients 1,16,64 --pairs 2 --duration-secs 10 --out-dir bench-results/sql

# Change feeds against etcd watch (release build; about 15 minutes of runs): delivery latency
# for one subscriber at 1k and 5k writes/s and for 1,000 subscribers on 1,000 spheres,
# catch-up speed, and kv0 throughput with and without a feed following. Results go to
# bench-results/feed/.
bench-feed: deps
	@./benches/install-etcd.sh
	$(CARGO) build --release --bin spheredb --bin spheredb-bench
	./target/release/spheredb-bench feed --pairs 2 --out-dir bench-results/feed

# 1,000 ranges on a 3-node cluster (999 splits), then the nodes' CPU while they idle.
# Release build (a debug build spends several times the CPU per Raft message); minutes
# long; prints "IDLE CPU ..." with the numbers.
idle-ranges: deps
	$(CARGO) test --release -p spheredb-engine --test ranges thousand_idle_ranges_report_idle_cpu -- --ignored --nocapture

jepsen-deps:
	@./scripts/install-jepsen-deps.sh

# The Jepsen tester's `ci` suite (about 5 minutes): register and set under kill and
# partition faults (register with slow-apply too, and once with churn and clock-rate), scan
# under churn, kill and partition,
# lease reads under clock-rate, kill-majority, partition and slow-apply, on 3 and 5 nodes of
# the debug build. Needs root (iptables)
# and libfaketime. `cargo test --workspace` builds the binaries with the failpoints compiled
# in (inactive unless asked for), as the tester's own tests need; a plain build would
# rebuild them without. Run folders go to jepsen/store/.
jepsen-ci: deps jepsen-deps
	$(CARGO) build --workspace --all-targets
	./target/debug/spheredb-jepsen suite ci --bin target/debug/spheredb

# The `long` suite (about 20 minutes): every nemesis on 5 nodes, 180 s per run.
jepsen-long: deps jepsen-deps
	$(CARGO) build --workspace --all-targets
	./target/debug/spheredb-jepsen suite long --bin target/debug/spheredb
