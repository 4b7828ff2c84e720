#!/usr/bin/env bash
# Prepares what consign's tests need and runs them all:
#   1. PostgreSQL on 127.0.0.1:5432 (started if this machine has a stopped cluster),
#   2. the consign-relay binary the process tests start and kill,
#   3. fmt and clippy checks, every test and doctest, the quickstart as a smoke test.
# Kafka needs nothing: the tests host librdkafka's mock cluster in process.
# Set TEST_KAFKA_BROKERS=host:port to also run the end-to-end tests against an
# external broker (see DEVELOPERS.md).
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

step() { printf '\n==> %s\n' "$*"; }

step "PostgreSQL"
if ! pg_isready -q -d "$DATABASE_URL" 2>/dev/null; then
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        echo "not accepting connections; starting the local cluster"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
    fi
    for _ in $(seq 1 30); do
        pg_isready -q -d "$DATABASE_URL" && break
        sleep 1
    done
fi
pg_isready -d "$DATABASE_URL" || { echo "error: PostgreSQL at $DATABASE_URL is not reachable" >&2; exit 1; }

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build the binaries the crash tests start and kill"
cargo build --locked -p consign-relay --bin consign-relay
cargo build --locked -p consign-test-support --bin consign-test-consumer
export TEST_RELAY_BIN="$PWD/target/debug/consign-relay"
export TEST_CONSUMER_BIN="$PWD/target/debug/consign-test-consumer"

step "tests"
cargo test --workspace --locked

step "examples"
cargo run --locked --example quickstart
cargo run --locked --example orders_inventory

step "all passed"
