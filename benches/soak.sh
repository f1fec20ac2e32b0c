#!/usr/bin/env bash
# Soak: mixed chat and stream load through `switchyard dev` for DURATION
# seconds, sampling the gateway's RSS, to show whether memory stays flat.
#
#   bash benches/soak.sh                    # builds; DURATION=60, a quick try
#   DURATION=3600 bash benches/soak.sh      # the issue's hour
#
# Two wrk clients run in parallel with benches/chat.lua at modest rates
# (a pause before each request): non-streaming chat completions, and
# `"stream": true` ones (14 SSE events from the mock). The gateway's VmRSS
# is read every SAMPLE_EVERY seconds. Prints the series summary (start,
# after warm-up, min, max, end, least-squares slope per hour, a thinned
# series), says whether RSS stayed flat, saves it to
# benches/results/soak-latest.md, and exits non-zero if any request failed.
#
# Environment (all optional):
#   DURATION=60          seconds of load
#   SAMPLE_EVERY=5       seconds between RSS samples
#   WARMUP_FRAC=0.1      share of DURATION after which the reference RSS is
#                        taken (at least 10 s)
#   FLAT_PCT=10          "flat": end RSS within this % of the reference
#   CHAT_CONNS=8 CHAT_DELAY_MS=10       chat client: connections, pause per request
#   STREAM_CONNS=8 STREAM_DELAY_MS=20   stream client
#   MOCK_EVENT_GAP_MS=1  gap between the mock's events
#   GW_THREADS=2
#   GW_LOG=/dev/null     where the JSON access log goes (it is on; an hour
#                        of it is several GB, so it is not kept by default)
#   CARGO_TARGET_DIR=/tmp/bench-target, SKIP_BUILD=1   as in run.sh
#   OUT=benches/results/soak-latest.md

set -euo pipefail
LOG_TAG=soak
# shellcheck source=benches/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
HERE=$BENCH_HERE
ROOT=$BENCH_ROOT
cd "$ROOT"

DURATION=${DURATION:-60}
SAMPLE_EVERY=${SAMPLE_EVERY:-5}
WARMUP_FRAC=${WARMUP_FRAC:-0.1}
FLAT_PCT=${FLAT_PCT:-10}
CHAT_CONNS=${CHAT_CONNS:-8}
CHAT_DELAY_MS=${CHAT_DELAY_MS:-10}
STREAM_CONNS=${STREAM_CONNS:-8}
STREAM_DELAY_MS=${STREAM_DELAY_MS:-20}
MOCK_EVENT_GAP_MS=${MOCK_EVENT_GAP_MS:-1}
GW_THREADS=${GW_THREADS:-2}
OUT=${OUT:-$HERE/results/soak-latest.md}
KEY="sy-bench-key-0123456789"
MODEL=openai/gpt-4o-mini

need_wrk
for t in python3 curl; do command -v "$t" >/dev/null 2>&1 || die "$t is required"; done
build_binaries

start_work_dir soak
read -r MOCK_PORT GW_PORT GW_TLS_PORT GW_METRICS_PORT < <(free_ports 4)
start_mock "$MOCK_PORT" "$MOCK_EVENT_GAP_MS"
start_switchyard "$GW_PORT" "$GW_TLS_PORT" "$GW_METRICS_PORT" "$GW_THREADS" "$MOCK_PORT"
GW_LOG=${GW_LOG:-/dev/null}
wait_ready "switchyard" "$GW_PID" "$GW_PORT" "$MODEL" "$KEY" 30 "$WORK/gateway.log"
[ "$(post_status "$GW_PORT" "$MODEL" "$KEY" true)" = 200 ] && grep -q 'data: \[DONE\]' "$WORK/last-body" ||
    die "a streamed request did not complete"
# The gateway appends its access log to $WORK/gateway.log; with
# GW_LOG=/dev/null that file is emptied at every sample below.

IDLE=$(rss_kib "$GW_PID")
log "idle RSS $((IDLE / 1024)) MiB; ${DURATION}s of load: chat c=$CHAT_CONNS (pause ${CHAT_DELAY_MS} ms), stream c=$STREAM_CONNS (pause ${STREAM_DELAY_MS} ms)"

wrk_bg() { # $1 tag, $2 conns, $3 delay, $4 stream; sets WRK_PID
    BENCH_TAG="$1" BENCH_MODEL="$MODEL" BENCH_KEY="$KEY" BENCH_STREAM="$4" BENCH_DELAY_MS="$3" \
        wrk -t1 -c"$2" -d"${DURATION}s" --timeout 10s --latency -s "$HERE/chat.lua" \
        "http://127.0.0.1:$GW_PORT" >"$WORK/wrk-$1.txt" 2>&1 &
    WRK_PID=$!
    PIDS+=("$WRK_PID")
}
wrk_bg chat "$CHAT_CONNS" "$CHAT_DELAY_MS" 0
CHAT_WRK=$WRK_PID
wrk_bg stream "$STREAM_CONNS" "$STREAM_DELAY_MS" 1
STREAM_WRK=$WRK_PID

T0=$(date +%s%N)
C0=$(cpu_ticks "$GW_PID")
: >"$WORK/samples.txt"
while kill -0 "$CHAT_WRK" 2>/dev/null || kill -0 "$STREAM_WRK" 2>/dev/null; do
    kill -0 "$GW_PID" 2>/dev/null || die "the gateway died during the soak"
    echo "$(( ($(date +%s%N) - T0) / 1000000 )) $(rss_kib "$GW_PID")" >>"$WORK/samples.txt"
    # Keep the access log from filling the disk on long runs (it is written
    # all the same; only its content is dropped).
    [ "$GW_LOG" != /dev/null ] || : >"$WORK/gateway.log"
    sleep "$SAMPLE_EVERY"
done
wait "$CHAT_WRK" || true
wait "$STREAM_WRK" || true
C1=$(cpu_ticks "$GW_PID")
echo "$(( ($(date +%s%N) - T0) / 1000000 )) $(rss_kib "$GW_PID")" >>"$WORK/samples.txt"
[ "$GW_LOG" = /dev/null ] || cp "$WORK/gateway.log" "$GW_LOG"

log "checking streams still complete after the soak"
python3 "$HERE/ttfb.py" 20 "after:$GW_PORT:$MODEL:$KEY" >"$WORK/ttfb.txt" 2>"$WORK/ttfb.err" ||
    { cat "$WORK/ttfb.err" >&2; die "ttfb.py failed"; }

mkdir -p "$(dirname "$OUT")"
RAW="$(grep -h '^BENCH \|^TTFB ' "$WORK"/wrk-*.txt "$WORK/ttfb.txt")" SAMPLES="$(cat "$WORK/samples.txt")" \
DATE="$(date -u '+%Y-%m-%d %H:%M:%S UTC')" MACHINE="$(machine_line)" COMMIT="$(commit_line)" BINARY="$(binary_line)" \
DURATION="$DURATION" SAMPLE_EVERY="$SAMPLE_EVERY" WARMUP_FRAC="$WARMUP_FRAC" FLAT_PCT="$FLAT_PCT" \
IDLE="$IDLE" HWM="$(hwm_kib "$GW_PID")" CPU_TICKS=$((C1 - C0)) CLK_TCK="$CLK_TCK" GW_THREADS="$GW_THREADS" \
SETTINGS="chat c=$CHAT_CONNS pause ${CHAT_DELAY_MS} ms; stream c=$STREAM_CONNS pause ${STREAM_DELAY_MS} ms; mock event gap ${MOCK_EVENT_GAP_MS} ms" \
LOAD="$(cut -d' ' -f1-3 /proc/loadavg)" BAD_FILE="$WORK/bad.txt" python3 - >"$WORK/report.md" <<'PY'
import os
e = os.environ
pts = [tuple(map(float, l.split())) for l in e["SAMPLES"].splitlines() if l.strip()]
t = [p[0] / 1000 for p in pts]
r = [p[1] / 1024 for p in pts]  # MiB
runs = {}
for line in e["RAW"].splitlines():
    kv = dict(x.split("=", 1) for x in line.split()[1:] if "=" in x)
    runs[kv.get("tag")] = kv
warm_at = max(10.0, float(e["DURATION"]) * float(e["WARMUP_FRAC"]))
wi = next((i for i, x in enumerate(t) if x >= warm_at), len(t) - 1)
ref = r[wi]
post_t, post_r = t[wi:], r[wi:]
n = len(post_t)
if n >= 2:
    mt, mr = sum(post_t) / n, sum(post_r) / n
    var = sum((x - mt) ** 2 for x in post_t)
    slope = sum((x - mt) * (y - mr) for x, y in zip(post_t, post_r)) / var * 3600 if var else 0.0
else:
    slope = 0.0
end = r[-1]
flat_pct = float(e["FLAT_PCT"])
change = (end - ref) / ref * 100 if ref else 0
flat = abs(change) <= flat_pct

reqs = {k: int(float(v.get("requests", 0))) for k, v in runs.items() if k in ("chat", "stream")}
bad = []
errs = []
for k in ("chat", "stream"):
    v = runs.get(k, {})
    x = {f: int(float(v.get("err_" + f, 0))) for f in ("status", "connect", "read", "write", "timeout")}
    errs.append("| %s | %d | %.0f | %s / %s | %d | %d | %d | %d | %d |" % (
        k, reqs.get(k, 0), reqs.get(k, 0) / float(e["DURATION"]),
        "%.2f" % (float(v.get("p50_us", 0)) / 1000), "%.2f" % (float(v.get("p99_us", 0)) / 1000),
        x["status"], x["connect"], x["read"], x["write"], x["timeout"]))
    if any(x.values()) or not v:
        bad.append("%s: %s" % (k, x if v else "no result line"))
after = runs.get("after", {})
if int(float(after.get("failures", 1))) or int(float(after.get("n", 0))) == 0:
    bad.append("streams after the soak: %s failed" % after.get("failures", "?"))
total = sum(reqs.values())
cpu_us = float(e["CPU_TICKS"]) / float(e["CLK_TCK"]) * 1e6 / total if total else 0


step = max(1, len(r) // 12)
series = ", ".join("%.0fs %.1f" % (t[i], r[i]) for i in list(range(0, len(r), step)) + ([len(r) - 1] if (len(r) - 1) % step else []))

o = []
o.append("## Soak: gateway RSS under mixed chat and stream load")
o.append("")
o.append("- Date: %s; commit %s" % (e["DATE"], e["COMMIT"]))
o.append("- Machine: %s; load average at the end %s (shared with other sessions' builds)" % (e["MACHINE"], e["LOAD"]))
o.append("- Gateway binary: %s" % e["BINARY"])
o.append("- Settings: %s s of load; `switchyard dev --threads %s`, JSON access log on; %s; RSS sampled every %s s"
         % (e["DURATION"], e["GW_THREADS"], e["SETTINGS"], e["SAMPLE_EVERY"]))
o.append("")
o.append("| RSS (MiB) | Value |")
o.append("|---|---:|")
o.append("| idle, before the load | %.1f |" % (float(e["IDLE"]) / 1024))
o.append("| first sample under load | %.1f |" % r[0])
o.append("| after warm-up (t = %.0f s), the reference | %.1f |" % (t[wi], ref))
o.append("| min / max under load | %.1f / %.1f |" % (min(r), max(r)))
o.append("| end (t = %.0f s) | %.1f (%+.1f %% vs reference) |" % (t[-1], end, change))
o.append("| least-squares slope after warm-up | %+.2f MiB/hour |" % slope)
o.append("| peak (VmHWM) | %.1f |" % (float(e["HWM"]) / 1024))
# Requests served after the reference sample, assuming an even rate.
after_ref = total * (t[-1] - t[wi]) / t[-1] if t[-1] else 0
if after_ref:
    o.append("| growth after warm-up per request served | %+.0f bytes |" % ((end - ref) * 1048576 / after_ref))
o.append("")
o.append("**RSS %s**: end within ±%.0f %% of the value after warm-up → %s (%+.1f %%, slope %+.2f MiB/h)." % (
    "stayed flat" if flat else "did NOT stay flat", flat_pct, "holds" if flat else "does not hold", change, slope))
o.append("")
o.append("Series (t, MiB): %s" % series)
o.append("")
o.append("| Load | Requests | req/s | p50 / p99 (ms) | Non-2xx | Connect | Read | Write | Timeout |")
o.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
o.extend(errs)
o.append("")
o.append("Gateway CPU per request over the soak (chat and streams together): %.0f µs. After the soak, %s of %s "
         "sequential streams ended in `data: [DONE]`." % (cpu_us, after.get("n", "?"), int(after.get("n", 0) or 0) + int(after.get("failures", 0) or 0)))
print("\n".join(o))
with open(e["BAD_FILE"], "w") as f:
    for b in bad:
        f.write(b + "\n")
PY
cp "$WORK/report.md" "$OUT"
cat "$WORK/report.md"
log "saved to ${OUT#"$ROOT"/}"
if [ -s "$WORK/bad.txt" ]; then
    {
        echo
        echo "############################################################"
        echo "[soak] FAILED: some requests did not succeed:"
        sed 's/^/[soak]   /' "$WORK/bad.txt"
        echo "############################################################"
    } >&2
    exit 1
fi
