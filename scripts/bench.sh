#!/usr/bin/env bash
# Measures styxy-preload's figures side by side in one run and writes BENCHMARKS.md.
#   scripts/bench.sh           full run (about two minutes on 2 cores)
#   scripts/bench.sh --smoke   tiny run that checks the script works (CI); writes nothing
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=${1:-}
cargo build --release --workspace -q
cargo bench -q -p styxy-preload-daemon --bench allocate --no-run 2>/dev/null
alloc_bench=$(ls -t target/release/deps/allocate-* | grep -v '\.d$' | head -n 1)
tmp=$(mktemp -d /tmp/styxy-bench.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cc -O2 -o "$tmp/bindbench" scripts/bench/bindbench.c
cc -O2 -static -o "$tmp/bindbench-static" scripts/bench/bindbench.c
cc -O2 -o "$tmp/listener" scripts/bench/listener.c
cc -O2 -o "$tmp/onecall" scripts/bench/onecall.c
cc -O2 -o "$tmp/rtt" scripts/bench/rtt.c
cc -O2 -o "$tmp/binder" tests/fixtures/binder.c -lpthread
cc -O2 -o "$tmp/execbench" scripts/bench/execbench.c
cc -O2 -shared -fPIC -o "$tmp/empty.so" scripts/bench/empty.c
GO111MODULE=off GOFLAGS= GOTOOLCHAIN=local GOCACHE="$tmp/go-cache" go build -o "$tmp/gotrue" scripts/bench/gotrue.go
python3 scripts/bench/bench.py --tmp "$tmp" --bin target/release/styxy-preload --lib "$PWD/target/release/libstyxy_preload.so" \
  --allocate "$alloc_bench" ${smoke:+--smoke} --out BENCHMARKS.md
