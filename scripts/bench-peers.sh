#!/usr/bin/env bash
# consign side by side with Debezium (benches/peers.rs), one command on a
# fresh clone: PostgreSQL with wal_level = logical (scripts/services.sh),
# Apache Kafka's jars, Debezium's jars (both from Maven Central), then the
# benchmark, which starts a 1-node Kafka, runs both systems on the same
# work and prints one table. About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh postgres kafka
./benches/peers/debezium.sh fetch
export TEST_KAFKA_LIBS="${TEST_KAFKA_LIBS:-$(./scripts/kafka.sh libs)}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
cargo build --release --locked -p consign-cli --bin consign-relay
export TEST_RELAY_BIN="$PWD/target/release/consign-relay"
exec cargo bench --locked --bench peers
