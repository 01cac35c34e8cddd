#!/usr/bin/env bash
# What the `metrics` feature costs a cache hit (issue 26's targets): `cache_bench` get_hit at 1
# and 2 threads, built without the feature and with it (plain get_hit: no recorder;
# get_hit+prometheus: a Prometheus recorder), the two builds alternating RUNS times against
# one server, in interleaved rounds; medians over every round of each configuration.
#
#   DATABASE_URL=postgres://... benches/metrics_overhead.sh [RUNS=6] [SECONDS=2]
#
# SECONDS is each job's time per run (two rounds). One server for every run: set DATABASE_URL
# (the schema cache_bench is dropped and recreated); a throwaway server per run would add
# its own noise.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?set DATABASE_URL to one server for every run}"
runs=${1:-6}
seconds=${2:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo build --quiet --release --example cache_bench
cp target/release/examples/cache_bench "$out/off"
cargo build --quiet --release --features metrics --example cache_bench
cp target/release/examples/cache_bench "$out/on"
common=(--methods get_hit --threads 1,2 --seconds "$seconds" --rounds 2 --reaper-rows 0 --format json)
off() { "$out/off" "${common[@]}" >"$out/off.$1.json" 2>/dev/null; }
on() { "$out/on" "${common[@]}" --recorder prometheus >"$out/on.$1.json" 2>/dev/null; }
for run in $(seq "$runs"); do
    # Alternate which build goes first, so that drift on a shared machine hits both alike.
    if ((run % 2)); then off "$run"; on "$run"; else on "$run"; off "$run"; fi
    echo "run $run of $runs done" >&2
done
python3 - "$out" <<'PY'
import glob, json, statistics, sys
rounds = {}
for path in glob.glob(f"{sys.argv[1]}/*.json"):
    build = "off" if "/off." in path else "on"
    for row in json.load(open(path)):
        config = {"off": "feature off", "on": "on, no recorder"}[build]
        if row["method"] == "get_hit+prometheus":
            config = "on, Prometheus recorder"
        rounds.setdefault((row["threads"], config), []).extend(row["rounds"])
print(f"{'threads':>7}  {'configuration':<24} {'rounds':>6} {'median ops/s':>12} {'vs off':>8}")
for threads in sorted({t for t, _ in rounds}):
    base = statistics.median(rounds[(threads, "feature off")])
    for config in ["feature off", "on, no recorder", "on, Prometheus recorder"]:
        r = rounds.get((threads, config), [])
        m = statistics.median(r)
        print(f"{threads:>7}  {config:<24} {len(r):>6} {m:>12.0f} {100 * (base / m - 1):>+7.1f}%")
print("vs off: extra time per hit (off's median ops/s over this one's, minus 1)")
PY
