#!/usr/bin/env bash
# Switchyard overhead benchmark: the same client load sent directly to the
# mock provider and through the gateway (`switchyard dev`) in front of it, in
# one run, so the two can be compared on the same (noisy) machine.
#
#   bash benches/run.sh            # full run, ~1 min with DURATION=10
#   DURATION=3 bash benches/run.sh # quick run
#
# Prints a markdown table and saves it to benches/results/latest.md.
# Exits non-zero if any request failed (non-2xx, socket error, bad stream).
# See benches/README.md for what is measured and how to read it.
#
# Environment (all optional):
#   DURATION=10          seconds per measured wrk run
#   WARMUP=2             seconds of warm-up load per target before measuring
#   CONNS=64             connections for the saturation run
#   WRK_THREADS=2        wrk threads for the saturation run
#   GW_THREADS=2         gateway worker threads (--threads)
#   TTFB_N=200           streamed requests per target for the TTFB measurement
#   MOCK_EVENT_GAP_MS=1  delay between the mock's replayed SSE events
#   GW_LOG=<file>        where the gateway's JSON access log goes (default: a
#                        temp file, used to double-check statuses)
#   CARGO_TARGET_DIR=/tmp/bench-target   where the release binaries are built
#   TARGET_ADDED_P99_US=100              the c=1 added-p99 target to check
#   SKIP_BUILD=1         do not run cargo build; use the binaries already built

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
cd "$ROOT"

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
WRK_THREADS=${WRK_THREADS:-2}
GW_THREADS=${GW_THREADS:-2}
TTFB_N=${TTFB_N:-200}
MOCK_EVENT_GAP_MS=${MOCK_EVENT_GAP_MS:-1}
TARGET_ADDED_P99_US=${TARGET_ADDED_P99_US:-100}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/bench-target}

KEY="sy-bench-key-0123456789"
GW_MODEL="openai/gpt-4o-mini"
DIRECT_MODEL="gpt-4o-mini"   # what a client talking to OpenAI itself would send

log() { echo "[bench] $*" >&2; }
die() { echo "[bench] ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- tools ----
if ! command -v wrk >/dev/null 2>&1; then
    log "wrk not found; installing it with apt-get"
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq wrk >/dev/null
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo apt-get update -qq && sudo apt-get install -y -qq wrk >/dev/null
    else
        die "wrk is not installed and neither root nor passwordless sudo is available"
    fi
fi
for t in python3 curl cargo; do
    command -v "$t" >/dev/null 2>&1 || die "$t is required"
done

# ---------------------------------------------------------------- build ----
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    log "SKIP_BUILD=1: using the binaries already in $CARGO_TARGET_DIR/release"
else
    log "building release binaries (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    cargo build --release -p switchyard -p switchyard-testkit >&2
fi
GW_BIN="$CARGO_TARGET_DIR/release/switchyard"
MOCK_BIN="$CARGO_TARGET_DIR/release/mock-upstream"
[ -x "$GW_BIN" ] || die "missing $GW_BIN"
[ -x "$MOCK_BIN" ] || die "missing $MOCK_BIN"

# ------------------------------------------------------------ processes ----
WORK=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Three distinct free ports, chosen by the kernel.
read -r MOCK_PORT GW_PORT GW_TLS_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks:
    s.close()
')

GW_LOG=${GW_LOG:-$WORK/gateway.log}
: > "$WORK/policy.yaml"   # empty policy: env providers + simulated

log "starting mock upstream on 127.0.0.1:$MOCK_PORT"
MOCK_EVENT_GAP_MS=$MOCK_EVENT_GAP_MS "$MOCK_BIN" "127.0.0.1:$MOCK_PORT" \
    >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!
PIDS+=("$MOCK_PID")

log "starting gateway on 127.0.0.1:$GW_PORT (threads=$GW_THREADS)"
env -u ANTHROPIC_API_KEY -u ANTHROPIC_BASE_URL -u GEMINI_API_KEY -u GEMINI_BASE_URL \
    -u SWITCHYARD_LOG -u SWITCHYARD_LOG_FORMAT \
    SWITCHYARD_DEV_KEY="$KEY" \
    OPENAI_API_KEY=x \
    OPENAI_BASE_URL="http://127.0.0.1:$MOCK_PORT/v1" \
    "$GW_BIN" dev \
        --listen "127.0.0.1:$GW_PORT" \
        --tls-listen "127.0.0.1:$GW_TLS_PORT" \
        --config "$WORK/policy.yaml" \
        --state-dir "$WORK/state" \
        --threads "$GW_THREADS" \
        --log-format json \
    >"$WORK/gateway.stdout" 2>"$GW_LOG" &
GW_PID=$!
PIDS+=("$GW_PID")

chat_body() { # $1 model, $2 stream (true/false)
    printf '{"model":"%s","messages":[{"role":"user","content":"hi"}],"stream":%s}' "$1" "$2"
}
post() { # $1 port, $2 model, $3 stream -> writes body to stdout, status to $WORK/status
    curl -sS -o - -w '%{http_code}' --max-time 10 \
        -H 'content-type: application/json' -H "authorization: Bearer $KEY" \
        -d "$(chat_body "$2" "$3")" "http://127.0.0.1:$1/v1/chat/completions"
}

log "waiting for both to accept requests"
ready=""
for _ in $(seq 1 300); do
    kill -0 "$MOCK_PID" 2>/dev/null || { cat "$WORK/mock.log" >&2; die "mock upstream exited"; }
    kill -0 "$GW_PID" 2>/dev/null || { tail -20 "$GW_LOG" >&2; die "gateway exited"; }
    if curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:$GW_PORT/health" &&
       [ "$(post "$MOCK_PORT" "$DIRECT_MODEL" false 2>/dev/null | tail -c 3)" = 200 ]; then
        ready=1
        break
    fi
    sleep 0.1
done
[ -n "$ready" ] || die "processes did not become ready within 30 s"

# Sanity: both paths answer 200 with a chat completion / a complete stream.
check() { # $1 label, $2 port, $3 model, $4 stream, $5 must-contain
    local out status
    out=$(post "$2" "$3" "$4") || die "$1: request failed"
    status=${out: -3}
    out=${out%???}
    [ "$status" = 200 ] || die "$1: HTTP $status: ${out:0:300}"
    case "$out" in
        *"$5"*) ;;
        *) die "$1: unexpected body: ${out:0:300}" ;;
    esac
}
check "direct non-stream" "$MOCK_PORT" "$DIRECT_MODEL" false '"chat.completion"'
check "gateway non-stream" "$GW_PORT" "$GW_MODEL" false '"chat.completion"'
check "direct stream" "$MOCK_PORT" "$DIRECT_MODEL" true 'data: [DONE]'
check "gateway stream" "$GW_PORT" "$GW_MODEL" true 'data: [DONE]'
log "sanity checks passed"

# ---------------------------------------------------------- measurement ----
declare -A R   # R[tag.key] = value, from the BENCH / TTFB lines

parse_line() { # $1 = line "PREFIX tag=T k=v k=v ..."
    local tag="" kv
    for kv in $1; do
        case "$kv" in
            tag=*) tag=${kv#tag=} ;;
            *=*) R["$tag.${kv%%=*}"]=${kv#*=} ;;
        esac
    done
}

run_wrk() { # $1 tag, $2 port, $3 model, $4 threads, $5 conns, $6 seconds
    local out="$WORK/wrk-$1.txt" line
    BENCH_TAG="$1" BENCH_MODEL="$3" BENCH_KEY="$KEY" \
        wrk -t"$4" -c"$5" -d"$6s" --timeout 5s --latency -s "$HERE/chat.lua" \
        "http://127.0.0.1:$2" >"$out" 2>&1 || { cat "$out" >&2; die "wrk failed ($1)"; }
    line=$(grep '^BENCH ' "$out") || { cat "$out" >&2; die "no result line from wrk ($1)"; }
    echo "$line" >>"$WORK/raw.txt"
    parse_line "$line"
}

cpu_ticks() { # utime + stime of a process, in clock ticks
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
CLK_TCK=$(getconf CLK_TCK)
# Busy and total jiffies of the whole machine (all CPUs), from /proc/stat.
machine_jiffies() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat; }
# CPU seconds of this shell's finished children (wrk, python, curl), in ticks.
children_ticks() {
    times | awk -v tck="$CLK_TCK" 'NR == 2 {
        split($1, u, /[ms]/); split($2, s, /[ms]/)
        printf "%d\n", ((u[1] * 60 + u[2]) + (s[1] * 60 + s[2])) * tck }'
}

GW_RSS_IDLE=$(rss_kib "$GW_PID")

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
read -r BUSY0 TOTAL0 < <(machine_jiffies)
OURS0=$(( $(cpu_ticks "$GW_PID") + $(cpu_ticks "$MOCK_PID") + $(children_ticks) ))

log "warm-up: ${WARMUP}s per target at c=$CONNS"
run_wrk warm-direct "$MOCK_PORT" "$DIRECT_MODEL" "$WRK_THREADS" "$CONNS" "$WARMUP"
run_wrk warm-gateway "$GW_PORT" "$GW_MODEL" "$WRK_THREADS" "$CONNS" "$WARMUP"

log "saturation: c=$CONNS -t$WRK_THREADS ${DURATION}s, direct"
m0=$(cpu_ticks "$MOCK_PID")
run_wrk sat-direct "$MOCK_PORT" "$DIRECT_MODEL" "$WRK_THREADS" "$CONNS" "$DURATION"
m1=$(cpu_ticks "$MOCK_PID")

log "saturation: c=$CONNS -t$WRK_THREADS ${DURATION}s, gateway"
g0=$(cpu_ticks "$GW_PID"); n0=$(cpu_ticks "$MOCK_PID")
run_wrk sat-gateway "$GW_PORT" "$GW_MODEL" "$WRK_THREADS" "$CONNS" "$DURATION"
g1=$(cpu_ticks "$GW_PID"); n1=$(cpu_ticks "$MOCK_PID")
GW_RSS_SAT=$(rss_kib "$GW_PID")

log "single connection: c=1 ${DURATION}s, direct"
run_wrk c1-direct "$MOCK_PORT" "$DIRECT_MODEL" 1 1 "$DURATION"
log "single connection: c=1 ${DURATION}s, gateway"
c1g0=$(cpu_ticks "$GW_PID")
run_wrk c1-gateway "$GW_PORT" "$GW_MODEL" 1 1 "$DURATION"
c1g1=$(cpu_ticks "$GW_PID")

log "streaming TTFB: $TTFB_N sequential requests per target (alternating)"
python3 "$HERE/ttfb.py" "$TTFB_N" "$MOCK_PORT" "$DIRECT_MODEL" "$GW_PORT" "$GW_MODEL" "$KEY" \
    >"$WORK/ttfb.txt" 2>"$WORK/ttfb.err" || { cat "$WORK/ttfb.err" >&2; die "ttfb.py failed"; }
cat "$WORK/ttfb.err" >&2
while read -r line; do
    case "$line" in TTFB\ *) echo "$line" >>"$WORK/raw.txt"; parse_line "$line" ;; esac
done <"$WORK/ttfb.txt"

read -r BUSY1 TOTAL1 < <(machine_jiffies)
OURS1=$(( $(cpu_ticks "$GW_PID") + $(cpu_ticks "$MOCK_PID") + $(children_ticks) ))
NCPU=$(nproc)
# Average number of cores busy over the measurement, and the part of it that
# was not this benchmark (other users of the shared machine).
read -r CORES_BUSY CORES_OTHER < <(awk -v b=$((BUSY1 - BUSY0)) -v t=$((TOTAL1 - TOTAL0)) \
    -v o=$((OURS1 - OURS0)) -v n="$NCPU" 'BEGIN {
        busy = t ? n * b / t : 0; other = t ? n * (b - o) / t : 0
        if (other < 0) other = 0
        printf "%.2f %.2f\n", busy, other }')

GW_RSS_END=$(rss_kib "$GW_PID"); GW_HWM=$(hwm_kib "$GW_PID")
MOCK_RSS_END=$(rss_kib "$MOCK_PID")
kill -0 "$GW_PID" 2>/dev/null || die "gateway died during the run"

# ---------------------------------------------------------------- report ----
# Non-2xx statuses in the gateway's own access log (every line has "status").
# 499 "client_gone" lines are expected: wrk closes its connections with
# requests in flight when each run ends (at most one per connection per run).
GW_LOG_LINES=0; GW_LOG_NON2XX=0; GW_LOG_499=0
if [ -f "$GW_LOG" ]; then
    GW_LOG_LINES=$(grep -c '"switchyard::access"' "$GW_LOG" || true)
    GW_LOG_499=$(grep '"switchyard::access"' "$GW_LOG" | grep -c '"status":499' || true)
    GW_LOG_NON2XX=$(grep '"switchyard::access"' "$GW_LOG" | grep -v '"status":2[0-9][0-9]' |
        grep -vc '"status":499' || true)
fi
GW_LOG_499_MAX=$(( 3 * CONNS + 2 ))  # warm-up, saturation and c=1 runs against the gateway

export R_DUMP
R_DUMP=$(for k in "${!R[@]}"; do echo "$k=${R[$k]}"; done)
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    COMMIT="$COMMIT (+ uncommitted changes)"
fi

RESULT_MD="$HERE/results/latest.md"
mkdir -p "$HERE/results"

NPROC=$(nproc) CPU_MODEL="$CPU_MODEL" DATE="$(date -u '+%Y-%m-%d %H:%M:%S UTC')" \
KERNEL="$(uname -r)" COMMIT="$COMMIT" \
DURATION="$DURATION" CONNS="$CONNS" WRK_THREADS="$WRK_THREADS" GW_THREADS="$GW_THREADS" \
TTFB_N="$TTFB_N" GAP="$MOCK_EVENT_GAP_MS" CLK_TCK="$CLK_TCK" TARGET="$TARGET_ADDED_P99_US" \
GW_CPU_TICKS=$((g1 - g0)) GW_C1_CPU_TICKS=$((c1g1 - c1g0)) \
MOCK_CPU_DIRECT=$((m1 - m0)) MOCK_CPU_GW=$((n1 - n0)) \
GW_RSS_IDLE="$GW_RSS_IDLE" GW_RSS_SAT="$GW_RSS_SAT" GW_RSS_END="$GW_RSS_END" GW_HWM="$GW_HWM" \
MOCK_RSS_END="$MOCK_RSS_END" GW_LOG_LINES="$GW_LOG_LINES" GW_LOG_NON2XX="$GW_LOG_NON2XX" \
GW_LOG_499="$GW_LOG_499" GW_LOG_499_MAX="$GW_LOG_499_MAX" LOAD_BEFORE="$LOAD_BEFORE" \
CORES_BUSY="$CORES_BUSY" CORES_OTHER="$CORES_OTHER" \
RAW="$(cat "$WORK/raw.txt")" BAD_FILE="$WORK/bad.txt" \
python3 - >"$WORK/report.md" <<'PY'
import os

e = os.environ
R = {}
for line in e["R_DUMP"].splitlines():
    k, _, v = line.partition("=")
    R[k] = v

def num(key):
    return float(R.get(key, "0"))

def rps(tag):
    d = num(tag + ".duration_us")
    return num(tag + ".requests") / (d / 1e6) if d else 0.0

def errs(tag):
    return {k: int(num(tag + ".err_" + k)) for k in ("connect", "read", "write", "timeout", "status")}

tck = float(e["CLK_TCK"])
def cpu_us_per_req(ticks, tag):
    n = num(tag + ".requests")
    return float(ticks) * 1e6 / tck / n if n else 0.0

rows = []
def row(name, d, g, diff=None, ratio=None, fmt="{:,.0f}"):
    f = lambda x: "—" if x is None else (fmt.format(x) if isinstance(x, float) else str(x))
    rows.append("| %s | %s | %s | %s | %s |" % (
        name, f(d), f(g),
        "—" if diff is None else ("{:+,.0f}".format(diff)),
        "—" if ratio is None else "{:.2f}×".format(ratio)))

sd, sg = rps("sat-direct"), rps("sat-gateway")
c = e["CONNS"]
row("Throughput, c=%s (req/s)" % c, sd, sg, None, sg / sd if sd else None)
c1d, c1g = rps("c1-direct"), rps("c1-gateway")
row("Throughput, c=1 (req/s)", c1d, c1g, None, c1g / c1d if c1d else None)
for conc, tag in (("1", "c1"), (c, "sat")):
    for p in ("p50", "p99"):
        d, g = num("%s-direct.%s_us" % (tag, p)), num("%s-gateway.%s_us" % (tag, p))
        row("Latency c=%s %s (µs)" % (conc, p), d, g, g - d, g / d if d else None)
for p in ("p50", "p99"):
    d, g = num("direct.first_%s_us" % p), num("gateway.first_%s_us" % p)
    row("Stream TTFB (first SSE event) %s (µs)" % p, d, g, g - d, g / d if d else None)
for p in ("p50", "p99"):
    d, g = num("direct.total_%s_us" % p), num("gateway.total_%s_us" % p)
    row("Stream complete %s (µs)" % p, d, g, g - d, g / d if d else None)
gw_cpu = cpu_us_per_req(e["GW_CPU_TICKS"], "sat-gateway")
row("Gateway CPU per request, c=%s (µs)" % c, None, gw_cpu)
row("Gateway CPU per request, c=1 (µs)", None, cpu_us_per_req(e["GW_C1_CPU_TICKS"], "c1-gateway"))
md, mg = cpu_us_per_req(e["MOCK_CPU_DIRECT"], "sat-direct"), cpu_us_per_req(e["MOCK_CPU_GW"], "sat-gateway")
row("Mock CPU per request, c=%s (µs)" % c, md, mg)
mib = lambda k: float(e[k]) / 1024
rows.append("| Gateway RSS idle → after c=%s run → end, peak (MiB) | — | %.1f → %.1f → %.1f, peak %.1f | — | — |" % (
    c, mib("GW_RSS_IDLE"), mib("GW_RSS_SAT"), mib("GW_RSS_END"), mib("GW_HWM")))
rows.append("| Mock RSS at end (MiB) | %.1f | (same process) | — | — |" % mib("MOCK_RSS_END"))

added_p99 = num("c1-gateway.p99_us") - num("c1-direct.p99_us")
added_p50 = num("c1-gateway.p50_us") - num("c1-direct.p50_us")
target = float(e["TARGET"])
other = float(e["CORES_OTHER"])
# A p99 difference only means something when the direct p99 itself is not
# dominated by other processes taking the CPU (scheduler slices are ms long).
noisy = other > 0.25 or num("c1-direct.p99_us") > 1000
if added_p50 > target:
    verdict = "DOES NOT HOLD (even the added p50 is above it)"
elif noisy:
    verdict = ("INCONCLUSIVE: the machine was busy (%.2f cores used by other processes, direct p99 %d µs); "
               "rerun on a quiet machine" % (other, num("c1-direct.p99_us")))
else:
    verdict = "HOLDS" if added_p99 <= target else "DOES NOT HOLD"

tags = ["warm-direct", "warm-gateway", "sat-direct", "sat-gateway", "c1-direct", "c1-gateway"]
err_lines = []
for t in tags:
    x = errs(t)
    err_lines.append("| %s | %d | %s | %d | %d | %d | %d |" % (
        t, int(num(t + ".requests")), x["status"], x["connect"], x["read"], x["write"], x["timeout"]))
for t in ("direct", "gateway"):
    err_lines.append("| ttfb-%s | %d | %d (failed streams) | — | — | — | — |" % (
        t, int(num(t + ".n")), int(num(t + ".failures"))))

out = []
out.append("## Switchyard gateway overhead: direct to mock vs through `switchyard dev`")
out.append("")
out.append("- Date: %s; commit %s" % (e["DATE"], e["COMMIT"]))
out.append("- Machine: nproc=%s, CPU: %s, kernel %s" % (e["NPROC"], e["CPU_MODEL"], e["KERNEL"]))
out.append("- Machine load: load average %s before the first measurement; during the measurements "
           "%s of %s cores were busy on average, **%s cores' worth by processes outside this benchmark**"
           % (e["LOAD_BEFORE"], e["CORES_BUSY"], e["NPROC"], e["CORES_OTHER"]))
out.append("- Settings: %ss per wrk run; saturation `wrk -t%s -c%s`; c=1 `wrk -t1 -c1`; gateway `--threads %s`, "
           "JSON access log on; mock SSE event gap %s ms; TTFB over %s streamed requests per target"
           % (e["DURATION"], e["WRK_THREADS"], c, e["GW_THREADS"], e["GAP"], e["TTFB_N"]))
out.append("- wrk, the mock, the gateway and the TTFB client all share these cores: compare the two columns "
           "of one run, not absolute numbers across runs.")
out.append("")
out.append("| Metric | Direct (mock) | Through gateway | Gateway − direct | Gateway / direct |")
out.append("|---|---:|---:|---:|---:|")
out.extend(rows)
out.append("")
out.append("**Target: added p99 latency at c=1 ≤ %d µs → %s** (measured: added p99 %+.0f µs, added p50 %+.0f µs)." % (
    target, verdict, added_p99, added_p50))
out.append("")
out.append("Errors per run (wrk counts status ≥ 400 as non-2xx; socket errors by kind):")
out.append("")
out.append("| Run | Requests | Non-2xx | Connect | Read | Write | Timeout |")
out.append("|---|---:|---:|---:|---:|---:|---:|")
out.extend(err_lines)
out.append("")
out.append("Gateway access log: %s lines; %s with a non-2xx status other than 499; %s × 499 client_gone "
           "(expected: wrk closes connections with requests in flight when a run ends; at most %s)."
           % (e["GW_LOG_LINES"], e["GW_LOG_NON2XX"], e["GW_LOG_499"], e["GW_LOG_499_MAX"]))
out.append("")
out.append("<details><summary>Raw result lines</summary>")
out.append("")
out.append("```")
out.append(e["RAW"])
out.append("```")
out.append("</details>")
print("\n".join(out))

bad = []
for t in tags:
    x = errs(t)
    if any(x.values()):
        bad.append("%s: %s" % (t, ", ".join("%s=%d" % kv for kv in x.items() if kv[1])))
for t in ("direct", "gateway"):
    if num(t + ".failures") or num(t + ".n") == 0:
        bad.append("ttfb-%s: %d failed streams of %d" % (t, num(t + ".failures"), num(t + ".n")))
if int(e["GW_LOG_NON2XX"]):
    bad.append("gateway access log: %s non-2xx lines (not counting 499)" % e["GW_LOG_NON2XX"])
if int(e["GW_LOG_499"]) > int(e["GW_LOG_499_MAX"]):
    bad.append("gateway access log: %s × 499, more than the %s that ends of runs explain"
               % (e["GW_LOG_499"], e["GW_LOG_499_MAX"]))
with open(e["BAD_FILE"], "w") as f:
    for b in bad:
        f.write(b + "\n")
PY

cp "$WORK/report.md" "$RESULT_MD"
cat "$WORK/report.md"
log "table saved to ${RESULT_MD#"$ROOT"/}"

# Fail loudly if any request went wrong, on either side.
if [ -s "$WORK/bad.txt" ]; then
    {
        echo
        echo "############################################################"
        echo "[bench] FAILED: some requests did not succeed:"
        sed 's/^/[bench]   /' "$WORK/bad.txt"
        echo "[bench] last gateway log lines with a non-2xx status:"
        grep '"switchyard::access"' "$GW_LOG" 2>/dev/null | grep -v '"status":2[0-9][0-9]' |
            grep -v '"status":499' | tail -5 || true
        echo "############################################################"
    } >&2
    exit 1
fi
