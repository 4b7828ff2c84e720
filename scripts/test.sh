#!/usr/bin/env bash
# Prepares what consign's tests need and runs them all:
#   1. services (scripts/services.sh): PostgreSQL on 127.0.0.1:5432 and MariaDB
#      on 127.0.0.1:3306, installed from Debian's packages and started when
#      missing; Apache Kafka's jars from
#      Maven Central (the tests start real brokers from them),
#   2. the consign-relay binary and the test consumer the crash tests kill,
#   3. fmt and clippy checks, every test and doctest on both broker tiers
#      (librdkafka's mock cluster and real Kafka), the examples as smoke tests.
# Set TEST_KAFKA_BROKERS=host:port to run the mock tier's tests against another
# broker instead (see DEVELOPERS.md).
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

step() { printf '\n==> %s\n' "$*"; }

./scripts/services.sh postgres mariadb kafka
TEST_KAFKA_LIBS="$(./scripts/kafka.sh libs)"
# The tier was just installed: a test that cannot reach it fails, never skips.
export TEST_KAFKA_LIBS TEST_KAFKA_REQUIRED=1

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# What a service embedding the relay or the inbox compiles: none of the
# binary's dependencies (they are consign-cli's).
for library in consign-relay consign-inbox; do
    if cargo tree -p "$library" -e normal --locked \
        | grep -E '^[^a-z]*(clap|figment|axum|metrics-exporter-prometheus) '; then
        echo "error: $library depends on the binary's crates (above)" >&2
        exit 1
    fi
done

step "the relay library alone (PostgreSQL only): other backends' URLs name their feature"
cargo test --locked -p consign-relay --lib config::

step "build the binaries the crash tests start and kill"
cargo build --locked -p consign-cli --bin consign-relay
cargo build --locked -p consign-test-support --bin consign-test-consumer
export TEST_RELAY_BIN="$PWD/target/debug/consign-relay"
export TEST_CONSUMER_BIN="$PWD/target/debug/consign-test-consumer"

step "tests (mock cluster and real Kafka $(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' test-support/kafka/pom.xml))"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
mock=$(grep -cE '^test .*::mock \.\.\. ok$' "$log" || true)
shared=$(grep -cE '^test .*::kafka \.\.\. ok$' "$log" || true)
own=$(awk '/Running tests\/real_kafka.rs/ { on = 1 } on && /^test result:/ { print $4; exit }' "$log")
echo "broker tiers: $mock tests passed on the mock cluster; on real Kafka $((shared + ${own:-0})) ($shared shared bodies + ${own:-0} in tests/real_kafka.rs)"

step "examples"
# Each on its embedded default (no DATABASE_URL: a SQLite file), then on both
# servers.
for example in quickstart orders_inventory; do
    env -u DATABASE_URL cargo run --locked --example "$example"
    cargo run --locked --example "$example"
    DATABASE_URL="${MYSQL_URL:-mysql://consign:consign@127.0.0.1:3306/test}" \
        cargo run --locked --example "$example"
done

step "all passed"
