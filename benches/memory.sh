#!/usr/bin/env bash
# Gateway memory: idle, per open stream, after a burst of streams, and per
# half-open connection (plus when the header-read timeout closes those).
#
#   bash benches/memory.sh                  # builds; 2,000 streams, ~2 min
#   STREAMS=10000 bash benches/memory.sh    # the issue's figure
#
# Starts the mock with slow SSE events (MOCK_EVENT_GAP_MS, 2 s: a 14-event
# stream lasts ~26 s, long enough for all of them to be open at once) and
# `switchyard dev` in front of it; benches/memory_client.py (Python standard
# library) holds the streams and connections and reads the gateway's RSS.
# Prints a table, saves it to benches/results/memory-latest.md and says
# whether the targets hold (≤ 30 KB per open stream, ≤ 2× idle RSS after the
# burst). Exits non-zero if any stream failed.
#
# Environment (all optional):
#   STREAMS=2000         concurrent slow streams
#   MOCK_EVENT_GAP_MS=2000   gap between the mock's 14 events (4000 above 3,000 streams)
#   HALF_OPEN=3000       half-open connections (partial request head, then silence)
#   HALF_OPEN_WAIT=40    seconds to watch them for the gateway closing them
#   PER_IP_PROBE=300     connections from one address, to see the per-IP cap act (0: skip)
#   SETTLE=10            quiet seconds before the idle reading and the first after-burst one
#   SETTLE_LONG=30       seconds after the burst for the reading the 2x-idle target is judged on
#   GW_THREADS=2         gateway worker threads
#   GW_ARGS=""           extra `switchyard dev` arguments (e.g. --header-timeout-ms 5000)
#   PROVIDER=http1       how the gateway reaches the mock: `http1` (plain HTTP/1.1,
#                        one upstream connection per open stream) or `h2-tls`
#                        (behind the testkit's tls-relay offering HTTP/2 by ALPN,
#                        as OpenAI, Anthropic and Google answer: streams share
#                        one connection)
#   TARGET_KB_PER_STREAM=30 TARGET_IDLE_RATIO=2
#   CARGO_TARGET_DIR=/tmp/bench-target, SKIP_BUILD=1   as in run.sh
#   OUT=benches/results/memory-latest.md

set -euo pipefail
LOG_TAG=memory
# shellcheck source=benches/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
HERE=$BENCH_HERE
ROOT=$BENCH_ROOT
cd "$ROOT"

export STREAMS=${STREAMS:-2000}   # 0: only the half-open steps, on a fresh process
export HALF_OPEN=${HALF_OPEN:-3000}
export HALF_OPEN_WAIT=${HALF_OPEN_WAIT:-40}
export PER_IP_PROBE=${PER_IP_PROBE:-300}
export SETTLE=${SETTLE:-10}
export SETTLE_LONG=${SETTLE_LONG:-30}
# Streams must outlast the opening of all of them (~2.4 s per 1,000 here).
MOCK_EVENT_GAP_MS=${MOCK_EVENT_GAP_MS:-$(( STREAMS > 3000 ? 4000 : 2000 ))}
GW_THREADS=${GW_THREADS:-2}
TARGET_KB_PER_STREAM=${TARGET_KB_PER_STREAM:-30}
TARGET_IDLE_RATIO=${TARGET_IDLE_RATIO:-2}
PROVIDER=${PROVIDER:-http1}
case "$PROVIDER" in http1 | h2-tls) ;; *) die "PROVIDER is http1 or h2-tls, not $PROVIDER" ;; esac
OUT=${OUT:-$HERE/results/memory-latest.md}
KEY="sy-bench-key-0123456789"

for t in python3 curl; do command -v "$t" >/dev/null 2>&1 || die "$t is required"; done
build_binaries

# Every open stream is two sockets in the gateway (client and upstream), one
# in the client and one in the mock; the half-open step comes after the
# streams are gone. Raise the open-file limit to fit (raising the hard limit
# needs root with CAP_SYS_RESOURCE; some containers cap it, e.g. at 20,000,
# which holds at most ~9,900 streams).
# Over HTTP/2 the open streams share one upstream connection: one socket each.
PER_STREAM=$([ "$PROVIDER" = h2-tls ] && echo 1 || echo 2)
BIG=$(( PER_STREAM * STREAMS > HALF_OPEN + PER_IP_PROBE ? PER_STREAM * STREAMS : HALF_OPEN + PER_IP_PROBE ))
NEED=$(( BIG + 200 ))
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$NEED" ]; then
    ulimit -Hn "$NEED" 2>/dev/null || log "cannot raise the hard open-file limit $(ulimit -Hn) to $NEED"
fi
ulimit -n "$NEED" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge "$NEED" ] ||
    die "open-file limit $(ulimit -n) is below the $NEED that $BIG sockets need; lower STREAMS (at most $(( ($(ulimit -n) - 200) / PER_STREAM )) here)"
log "open-file limit $(ulimit -n)"

start_work_dir memory
read -r MOCK_PORT GW_PORT GW_TLS_PORT GW_METRICS_PORT TLS_FRONT_PORT < <(free_ports 5)
start_mock "$MOCK_PORT" "$MOCK_EVENT_GAP_MS"
if [ "$PROVIDER" = h2-tls ]; then
    RELAY_BIN="$CARGO_TARGET_DIR/release/tls-relay"
    [ -x "$RELAY_BIN" ] || die "missing $RELAY_BIN"
    "$GW_BIN" gen-certs --out "$WORK/pki" --name provider >/dev/null
    "$RELAY_BIN" "127.0.0.1:$TLS_FRONT_PORT" "127.0.0.1:$MOCK_PORT" \
        "$WORK/pki/provider.pem" "$WORK/pki/provider-key.pem" h2 >"$WORK/relay.log" 2>&1 &
    PIDS+=("$!")
    export PROVIDER_URL="https://127.0.0.1:$TLS_FRONT_PORT/v1"
    # The gateway trusts the front's CA the way an operator would add one.
    export GW_ENV="SSL_CERT_FILE=$WORK/pki/ca.pem"
fi
# Room for every stream and half-open connection; the per-IP cap stays at
# its default (the client spreads its sockets over 127.0.0.x addresses).
MAX_CONNS=$(( STREAMS + HALF_OPEN + PER_IP_PROBE + 1000 ))
# shellcheck disable=SC2086 # GW_ARGS is a word list on purpose
start_switchyard "$GW_PORT" "$GW_TLS_PORT" "$GW_METRICS_PORT" "$GW_THREADS" "$MOCK_PORT" \
    --max-connections "$MAX_CONNS" ${GW_ARGS:-}
wait_ready "mock" "$MOCK_PID" "$MOCK_PORT" gpt-4o-mini "$KEY" 30 "$WORK/mock.log"
wait_ready "switchyard" "$GW_PID" "$GW_PORT" openai/gpt-4o-mini "$KEY" 30 "$WORK/gateway.log"
for _ in 1 2 3 4 5; do
    [ "$(post_status "$GW_PORT" openai/gpt-4o-mini "$KEY" false)" = 200 ] || die "sanity request failed"
done
log "gateway answers; the slow stream check is the benchmark itself"

CLIENT_RC=0
python3 "$HERE/memory_client.py" "$GW_PID" "$GW_PORT" openai/gpt-4o-mini "$KEY" \
    >"$WORK/client.txt" || CLIENT_RC=$?
kill -0 "$GW_PID" 2>/dev/null || { tail -20 "$WORK/gateway.log" >&2; die "the gateway died during the run"; }
grep -q 'phase=end' "$WORK/client.txt" || { cat "$WORK/client.txt" >&2; die "memory_client.py did not finish (rc $CLIENT_RC)"; }

HEADER_TIMEOUT=$(echo " ${GW_ARGS:-} " | sed -n 's/.*--header-timeout-ms[ =]\([0-9]*\).*/\1/p')
HEADER_TIMEOUT=${HEADER_TIMEOUT:-10000 (default)}

mkdir -p "$(dirname "$OUT")"
RAW="$(cat "$WORK/client.txt")" DATE="$(date -u '+%Y-%m-%d %H:%M:%S UTC')" MACHINE="$(machine_line)" \
COMMIT="$(commit_line)" BINARY="$(binary_line)" GAP="$MOCK_EVENT_GAP_MS" GW_THREADS="$GW_THREADS" MAX_CONNS="$MAX_CONNS" \
HEADER_TIMEOUT="$HEADER_TIMEOUT" GW_ARGS="${GW_ARGS:-}" PROVIDER="$PROVIDER" T_KB="$TARGET_KB_PER_STREAM" T_RATIO="$TARGET_IDLE_RATIO" \
LOAD="$(cut -d' ' -f1-3 /proc/loadavg)" BAD_FILE="$WORK/bad.txt" python3 - >"$WORK/report.md" <<'PY'
import os
e = os.environ
P = {}
for line in e["RAW"].splitlines():
    if line.startswith("MEM "):
        kv = dict(x.split("=", 1) for x in line.split()[1:])
        P[kv.pop("phase")] = kv
g = lambda ph, k: float(P.get(ph, {}).get(k, 0))
mib = lambda kib: "%.1f" % (kib / 1024)
idle = g("idle", "rss_kib")
open_rss, open_now = g("open", "rss_kib"), g("open", "open_now")
per_stream = (open_rss - idle) / open_now if open_now else 0
after = g("after_streams", "rss_kib")
after_long = g("after_streams", "rss_long_kib") or after
ratio = after_long / idle if idle else 0
ho_n = g("half_open", "opened")
per_ho = (g("half_open", "rss_kib") - g("half_open", "rss_before_kib")) / ho_n if ho_n else 0
t_kb, t_ratio = float(e["T_KB"]), float(e["T_RATIO"])
streams = int(g("open", "streams"))

o = []
o.append("## Gateway memory: open streams, bursts, half-open connections")
o.append("")
o.append("- Date: %s; commit %s" % (e["DATE"], e["COMMIT"]))
o.append("- Machine: %s; load average at the end %s (other sessions' builds share the machine)" % (e["MACHINE"], e["LOAD"]))
o.append("- Gateway binary: %s" % e["BINARY"])
o.append("- Settings: `switchyard dev --threads %s --max-connections %s %s`, JSON access log on, header-read timeout "
         "%s ms; mock: 14 SSE events %s ms apart; streams opened at most 256 at a time, client sockets "
         "spread over 127.0.0.x (≤ 200 per address)" % (e["GW_THREADS"], e["MAX_CONNS"], e["GW_ARGS"],
                                                         e["HEADER_TIMEOUT"], e["GAP"]))
o.append("- Provider connection (`PROVIDER=%s`): %s" % (e["PROVIDER"], {
    "http1": "plain HTTP/1.1 to the mock, one upstream connection per open stream",
    "h2-tls": "HTTPS with HTTP/2 by ALPN (the testkit's tls-relay in front of the mock), as the real "
              "providers answer: the open streams share one upstream connection",
}[e["PROVIDER"]]))
o.append("")
o.append("| Measurement | Value |")
o.append("|---|---:|")
o.append("| Idle RSS (MiB) | %s |" % mib(idle))
if "open" in P:
    o.append("| RSS with %d streams open at once (MiB) | %s |" % (open_now, mib(open_rss)))
    o.append("| **KB per open stream** | **%.1f** |" % per_stream)
    o.append("| Streams: opened in / all complete after (s) | %s / %s |" % (P.get("open", {}).get("open_seconds"), P.get("after_streams", {}).get("seconds")))
    o.append("| Streams: first event p50 / p99 while opening (ms) | %s / %s |" % (P.get("open", {}).get("first_event_p50_ms"), P.get("open", {}).get("first_event_p99_ms")))
    o.append("| Streams complete / failed | %d / %d |" % (g("after_streams", "complete"), g("after_streams", "failed")))
    o.append("| Peak RSS (VmHWM) during the burst (MiB) | %s |" % mib(g("after_streams", "hwm_kib")))
    o.append("| RSS %ss / %ss after the burst (MiB) | %s / %s |" % (
        os.environ.get("SETTLE", "10"), os.environ.get("SETTLE_LONG", "30"), mib(after), mib(after_long)))
    o.append("| **After the burst (%ss) ÷ idle** | **%.2f×** |" % (os.environ.get("SETTLE_LONG", "30"), ratio))
    o.append("| RSS after %d more sequential chat requests (MiB), ÷ idle | %s, %.2f× |" % (
        g("after_streams", "light_n"), mib(g("after_streams", "rss_light_kib")),
        g("after_streams", "rss_light_kib") / idle if idle else 0))
o.append("| Half-open connections held (partial request head) | %d |" % ho_n)
o.append("| RSS before → with them (MiB) | %s → %s |" % (mib(g("half_open", "rss_before_kib")), mib(g("half_open", "rss_kib"))))
o.append("| **KB per half-open connection** | **%.1f** |" % per_ho)
hc = P.get("half_open_closed", {})
o.append("| Closed by the gateway within %s s / still open | %s / %s |" % (hc.get("wait_s"), hc.get("closed"), hc.get("still_open")))
o.append("| … closed after min / p50 / max (s) | %s / %s / %s |" % (hc.get("close_min_s"), hc.get("close_p50_s"), hc.get("close_max_s")))
o.append("| RSS after they were gone (MiB) | %s |" % mib(g("half_open_closed", "rss_kib")))
if "per_ip" in P:
    o.append("| Per-IP cap: of %d connections from 127.0.0.1, closed within 2 s | %d |" % (g("per_ip", "opened"), g("per_ip", "closed_within_2s")))
o.append("| RSS at the end / peak (MiB) | %s / %s |" % (mib(g("end", "rss_kib")), mib(g("end", "hwm_kib"))))
o.append("")
if "open" in P:
    o.append("**Target ≤ %.0f KB per open stream → %s** (%.1f KB over %d streams)." % (
        t_kb, "holds" if per_stream <= t_kb else "does not hold", per_stream, open_now))
    o.append("")
    o.append("**Target RSS after a burst ≤ %.0f× idle → %s** (%.2f×, %s s after a burst of %d streams; the issue's figure is for 10,000)." % (
        t_ratio, "holds" if ratio <= t_ratio else "does not hold", ratio, os.environ.get("SETTLE_LONG", "30"), streams))
else:
    o.append("No stream burst (STREAMS=0): the stream targets are not measured in this run.")
if g("after_streams", "done_before_all_open"):
    o.append("")
    o.append("Note: %d streams ended before the last one opened; KB per stream divides by the %d open at the "
             "reading (raise MOCK_EVENT_GAP_MS)." % (g("after_streams", "done_before_all_open"), open_now))
o.append("")
o.append("<details><summary>Raw result lines</summary>")
o.append("")
o.append("```")
o.append(e["RAW"])
o.append("```")
o.append("</details>")
print("\n".join(o))
with open(e["BAD_FILE"], "w") as f:
    if g("after_streams", "failed"):
        f.write("%d of %d streams failed\n" % (g("after_streams", "failed"), streams))
    if "open" in P and g("after_streams", "light_ok") != g("after_streams", "light_n"):
        f.write("%d of %d chat requests after the burst failed\n" % (
            g("after_streams", "light_n") - g("after_streams", "light_ok"), g("after_streams", "light_n")))
PY
cp "$WORK/report.md" "$OUT"
cat "$WORK/report.md"
log "table saved to ${OUT#"$ROOT"/}"
if [ -s "$WORK/bad.txt" ] || [ "$CLIENT_RC" != 0 ]; then
    {
        echo
        echo "############################################################"
        echo "[memory] FAILED: $(cat "$WORK/bad.txt") (client exit code $CLIENT_RC; its stderr above names them)"
        echo "############################################################"
    } >&2
    exit 1
fi
