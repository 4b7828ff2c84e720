#!/usr/bin/env bash
# Apache Kafka for the real-broker test tier and benchmarks, without Docker:
# the broker's jars come from Maven Central through the pinned POM in
# test-support/kafka/pom.xml, copied into a cache outside the repository.
# The test harness (consign_test_support::KafkaCluster) formats storage and
# starts kafka.Kafka in KRaft mode from that directory.
#
#   scripts/kafka.sh fetch   resolve the jars (once; later calls reuse them)
#   scripts/kafka.sh libs    print the jar directory (fails if not fetched)
#
# TEST_KAFKA_LIBS overrides the directory; XDG_CACHE_HOME moves the cache.
set -euo pipefail
cd "$(dirname "$0")/.."

pom=test-support/kafka/pom.xml
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
libs="${TEST_KAFKA_LIBS:-${XDG_CACHE_HOME:-$HOME/.cache}/consign/kafka-$version/libs}"

case "${1:-}" in
    fetch)
        if [ -f "$libs/.complete" ]; then
            echo "Kafka $version jars already in $libs"
            exit 0
        fi
        echo "resolving Kafka $version and its dependencies into $libs"
        if [ -e "$libs" ] && [ -n "$(ls -A "$libs")" ]; then
            echo "error: $libs exists, is not empty and holds no finished copy (.complete); remove it or pick another TEST_KAFKA_LIBS" >&2
            exit 1
        fi
        partial="$libs.partial.$$"
        trap 'rm -rf "$partial"' EXIT
        mvn -q -B -f "$pom" dependency:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$partial"
        touch "$partial/.complete"
        mkdir -p "$(dirname "$libs")"
        rmdir "$libs" 2>/dev/null || true
        mv "$partial" "$libs"
        trap - EXIT
        echo "Kafka $version: $(ls "$libs" | wc -l) jars in $libs"
        ;;
    libs)
        [ -f "$libs/.complete" ] || { echo "Kafka jars not fetched; run scripts/kafka.sh fetch" >&2; exit 1; }
        echo "$libs"
        ;;
    *)
        echo "usage: scripts/kafka.sh fetch|libs" >&2
        exit 2
        ;;
esac
