#!/usr/bin/env bash
# Backhaul hop: what an edge + QUIC + egress pair adds over `switchyard dev`
# (every role in one process) in front of the same mock upstream, on loopback.
#
#   bash benches/backhaul.sh                 # builds; ROUNDS=3 DURATION=5
#   SKIP_BUILD=1 CARGO_TARGET_DIR=... bash benches/backhaul.sh
#
# Three targets, measured in alternation (ROUNDS times, so that drift in the
# machine's load hits all of them alike), with wrk and benches/chat.lua on a
# small non-streaming chat completion:
#   direct   wrk -> mock
#   dev      wrk -> switchyard dev -> mock
#   fleet    wrk -> switchyard edge ==QUIC==> switchyard egress -> mock
# At c=1 it reports p50/p99 and the latency each gateway adds over direct;
# at c=16, throughput and CPU per request (edge and egress summed). The
# issue's targets: the fleet adds at most 0.15 ms over dev at c=1, and keeps
# at least 80 % of dev's throughput at c=16.
#
# Placement: wrk and the mock on core 0, the gateway process(es) on core 1
# (PIN=0 lets every process float instead). Edge and egress share core 1, as
# dev's roles share it: per core, the comparison is like for like.
#
# Environment (all optional):
#   DURATION=5 ROUNDS=3 CONNS_LOW=1 CONNS_HIGH=16 GW_THREADS=1 PIN=1
#   CARGO_TARGET_DIR=/tmp/bench-target, SKIP_BUILD=1   as in run.sh
#   OUT=benches/results/backhaul-latest.md

set -euo pipefail
LOG_TAG=backhaul
# shellcheck source=benches/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
HERE=$BENCH_HERE
ROOT=$BENCH_ROOT
cd "$ROOT"

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNS_LOW=${CONNS_LOW:-1}
CONNS_HIGH=${CONNS_HIGH:-16}
GW_THREADS=${GW_THREADS:-1}
PIN=${PIN:-1}
OUT=${OUT:-$HERE/results/backhaul-latest.md}
KEY="sy-bench-key-0123456789"
MODEL=openai/gpt-4o-mini

need_wrk
for t in python3 curl; do command -v "$t" >/dev/null 2>&1 || die "$t is required"; done
build_binaries

if [ "$PIN" = 1 ] && command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
    CLIENT_PIN="taskset -c 0"
    GW_PIN="taskset -c 1"
else
    CLIENT_PIN=""
    GW_PIN=""
fi
MOCK_PIN=$CLIENT_PIN

start_work_dir backhaul
read -r MOCK_PORT DEV_PORT DEV_TLS DEV_METRICS EDGE_PORT EDGE_METRICS EGRESS_PORT < <(free_ports 7)
start_mock "$MOCK_PORT" 1

# dev: the embedded default, one process.
start_switchyard "$DEV_PORT" "$DEV_TLS" "$DEV_METRICS" "$GW_THREADS" "$MOCK_PORT"
DEV_PID=$GW_PID

# fleet: an egress next to the "provider" and an edge dialing it over QUIC,
# with backhaul certificates scoped to their role and region.
fleet_setup "$WORK" "$MOCK_PORT" "$KEY"
PKI=$WORK/pki
COMMON_ENV=(env -u ANTHROPIC_API_KEY -u ANTHROPIC_BASE_URL -u GEMINI_API_KEY -u GEMINI_BASE_URL
    -u SWITCHYARD_LOG -u SWITCHYARD_LOG_FORMAT -u SWITCHYARD_DEV_KEY)
"${COMMON_ENV[@]}" OPENAI_API_KEY=sk-bench $GW_PIN "$GW_BIN" egress --region us \
    --listen "127.0.0.1:$EGRESS_PORT" --config "$WORK/fleet.yaml" --state-dir "$WORK/egress" \
    --cert "$PKI/egress.pem" --key "$PKI/egress-key.pem" --ca "$PKI/ca.pem" \
    --threads "$GW_THREADS" --log-format json >"$WORK/egress.stdout" 2>"$WORK/egress.log" &
EGRESS_PID=$!
PIDS+=("$EGRESS_PID")
"${COMMON_ENV[@]}" $GW_PIN "$GW_BIN" edge --region us \
    --listen "127.0.0.1:$EDGE_PORT" --config "$WORK/fleet.yaml" --state-dir "$WORK/edge" \
    --cert "$PKI/edge.pem" --key "$PKI/edge-key.pem" --ca "$PKI/ca.pem" \
    --egress "us=127.0.0.1:$EGRESS_PORT" --admin-listen "127.0.0.1:$EDGE_METRICS" \
    --threads "$GW_THREADS" --log-format json >"$WORK/edge.stdout" 2>"$WORK/edge.log" &
EDGE_PID=$!
PIDS+=("$EDGE_PID")

wait_ready "switchyard dev" "$DEV_PID" "$DEV_PORT" "$MODEL" "$KEY" 30 "$WORK/gateway.log"
wait_ready "switchyard edge" "$EDGE_PID" "$EDGE_PORT" "$MODEL" "$KEY" 30 "$WORK/edge.log"
kill -0 "$EGRESS_PID" 2>/dev/null || { tail -20 "$WORK/egress.log" >&2; die "the egress exited"; }

# run TAG PORT CONNS PIDS...: one wrk run; appends its BENCH line plus the
# CPU ticks the given processes used during it.
run() {
    local tag=$1 port=$2 conns=$3
    shift 3
    local pids=("$@") before=0 after=0 p
    for p in "${pids[@]}"; do before=$((before + $(cpu_ticks "$p"))); done
    BENCH_TAG="$tag" BENCH_MODEL="$MODEL" BENCH_KEY="$KEY" BENCH_STREAM=0 \
        $CLIENT_PIN wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 10s --latency -s "$HERE/chat.lua" \
        "http://127.0.0.1:$port" >"$WORK/wrk.txt" 2>&1 || { cat "$WORK/wrk.txt" >&2; die "wrk failed"; }
    for p in "${pids[@]}"; do after=$((after + $(cpu_ticks "$p"))); done
    echo "$(grep -h '^BENCH ' "$WORK/wrk.txt") conns=$conns cpu_ticks=$((after - before))" >>"$WORK/results.txt"
}

# Warm every path (connections, pools, the QUIC connection).
for port in "$MOCK_PORT" "$DEV_PORT" "$EDGE_PORT"; do
    BENCH_MODEL="$MODEL" BENCH_KEY="$KEY" wrk -t1 -c4 -d1s -s "$HERE/chat.lua" "http://127.0.0.1:$port" >/dev/null 2>&1
done
: >"$WORK/results.txt"
for round in $(seq 1 "$ROUNDS"); do
    log "round $round of $ROUNDS (${DURATION}s per run)"
    for conns in "$CONNS_LOW" "$CONNS_HIGH"; do
        run direct "$MOCK_PORT" "$conns" "$MOCK_PID"
        run dev "$DEV_PORT" "$conns" "$DEV_PID"
        run fleet "$EDGE_PORT" "$conns" "$EDGE_PID" "$EGRESS_PID"
    done
done

mkdir -p "$(dirname "$OUT")"
RAW="$(cat "$WORK/results.txt")" CLK_TCK="$CLK_TCK" LOW="$CONNS_LOW" HIGH="$CONNS_HIGH" \
DATE="$(date -u '+%Y-%m-%d %H:%M:%S UTC')" MACHINE="$(machine_line)" COMMIT="$(commit_line)" BINARY="$(binary_line)" \
SETTINGS="DURATION=${DURATION}s per run, ROUNDS=$ROUNDS, --threads $GW_THREADS, $([ -n "$GW_PIN" ] && echo 'wrk and mock on core 0, gateway process(es) on core 1' || echo 'unpinned')" \
LOAD="$(cut -d' ' -f1-3 /proc/loadavg)" python3 - >"$WORK/report.md" <<'PY'
import os, statistics as st
e = os.environ
low, high, tck = int(e["LOW"]), int(e["HIGH"]), float(e["CLK_TCK"])
rows = {}
for line in e["RAW"].splitlines():
    kv = dict(x.split("=", 1) for x in line.split()[1:] if "=" in x)
    key = (kv["tag"], int(kv["conns"]))
    rows.setdefault(key, []).append(kv)
def med(tag, conns, f):
    return st.median(f(r) for r in rows[(tag, conns)])
def rps(r): return int(r["requests"]) / (int(r["duration_us"]) / 1e6)
def cpu_us(r): return int(r["cpu_ticks"]) / tck * 1e6 / max(1, int(r["requests"]))
def errs(r): return sum(int(r[k]) for k in ("err_connect", "err_read", "err_write", "err_timeout", "err_status"))
o = ["## Backhaul hop: edge + QUIC + egress against `switchyard dev`", "",
     "- Date: %s; commit %s" % (e["DATE"], e["COMMIT"]),
     "- Machine: %s; load average at the end %s" % (e["MACHINE"], e["LOAD"]),
     "- Binary: %s" % e["BINARY"],
     "- Settings: %s; medians over the rounds" % e["SETTINGS"], "",
     "| Target | c=%d p50 (ms) | c=%d p99 (ms) | added p50 over direct (ms) | c=%d req/s | c=%d p99 (ms) | gateway CPU per request, c=%d (µs) | errors |" % (low, low, high, high, high),
     "|---|---:|---:|---:|---:|---:|---:|---:|"]
direct_p50 = med("direct", low, lambda r: int(r["p50_us"]))
for tag in ("direct", "dev", "fleet"):
    p50 = med(tag, low, lambda r: int(r["p50_us"]))
    o.append("| %s | %.3f | %.3f | %s | %.0f | %.3f | %s | %d |" % (
        tag, p50 / 1000, med(tag, low, lambda r: int(r["p99_us"])) / 1000,
        "—" if tag == "direct" else "+%.3f" % ((p50 - direct_p50) / 1000),
        med(tag, high, rps), med(tag, high, lambda r: int(r["p99_us"])) / 1000,
        "%.0f" % med(tag, high, cpu_us) if tag != "direct" else "(mock) %.0f" % med(tag, high, cpu_us),
        sum(errs(r) for c in (low, high) for r in rows[(tag, c)])))
dev_p50 = med("dev", low, lambda r: int(r["p50_us"]))
fleet_p50 = med("fleet", low, lambda r: int(r["p50_us"]))
ratio = med("fleet", high, rps) / med("dev", high, rps)
hop = (fleet_p50 - dev_p50) / 1000
o += ["",
      "Edge + QUIC + egress over dev: **%+.3f ms at c=%d p50** (target ≤ 0.15 ms: %s); "
      "**%.0f %% of dev's throughput at c=%d** (target ≥ 80 %%: %s)." % (
          hop, low, "holds" if hop <= 0.15 else "does not hold",
          ratio * 100, high, "holds" if ratio >= 0.8 else "does not hold"),
      "",
      "Per round (c=%d p50 µs / c=%d req/s): %s" % (low, high, "; ".join(
          "%s %s" % (tag, ", ".join("%s/%.0f" % (a["p50_us"], rps(b)) for a, b in zip(rows[(tag, low)], rows[(tag, high)])))
          for tag in ("direct", "dev", "fleet")))]
print("\n".join(o))
PY
cp "$WORK/report.md" "$OUT"
cat "$WORK/report.md"
log "saved to ${OUT#"$ROOT"/}"
