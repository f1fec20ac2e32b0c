#!/usr/bin/env bash
# Instructions per request: the gateway's CPU work counted by valgrind's
# callgrind, which counts instructions rather than time, so the figure is
# the same on a busy and on an idle machine (wall-clock benchmarks on a
# shared 2-core machine are not). The mock provider runs under callgrind too,
# so the gateway's cost can be read against the work of the upstream it
# fronts in the same run.
#
#   bash benches/instructions.sh              # builds release binaries first
#   SKIP_BUILD=1 GW_BIN=... MOCK_BIN=... bash benches/instructions.sh
#
# Environment (all optional):
#   N=300                 measured requests per kind (after WARMUP of them)
#   WARMUP=50
#   CARGO_TARGET_DIR=/tmp/bench-target
#   GW_BIN / MOCK_BIN     binaries to measure (default: the release build)
#   TOP=0                 print the TOP most expensive functions (inclusive)
#   KEEP=<dir>            keep the gateway's callgrind dumps there
#   OUT=benches/results/instructions-latest.md
#   FLEET=1               measure an edge + QUIC + egress pair instead of
#                         dev: the gateway column is their sum, and the
#                         split is printed after the table
#   PROMPT_BYTES=0        with a number, the request is a conversation of
#                         eight messages whose text comes to about that many
#                         bytes (quotes, newlines and non-ASCII included),
#                         in place of the one-word prompt
#
# Prints a markdown table: instructions per request for a small chat
# completion and a 14-event stream, through the gateway (`switchyard dev`,
# or with FLEET=1 an edge and an egress; JSON access log on) and at the mock, and their ratio.

set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
cd "$ROOT"

N=${N:-300}
WARMUP=${WARMUP:-50}
TOP=${TOP:-0}
FLEET=${FLEET:-0}
PROMPT_BYTES=${PROMPT_BYTES:-0}
OUT=${OUT:-$HERE/results/instructions-latest.md}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/bench-target}
KEY="sy-bench-key-0123456789"

LOG_TAG=instructions
# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"

command -v valgrind >/dev/null || die "valgrind is not installed (Debian package valgrind)"
command -v callgrind_control >/dev/null || die "callgrind_control is missing (Debian package valgrind)"

if [ -z "${SKIP_BUILD:-}" ]; then
    log "building release binaries into $CARGO_TARGET_DIR"
    cargo build --release -p switchyard -p switchyard-testkit >&2
fi
GW_BIN=${GW_BIN:-$CARGO_TARGET_DIR/release/switchyard}
MOCK_BIN=${MOCK_BIN:-$CARGO_TARGET_DIR/release/mock-upstream}
[ -x "$GW_BIN" ] || die "missing $GW_BIN"
[ -x "$MOCK_BIN" ] || die "missing $MOCK_BIN"

WORK=$(mktemp -d /tmp/switchyard-instr.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r MOCK_PORT GW_PORT GW_TLS_PORT EGRESS_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)] + [socket.socket(socket.AF_INET, socket.SOCK_DGRAM)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks:
    s.close()
')

CG="valgrind --tool=callgrind --dump-instr=no --compress-strings=no"
MOCK_EVENT_GAP_MS=0 $CG --callgrind-out-file="$WORK/mock.%p" \
    "$MOCK_BIN" "127.0.0.1:$MOCK_PORT" >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
GW_ENV=(env -u ANTHROPIC_API_KEY -u ANTHROPIC_BASE_URL -u GEMINI_API_KEY -u GEMINI_BASE_URL
    -u SWITCHYARD_LOG -u SWITCHYARD_LOG_FORMAT -u SWITCHYARD_DEV_KEY OPENAI_API_KEY=x)
EGRESS_PID=""
if [ "$FLEET" = 1 ]; then
    # An edge dialing an egress over QUIC.
    fleet_setup "$WORK" "$MOCK_PORT" "$KEY"
    PKI=$WORK/pki
    "${GW_ENV[@]}" $CG --callgrind-out-file="$WORK/egress.%p" \
        "$GW_BIN" egress --region us --listen "127.0.0.1:$EGRESS_PORT" --config "$WORK/fleet.yaml" \
        --state-dir "$WORK/egress" --cert "$PKI/egress.pem" --key "$PKI/egress-key.pem" --ca "$PKI/ca.pem" \
        --threads 2 --log-format json >"$WORK/egress.stdout" 2>"$WORK/egress.log" &
    EGRESS_PID=$!
    PIDS+=("$EGRESS_PID")
    "${GW_ENV[@]}" $CG --callgrind-out-file="$WORK/gw.%p" \
        "$GW_BIN" edge --region us --listen "127.0.0.1:$GW_PORT" --config "$WORK/fleet.yaml" \
        --state-dir "$WORK/edge" --cert "$PKI/edge.pem" --key "$PKI/edge-key.pem" --ca "$PKI/ca.pem" \
        --egress "us=127.0.0.1:$EGRESS_PORT" --admin-listen "127.0.0.1:$GW_TLS_PORT" \
        --threads 2 --log-format json >"$WORK/gw.stdout" 2>"$WORK/gw.log" &
else
    : >"$WORK/policy.yaml"
    "${GW_ENV[@]}" SWITCHYARD_DEV_KEY="$KEY" OPENAI_BASE_URL="http://127.0.0.1:$MOCK_PORT/v1" \
        $CG --callgrind-out-file="$WORK/gw.%p" \
        "$GW_BIN" dev --listen "127.0.0.1:$GW_PORT" --tls-listen "127.0.0.1:$GW_TLS_PORT" \
        --config "$WORK/policy.yaml" --state-dir "$WORK/state" --threads 2 --log-format json \
        >"$WORK/gw.stdout" 2>"$WORK/gw.log" &
fi
GW_PID=$!
PIDS+=("$GW_PID")

# The client: sequential requests over one kept-alive connection, checking
# every answer, so a failing gateway cannot look cheap.
cat >"$WORK/client.py" <<'EOF'
import http.client, json, sys, time
port, kind, n, key = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = sys.argv[5]
prompt_bytes = int(sys.argv[6])
stream = kind == "stream"
messages = [{"role": "user", "content": "hi"}]
if prompt_bytes > 0:
    line = 'The "gateway" forwards this línea of text, and its answer.\n'
    per = max(1, prompt_bytes // 8 // len(line.encode()))
    roles = ["system"] + ["user", "assistant"] * 3 + ["user"]
    messages = [{"role": r, "content": line * per} for r in roles]
body = json.dumps({"model": model, "stream": stream, "messages": messages})
deadline = time.time() + 600
conn = None
while conn is None:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("POST", "/v1/chat/completions", body,
                  {"content-type": "application/json", "authorization": "Bearer " + key})
        r = c.getresponse(); r.read()
        conn = c
    except OSError:
        if time.time() > deadline:
            sys.exit("not ready")
        time.sleep(0.5)
for _ in range(n):
    conn.request("POST", "/v1/chat/completions", body,
                 {"content-type": "application/json", "authorization": "Bearer " + key})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200 or (stream and b"[DONE]" not in data):
        sys.exit(f"bad answer {r.status}: {data[:200]!r}")
EOF

total_ir() { # $1 = callgrind dump file -> total instructions
    awk '/^(summary|totals):/ { print $2; exit }' "$1"
}
measure() { # $1 kind -> "gateway_ir mock_ir" per request
    local kind=$1 gw mock
    python3 "$WORK/client.py" "$GW_PORT" "$kind" "$WARMUP" "$KEY" openai/gpt-4o-mini "$PROMPT_BYTES" ||
        die "warm-up failed ($kind)"
    callgrind_control -z "$GW_PID" >/dev/null 2>&1
    callgrind_control -z "$MOCK_PID" >/dev/null 2>&1
    [ -z "$EGRESS_PID" ] || callgrind_control -z "$EGRESS_PID" >/dev/null 2>&1
    python3 "$WORK/client.py" "$GW_PORT" "$kind" "$N" "$KEY" openai/gpt-4o-mini "$PROMPT_BYTES" ||
        die "measured run failed ($kind)"
    rm -f "$WORK"/gw.*.* "$WORK"/mock.*.* "$WORK"/egress.*.*
    callgrind_control -d "$kind" "$GW_PID" >/dev/null 2>&1
    callgrind_control -d "$kind" "$MOCK_PID" >/dev/null 2>&1
    [ -z "$EGRESS_PID" ] || callgrind_control -d "$kind" "$EGRESS_PID" >/dev/null 2>&1
    gw=$(ls "$WORK"/gw.*.* | head -1)
    mock=$(ls "$WORK"/mock.*.* | head -1)
    [ -n "$gw" ] && [ -n "$mock" ] || die "no callgrind dump"
    local egress_ir=0
    if [ -n "$EGRESS_PID" ]; then
        egress=$(ls "$WORK"/egress.*.* | head -1)
        [ -n "$egress" ] || die "no callgrind dump of the egress"
        egress_ir=$(total_ir "$egress")
        echo "$kind: edge $(( $(total_ir "$gw") / (N + 1) )), egress $(( egress_ir / (N + 1) )) per request" >>"$WORK/split.txt"
    fi
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP" && cp "$gw" "$KEEP/gateway-$kind.callgrind"
        [ -z "$EGRESS_PID" ] || cp "$egress" "$KEEP/egress-$kind.callgrind"
    fi
    if [ "$TOP" -gt 0 ]; then
        callgrind_annotate --inclusive=yes "$gw" 2>/dev/null | sed -n "1,$((TOP + 25))p" >&2
    fi
    echo "$(( ($(total_ir "$gw") + egress_ir) / (N + 1) )) $(( $(total_ir "$mock") / (N + 1) ))"
}

log "measuring $N chat requests (after $WARMUP warm-up), under callgrind"
read -r CHAT_GW CHAT_MOCK < <(measure chat)
log "measuring $N stream requests"
read -r STREAM_GW STREAM_MOCK < <(measure stream)

ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
{
    echo "| Instructions per request (callgrind) | gateway | mock | gateway / mock |"
    echo "|---|---|---|---|"
    echo "| chat, non-streaming | $CHAT_GW | $CHAT_MOCK | $(ratio "$CHAT_GW" "$CHAT_MOCK") |"
    echo "| chat, 14-event stream | $STREAM_GW | $STREAM_MOCK | $(ratio "$STREAM_GW" "$STREAM_MOCK") |"
    echo
    if [ "$FLEET" = 1 ]; then
        echo "Gateway: an edge and an egress over the QUIC backhaul, summed ($(tr '\n' ';' <"$WORK/split.txt" | sed 's/;$//; s/;/; /g'))."
        echo
    fi
    if [ "$PROMPT_BYTES" -gt 0 ]; then
        echo "Request: a conversation of eight messages, about $PROMPT_BYTES bytes of text (PROMPT_BYTES)."
        echo
    fi
    echo "Binary: \`$GW_BIN\` ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)); N=$N after $WARMUP warm-up requests."
} | tee "$OUT"
