#!/bin/sh
# Issue 3 benchmarks (restart latency, footprint) with their anchors from the same run.
# Usage: bench/supervisor.sh [all|restart|footprint] [--runs N] [--seconds S] ...
# Needs runit, supervisor and prometheus-node-exporter installed (see BENCHMARKS.md).
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p razar-agent --bin razar-agent
exec python3 bench/supervisor.py --agent target/release/razar-agent "$@"
