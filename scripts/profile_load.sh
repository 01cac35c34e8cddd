#!/usr/bin/env bash
# Where a load's time goes, client and server: runs examples/load_profile (one load of
# METHOD, ROWS x DIM, on a throwaway server unless DATABASE_URL is set) under a system-wide
# `perf record`, started once the batch is ready, and prints the CPU seconds per process
# (the client, the PostgreSQL backends) and each one's top symbols.
#
#   scripts/profile_load.sh [copy|parallel_copy|replace|reload] [ROWS] [DIM]
#
# Needs perf and permission to record every CPU (root, or kernel.perf_event_paranoid <= -1).
set -euo pipefail
cd "$(dirname "$0")/.."
method=${1:-copy} rows=${2:-100000} dim=${3:-384}
cargo build --release --quiet --example load_profile
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkfifo "$work/in"
target/release/examples/load_profile "$method" "$rows" "$dim" <"$work/in" >"$work/out" &
client=$!
exec 3>"$work/in"
until grep -q ready "$work/out" 2>/dev/null; do sleep 0.2; done
perf record -a -g -F 999 -o "$work/perf.data" -- sleep 600 >/dev/null 2>&1 &
recorder=$!
sleep 1
echo >&3
until grep -q '^done' "$work/out" 2>/dev/null; do sleep 0.05; done
kill -INT "$recorder"
wait "$recorder" 2>/dev/null || true
exec 3>&-
wait "$client" || true
grep -E '^(rows|done)' "$work/out"
echo "== samples in all (999 Hz on every CPU: ~1 ms of CPU each), then per process"
perf report -i "$work/perf.data" --stdio 2>/dev/null | grep -m1 -E '^# (Samples|Total Lost|Event count)' || true
perf report -i "$work/perf.data" --stdio --header-only 2>/dev/null | grep -E 'sample_freq|duration' | head -3 || true
perf report -i "$work/perf.data" --no-children --sort comm --stdio 2>/dev/null \
    | grep -E '^ +[0-9]' | head -8
echo "== top symbols (process, library, symbol)"
perf report -i "$work/perf.data" --no-children -g none --sort comm,dso,symbol --stdio 2>/dev/null \
    | grep -E '^ +[0-9]' | head -30
