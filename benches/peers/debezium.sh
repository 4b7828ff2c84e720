#!/usr/bin/env bash
# Debezium for the side-by-side benchmark (benches/peers.rs), without Docker:
# its embedded engine, PostgreSQL connector and their dependencies come from
# Maven Central through the pinned POM beside this script, copied into a
# cache outside the repository.
#
#   benches/peers/debezium.sh fetch   resolve the jars (once; later calls reuse them)
#   benches/peers/debezium.sh libs    print the jar directory (fails if not fetched)
#
# BENCH_DEBEZIUM_LIBS overrides the directory; XDG_CACHE_HOME moves the cache.
set -euo pipefail
cd "$(dirname "$0")/debezium"

version="$(sed -n 's:.*<debezium.version>\(.*\)</debezium.version>.*:\1:p' pom.xml)"
libs="${BENCH_DEBEZIUM_LIBS:-${XDG_CACHE_HOME:-$HOME/.cache}/consign/debezium-$version/libs}"

case "${1:-}" in
    fetch)
        if [ -f "$libs/.complete" ]; then
            echo "Debezium $version jars already in $libs"
            exit 0
        fi
        echo "resolving Debezium $version and its dependencies into $libs"
        partial="$libs.partial.$$"
        trap 'rm -rf "$partial"' EXIT
        mvn -q -B -f pom.xml dependency:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$partial"
        touch "$partial/.complete"
        mkdir -p "$(dirname "$libs")"
        rm -rf "$libs"
        mv "$partial" "$libs"
        trap - EXIT
        echo "Debezium $version: $(ls "$libs" | wc -l) jars in $libs"
        ;;
    libs)
        [ -f "$libs/.complete" ] || { echo "Debezium jars not fetched; run benches/peers/debezium.sh fetch" >&2; exit 1; }
        echo "$libs"
        ;;
    *)
        echo "usage: benches/peers/debezium.sh fetch|libs" >&2
        exit 2
        ;;
esac
