#!/usr/bin/env bash
# Translated path vs same-protocol passthrough, in one run, one gateway:
#   passthrough: OpenAI caller -> openai/gpt-4o-mini  (mock speaks OpenAI)
#   translated:  OpenAI caller -> anthropic/claude-sonnet-4-5 (mock speaks
#                Anthropic Messages; the gateway translates request, SSE
#                events and usage both ways)
# Both providers point at the same fixture-replaying mock, so the only
# difference is the translation. Reports streaming time-to-first-byte
# (p50/p99), streams/s and non-streaming req/s, and the ratios.
#
#   bash benches/translation.sh            # DURATION=8 s per wrk run
#   SKIP_BUILD=1 bash benches/translation.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT"
DURATION=${DURATION:-8}
N=${N:-300}
KEY=sy-bench-key
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)" >&2; exit 1; }
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release -p switchyard -p switchyard-testkit >&2
fi
GW_BIN="$CARGO_TARGET_DIR/release/switchyard"
MOCK_BIN="$CARGO_TARGET_DIR/release/mock-upstream"

WORK=$(mktemp -d /tmp/switchyard-xlate.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
read -r MOCK_PORT GW_PORT TLS_PORT METRICS_PORT < <(python3 -c '
import socket
s = [socket.socket() for _ in range(4)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(*[x.getsockname()[1] for x in s])
[x.close() for x in s]')
: > "$WORK/policy.yaml"
MOCK_EVENT_GAP_MS=0 "$MOCK_BIN" "127.0.0.1:$MOCK_PORT" >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
env -u GEMINI_API_KEY -u SWITCHYARD_LOG SWITCHYARD_DEV_KEY=$KEY \
    OPENAI_API_KEY=x OPENAI_BASE_URL="http://127.0.0.1:$MOCK_PORT/v1" \
    ANTHROPIC_API_KEY=x ANTHROPIC_BASE_URL="http://127.0.0.1:$MOCK_PORT" \
    "$GW_BIN" dev --listen "127.0.0.1:$GW_PORT" --tls-listen "127.0.0.1:$TLS_PORT" \
    --metrics-listen "127.0.0.1:$METRICS_PORT" --config "$WORK/policy.yaml" \
    --state-dir "$WORK/state" --threads 2 >"$WORK/gw.out" 2>"$WORK/gw.log" &
PIDS+=($!)
for _ in $(seq 1 300); do
    curl -sf -o /dev/null "http://127.0.0.1:$GW_PORT/health" && break
    sleep 0.1
done

PASS=openai/gpt-4o-mini
XLATE=anthropic/claude-sonnet-4-5
for m in $PASS $XLATE; do
    out=$(curl -sS --max-time 10 -H "authorization: Bearer $KEY" -H 'content-type: application/json' \
        -d "{\"model\":\"$m\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}" \
        "http://127.0.0.1:$GW_PORT/v1/chat/completions")
    case "$out" in *"data: [DONE]"*) ;; *) echo "sanity check failed for $m: ${out:0:300}" >&2; exit 1 ;; esac
done

declare -A R
parse() { local tag="" kv; for kv in $1; do case $kv in tag=*) tag=${kv#tag=};; *=*) R[$tag.${kv%%=*}]=${kv#*=};; esac; done; }

# TTFB: ttfb.py's "direct" slot is the passthrough model, "gateway" the translated one.
while read -r line; do parse "$line"; done < <(python3 "$HERE/ttfb.py" "$N" "$GW_PORT" "$PASS" "$GW_PORT" "$XLATE" "$KEY" | grep '^TTFB ')

wrk_run() { # tag model stream
    local line
    line=$(BENCH_TAG=$1 BENCH_MODEL=$2 BENCH_KEY=$KEY BENCH_STREAM=$3 \
        wrk -t2 -c16 -d"${DURATION}s" --timeout 5s -s "$HERE/chat.lua" "http://127.0.0.1:$GW_PORT" | grep '^BENCH ')
    parse "$line"
    [ "${R[$1.err_status]}" = 0 ] || { echo "$1: ${R[$1.err_status]} error responses" >&2; exit 1; }
}
wrk_run pass-stream $PASS 1
wrk_run xlate-stream $XLATE 1
wrk_run pass-json $PASS 0
wrk_run xlate-json $XLATE 0

rps() { python3 -c "print(round($1 * 1e6 / $2))"; }
ratio() { python3 -c "print(f'{$2 / $1:.2f}x')"; }
ps_=$(rps "${R[pass-stream.requests]}" "${R[pass-stream.duration_us]}")
xs=$(rps "${R[xlate-stream.requests]}" "${R[xlate-stream.duration_us]}")
pj=$(rps "${R[pass-json.requests]}" "${R[pass-json.duration_us]}")
xj=$(rps "${R[xlate-json.requests]}" "${R[xlate-json.duration_us]}")
cat <<TABLE
## Translated (OpenAI in -> Anthropic out) vs passthrough (OpenAI in -> OpenAI out)

$(date -u '+%Y-%m-%d %H:%M UTC'), nproc=$(nproc), load average $(cut -d' ' -f1-3 /proc/loadavg); wrk -t2 -c16 ${DURATION}s; TTFB over $N sequential streams each.

| metric | passthrough | translated | translated - passthrough | ratio |
|---|---:|---:|---:|---:|
| stream TTFB p50 (us) | ${R[direct.first_p50_us]} | ${R[gateway.first_p50_us]} | $(( ${R[gateway.first_p50_us]} - ${R[direct.first_p50_us]} )) | $(ratio "${R[direct.first_p50_us]}" "${R[gateway.first_p50_us]}") |
| stream TTFB p99 (us) | ${R[direct.first_p99_us]} | ${R[gateway.first_p99_us]} | $(( ${R[gateway.first_p99_us]} - ${R[direct.first_p99_us]} )) | $(ratio "${R[direct.first_p99_us]}" "${R[gateway.first_p99_us]}") |
| whole stream p50 (us) | ${R[direct.total_p50_us]} | ${R[gateway.total_p50_us]} | $(( ${R[gateway.total_p50_us]} - ${R[direct.total_p50_us]} )) | $(ratio "${R[direct.total_p50_us]}" "${R[gateway.total_p50_us]}") |
| streams/s (c=16) | $ps_ | $xs | | $(ratio "$ps_" "$xs") |
| stream p99 latency c=16 (us) | ${R[pass-stream.p99_us]} | ${R[xlate-stream.p99_us]} | | |
| non-stream req/s (c=16) | $pj | $xj | | $(ratio "$pj" "$xj") |
| non-stream p50 latency c=16 (us) | ${R[pass-json.p50_us]} | ${R[xlate-json.p50_us]} | $(( ${R[xlate-json.p50_us]} - ${R[pass-json.p50_us]} )) | |

The recorded streams differ in length (OpenAI fixture: $(grep -c '^data:' <(python3 -c "import json;print(json.load(open('tests/fixtures/openai/chat-stream-include-usage/response.json'))['body_sse'])")) events; Anthropic fixture: $(grep -c '^data:' <(python3 -c "import json;print(json.load(open('tests/fixtures/anthropic/messages-stream/response.json'))['body_sse'])")) events), so whole-stream figures compare unequal work; TTFB compares like with like.
TABLE
