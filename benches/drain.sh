#!/usr/bin/env bash
# Drain figures: a long streamed answer through `switchyard dev`, SIGTERM
# while it runs. Reports how long the stream lasted, whether it arrived
# whole, how soon /readyz turned 503 and new connections were refused, and
# how long the node waited before exiting. Timings belong here, not in the
# tests (tests/ops_drain.rs proves the behaviour without them).
#   TOKENS=60 TPS=2 SIGTERM_AFTER=2 bash benches/drain.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${TOKENS:-60}; TPS=${TPS:-2}; SIGTERM_AFTER=${SIGTERM_AFTER:-2}
BIN=${BIN:-target/release/switchyard}
[ -x "$BIN" ] || cargo build --release --bin switchyard
work=$(mktemp -d)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP=$(port); TLS=$(port); ADMIN=$(port)
touch "$work/policy.yaml"
SWITCHYARD_DEV_KEY=sy-drain-bench "$BIN" dev --listen 127.0.0.1:$HTTP --tls-listen 127.0.0.1:$TLS \
  --metrics-listen 127.0.0.1:$ADMIN --state-dir "$work/state" --config "$work/policy.yaml" \
  >"$work/out" 2>"$work/log" &
PID=$!
trap 'kill -9 $PID 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:$ADMIN/readyz && break; sleep 0.1; done
now() { date +%s.%N; }
t0=$(now)
curl -sN http://127.0.0.1:$HTTP/v1/chat/completions -H 'authorization: Bearer sy-drain-bench' \
  -H 'content-type: application/json' -H "x-switchyard-simulate: tps=$TPS,tokens=$TOKENS" \
  -d '{"model":"simulated/sim-small","stream":true,"messages":[{"role":"user","content":"hi"}]}' \
  >"$work/stream" &
CURL=$!
sleep "$SIGTERM_AFTER"
kill -TERM $PID; t_term=$(now)
until [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$ADMIN/readyz)" = 503 ]; do sleep 0.01; done
t_ready=$(now)
while curl -s -o /dev/null http://127.0.0.1:$HTTP/health; do sleep 0.01; done
t_refused=$(now)
wait $CURL; t_end=$(now)
status=0; wait $PID || status=$?; t_exit=$(now)
chunks=$(grep -c '"content"' "$work/stream" || true)
done_seen=$(grep -c '^data: \[DONE\]' "$work/stream" || true)
ms() { python3 -c "print(round(($2-$1)*1000))"; }
echo "| figure | value |"
echo "|---|---|"
echo "| stream length (tokens at tok/s) | $TOKENS at $TPS |"
echo "| SIGTERM after stream start | $(ms $t0 $t_term) ms |"
echo "| /readyz 503 after SIGTERM | $(ms $t_term $t_ready) ms |"
echo "| new connections refused after SIGTERM | $(ms $t_term $t_refused) ms |"
echo "| stream kept across the drain | $(ms $t0 $t_end) ms, $chunks content chunks, [DONE] seen: $done_seen |"
echo "| node exit after SIGTERM (status) | $(ms $t_term $t_exit) ms ($status) |"
[ "$done_seen" = 1 ] || { echo "the stream was cut" >&2; exit 1; }
