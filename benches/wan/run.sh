#!/usr/bin/env bash
# WAN-simulation benchmark of the QUIC backhaul (see benches/wan/README.md).
#
#   (a) client --80 ms RTT, cold TCP+TLS--> provider (mock behind a TLS front)
#   (b) client --5 ms RTT, cold TCP+TLS--> edge ==warm QUIC, 80 ms RTT==> egress --> provider
#   plus, on plain loopback: direct vs `switchyard dev` vs edge+QUIC+egress.
#
# Env: WAN_RTT_MS (80), LAN_RTT_MS (5), N (20 TTFT samples), LOAD_N (2000),
#      CARGO_TARGET_DIR (/tmp/wan-target), SKIP_BUILD=1 to reuse binaries.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-/tmp/wan-target}
WAN_RTT_MS=${WAN_RTT_MS:-80}
LAN_RTT_MS=${LAN_RTT_MS:-5}
N=${N:-20}
LOAD_N=${LOAD_N:-2000}

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release -p switchyard -p switchyard-testkit --bins)
fi
BIN=$TARGET/release
for b in switchyard mock-upstream tls-relay delay-relay wan-probe; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/sy-wan.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Free loopback ports (probed, so a race is possible but unlikely).
tcp_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
udp_port() { python3 -c 'import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_tcp() {
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "port $1 never opened" >&2; exit 1
}
start() { # name, command...
  local name=$1; shift
  "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  PIDS+=($!)
}
half() { python3 -c "print($1/2)"; }

MOCK=$(tcp_port); TLSP=$(tcp_port); WAN_TCP=$(tcp_port)
EGRESS=$(udp_port); WAN_UDP=$(udp_port)
EDGE_HTTP=$(tcp_port); EDGE_HTTPS=$(tcp_port); LAN_TCP=$(tcp_port)
EDGE2_HTTP=$(tcp_port); DEV_HTTP=$(tcp_port); DEV_HTTPS=$(tcp_port)
KEY=sy-bench-key

# Backhaul certificates are scoped to their role and region; `provider` (no
# role) is the server certificate of the mock's TLS front and the edge's HTTPS.
gen() { "$BIN/switchyard" gen-certs --out "$WORK/pki" "$@" >/dev/null; }
gen --name provider
gen --name edge --role edge --region eu
gen --name edge-us --role edge --region us
gen --name egress --role egress --region us
PKI=$WORK/pki

cat >"$WORK/policy.yaml" <<EOF
regions:
  us: { jurisdiction: us }
  eu: { jurisdiction: eu }
providers:
  openai:
    kind: openai
    base_url: "http://127.0.0.1:$MOCK/v1"
    region: us
tenants:
  - id: bench
    key_sha256: "$("$BIN/switchyard" hash-key $KEY)"
EOF

export SWITCHYARD_LOG=warn
# Provider region: the mock, its TLS front, and the egress next to it.
start mock "$BIN/mock-upstream" "127.0.0.1:$MOCK"
start tls "$BIN/tls-relay" "127.0.0.1:$TLSP" "127.0.0.1:$MOCK" "$PKI/provider.pem" "$PKI/provider-key.pem"
wait_tcp "$MOCK"; wait_tcp "$TLSP"
start egress env OPENAI_API_KEY=sk-bench "$BIN/switchyard" egress --region us \
  --listen "127.0.0.1:$EGRESS" --config "$WORK/policy.yaml" \
  --cert "$PKI/egress.pem" --key "$PKI/egress-key.pem" --ca "$PKI/ca.pem"
# The WAN: 80 ms RTT for TCP (direct client) and UDP (backhaul).
start wan-tcp "$BIN/delay-relay" tcp "127.0.0.1:$WAN_TCP" "127.0.0.1:$TLSP" "$(half "$WAN_RTT_MS")"
start wan-udp "$BIN/delay-relay" udp "127.0.0.1:$WAN_UDP" "127.0.0.1:$EGRESS" "$(half "$WAN_RTT_MS")"
sleep 0.3
# User region: the edge, 5 ms from the client.
start edge "$BIN/switchyard" edge --region eu \
  --listen "127.0.0.1:$EDGE_HTTP" --tls-listen "127.0.0.1:$EDGE_HTTPS" --config "$WORK/policy.yaml" \
  --tls-cert "$PKI/provider.pem" --tls-key "$PKI/provider-key.pem" \
  --cert "$PKI/edge.pem" --key "$PKI/edge-key.pem" --ca "$PKI/ca.pem" --egress "us=127.0.0.1:$WAN_UDP"
start lan-tcp "$BIN/delay-relay" tcp "127.0.0.1:$LAN_TCP" "127.0.0.1:$EDGE_HTTPS" "$(half "$LAN_RTT_MS")"
wait_tcp "$EDGE_HTTPS"; wait_tcp "$WAN_TCP"; wait_tcp "$LAN_TCP"

# Warm the backhaul and the egress's provider pool (a long-running edge is warm).
"$BIN/wan-probe" load "http://127.0.0.1:$EDGE_HTTP/v1/chat/completions" $KEY openai/gpt-4o-mini 4 2 stream >/dev/null

echo "== TTFT, client ${WAN_RTT_MS} ms RTT from the provider region (N=$N, cold connection per request)"
A=$("$BIN/wan-probe" ttft "https://127.0.0.1:$WAN_TCP/v1/chat/completions" sk-direct gpt-4o-mini "$N" "$PKI/ca.pem")
echo "(a) direct HTTPS to the provider:          $A"
B=$("$BIN/wan-probe" ttft "https://127.0.0.1:$LAN_TCP/v1/chat/completions" $KEY openai/gpt-4o-mini "$N" "$PKI/ca.pem")
echo "(b) edge (${LAN_RTT_MS} ms) + warm QUIC backhaul: $B"
python3 - "$A" "$B" <<'EOF'
import sys
p50 = [float(s.split("p50=")[1].split()[0]) for s in sys.argv[1:3]]
print(f"    p50 {p50[0]:.1f} ms -> {p50[1]:.1f} ms: {100 * (1 - p50[1] / p50[0]):.0f} % lower, {p50[0] / p50[1]:.2f}x")
EOF

# Loopback comparison: a second edge straight at the egress (no delay), and dev mode.
start edge2 "$BIN/switchyard" edge --region us \
  --listen "127.0.0.1:$EDGE2_HTTP" --config "$WORK/policy.yaml" \
  --cert "$PKI/edge-us.pem" --key "$PKI/edge-us-key.pem" --ca "$PKI/ca.pem" --egress "us=127.0.0.1:$EGRESS"
start dev env SWITCHYARD_DEV_KEY=$KEY OPENAI_API_KEY=sk-bench "$BIN/switchyard" dev \
  --listen "127.0.0.1:$DEV_HTTP" --tls-listen "127.0.0.1:$DEV_HTTPS" --config "$WORK/policy.yaml" --state-dir "$WORK/dev"
wait_tcp "$EDGE2_HTTP"; wait_tcp "$DEV_HTTP"

echo
echo "== Plain loopback, warm connections, LOAD_N=$LOAD_N"
for mode in "1 full" "16 full" "16 stream"; do
  set -- $mode
  echo "-- concurrency $1, $2 responses"
  echo "direct to the mock:          $("$BIN/wan-probe" load "http://127.0.0.1:$MOCK/v1/chat/completions" x gpt-4o-mini "$LOAD_N" "$1" "$2")"
  echo "switchyard dev (in-process): $("$BIN/wan-probe" load "http://127.0.0.1:$DEV_HTTP/v1/chat/completions" $KEY openai/gpt-4o-mini "$LOAD_N" "$1" "$2")"
  echo "edge + QUIC + egress:        $("$BIN/wan-probe" load "http://127.0.0.1:$EDGE2_HTTP/v1/chat/completions" $KEY openai/gpt-4o-mini "$LOAD_N" "$1" "$2")"
done
