#!/usr/bin/env bash
# Switchyard next to its peers: the same load, in one run, sent directly to
# the mock provider, through nginx as a plain reverse proxy (the floor),
# through the LiteLLM proxy, through `switchyard dev`, and optionally through
# another gateway given by path (e.g. Busbar).
#
#   bash benches/peers.sh                       # builds, ~4 min with DURATION=10
#   LITELLM=0 DURATION=5 bash benches/peers.sh  # without LiteLLM, quicker
#   PEER_BIN=/opt/busbar/busbar PEER_NAME=busbar \
#     PEER_ARGS='<its own flags, with {port} and {upstream} where it wants them>' bash benches/peers.sh
#
# The gateway under test runs alone on core 1 (`taskset -c 1`), wrk, the
# mock and the TTFB client on core 0; on a 1-core machine nothing is pinned
# (the report says so). Prints one markdown table and saves it to
# benches/results/peers-latest.md. Exits non-zero if any request failed.
# See benches/README.md ("Peers") for what is measured and how to read it.
#
# Environment (all optional):
#   DURATION=10       seconds per measured wrk run
#   WARMUP=3          seconds of c=CONNS chat load per target before measuring
#   CONNS=50          connections for the throughput / p99 runs
#   TTFB_N=200        streamed requests per target for the first-token times
#   WRK_TIMEOUT=30s   wrk's per-request timeout (a timeout counts as a failure)
#   SETTLE_MAX=60     longest wait for a target to go idle after each run
#   MOCK_EVENT_GAP_MS=1  gap between the mock's 14 SSE events
#   LITELLM=1         0 skips LiteLLM; it is installed (PyPI `litellm[proxy]`)
#                     into $BENCH_CACHE/litellm-venv on first use
#   BENCH_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/switchyard-bench
#   NGINX=1           0 skips nginx (Debian `nginx-light`, installed when missing)
#   PEER_BIN, PEER_NAME (default "peer"), PEER_ARGS: another gateway. In
#                     PEER_ARGS, {port} is replaced by its listen port,
#                     {upstream} by the mock's OpenAI base URL
#                     (http://127.0.0.1:PORT/v1), {mock_port} by the mock's
#                     port, {work} by a scratch dir. PEER_MODEL (default
#                     openai/gpt-4o-mini) and PEER_KEY (default the bench key)
#                     are what the clients send it; the environment is passed
#                     through (set e.g. OPENAI_API_KEY=x for it).
#   GW_CORE=1 LOAD_CORE=0   the cores for the gateway and for the load
#   CARGO_TARGET_DIR=/tmp/bench-target, SKIP_BUILD=1   as in run.sh
#   OUT=benches/results/peers-latest.md

set -euo pipefail
LOG_TAG=peers
# shellcheck source=benches/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
HERE=$BENCH_HERE
ROOT=$BENCH_ROOT
cd "$ROOT"

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-50}
TTFB_N=${TTFB_N:-200}
WRK_TIMEOUT=${WRK_TIMEOUT:-30s}
SETTLE_MAX=${SETTLE_MAX:-60}
MOCK_EVENT_GAP_MS=${MOCK_EVENT_GAP_MS:-1}
LITELLM=${LITELLM:-1}
NGINX=${NGINX:-1}
BENCH_CACHE=${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/switchyard-bench}
GW_CORE=${GW_CORE:-1}
LOAD_CORE=${LOAD_CORE:-0}
OUT=${OUT:-$HERE/results/peers-latest.md}
KEY="sy-bench-key-0123456789"
LITELLM_KEY="sk-bench-litellm-0123456789"   # LiteLLM wants master keys to start with sk-

# ---------------------------------------------------------------- tools ----
need_wrk
for t in python3 curl; do command -v "$t" >/dev/null 2>&1 || die "$t is required"; done
build_binaries

if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null 2>&1; then
    GW_PIN="taskset -c $GW_CORE"
    LOAD_PIN="taskset -c $LOAD_CORE"
    PINNING="gateway under test alone on core $GW_CORE (\`taskset -c $GW_CORE\`); wrk, the mock and the TTFB client on core $LOAD_CORE"
else
    GW_PIN=""
    LOAD_PIN=""
    PINNING="NOT pinned: $(nproc) core(s) or no taskset; the gateway, wrk and the mock share the CPU"
    log "$PINNING"
fi
MOCK_PIN=$LOAD_PIN

SKIPPED=()
NGINX_BIN=""
if [ "$NGINX" = 1 ]; then
    NGINX_BIN=$(command -v nginx || true)
    [ -n "$NGINX_BIN" ] || [ ! -x /usr/sbin/nginx ] || NGINX_BIN=/usr/sbin/nginx
    if [ -z "$NGINX_BIN" ]; then
        log "nginx not found; installing nginx-light with apt-get"
        if apt_install nginx-light; then
            NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
        else
            log "SKIPPING nginx: not installed, and apt-get needs root"
        fi
    fi
    # The Debian package may start a system nginx on port 80; it is not ours to stop, and is not used.
    [ -n "$NGINX_BIN" ] || SKIPPED+=("nginx: skipped, not installed and apt-get needs root (ratios to nginx left out)")
else
    SKIPPED+=("nginx: skipped (NGINX=0)")
fi

LITELLM_BIN=""
if [ "$LITELLM" = 1 ]; then
    VENV="$BENCH_CACHE/litellm-venv"
    if [ ! -x "$VENV/bin/litellm" ]; then
        log "installing litellm[proxy] into $VENV (first run only; a few minutes)"
        mkdir -p "$BENCH_CACHE"
        if python3 -m venv "$VENV" >&2 && "$VENV/bin/pip" install -q 'litellm[proxy]' >&2; then
            :
        else
            log "could not install litellm[proxy]"
        fi
    fi
    if [ -x "$VENV/bin/litellm" ]; then
        LITELLM_BIN="$VENV/bin/litellm"
    else
        SKIPPED+=("LiteLLM: skipped, \`pip install 'litellm[proxy]'\` into $VENV failed")
        log "SKIPPING LiteLLM: it could not be installed"
    fi
else
    SKIPPED+=("LiteLLM: skipped (LITELLM=0)")
fi

# ------------------------------------------------------------ processes ----
start_work_dir peers
read -r MOCK_PORT NGINX_PORT LITELLM_PORT GW_PORT GW_TLS_PORT GW_METRICS_PORT PEER_PORT < <(free_ports 7)

log "starting the mock on 127.0.0.1:$MOCK_PORT (${LOAD_PIN:-unpinned})"
start_mock "$MOCK_PORT" "$MOCK_EVENT_GAP_MS"

# Targets, in table order: TAG, label, port, model, key, root pid.
TAGS=(direct)
declare -A LABEL PORT MODEL TKEY TPID
LABEL[direct]="direct (mock)"; PORT[direct]=$MOCK_PORT; MODEL[direct]=gpt-4o-mini; TKEY[direct]=$KEY
TPID[direct]=$MOCK_PID

if [ -n "$NGINX_BIN" ]; then
    mkdir -p "$WORK/nginx/logs" "$WORK/nginx/tmp"
    cat >"$WORK/nginx/nginx.conf" <<EOF
# A plain reverse proxy: one worker, upstream keepalive, no buffering of
# responses (so SSE events pass as they come), an access log per request.
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
worker_rlimit_nofile 8192;
events { worker_connections 4096; }
http {
    access_log $WORK/nginx/logs/access.log;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    keepalive_requests 1000000;
    upstream mock {
        server 127.0.0.1:$MOCK_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
    log "starting nginx on 127.0.0.1:$NGINX_PORT"
    $GW_PIN "$NGINX_BIN" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx/stdout.log" 2>&1 &
    TPID[nginx]=$!
    PIDS+=("${TPID[nginx]}")
    TAGS+=(nginx); LABEL[nginx]="nginx $("$NGINX_BIN" -v 2>&1 | sed 's/.*nginx\///')"
    PORT[nginx]=$NGINX_PORT; MODEL[nginx]=gpt-4o-mini; TKEY[nginx]=$KEY
fi

if [ -n "$LITELLM_BIN" ]; then
    cat >"$WORK/litellm.yaml" <<EOF
model_list:
  - model_name: openai/gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:$MOCK_PORT/v1
      api_key: x
general_settings:
  master_key: $LITELLM_KEY
EOF
    log "starting LiteLLM proxy on 127.0.0.1:$LITELLM_PORT (1 worker)"
    # Offline: no cost-map fetch or other outbound calls at start.
    LITELLM_OFFLINE_MODE=true LITELLM_LOCAL_MODEL_COST_MAP=true LITELLM_TELEMETRY=False \
        $GW_PIN "$LITELLM_BIN" --config "$WORK/litellm.yaml" --host 127.0.0.1 \
        --port "$LITELLM_PORT" --num_workers 1 >"$WORK/litellm.log" 2>&1 &
    TPID[litellm]=$!
    PIDS+=("${TPID[litellm]}")
    TAGS+=(litellm); LABEL[litellm]="LiteLLM $("$VENV/bin/pip" show litellm 2>/dev/null | awk '/^Version:/ { print $2 }')"
    PORT[litellm]=$LITELLM_PORT; MODEL[litellm]=openai/gpt-4o-mini; TKEY[litellm]=$LITELLM_KEY
fi

log "starting switchyard dev on 127.0.0.1:$GW_PORT (--threads 1)"
# Room for the load; the default per-IP cap (256) is above CONNS anyway.
start_switchyard "$GW_PORT" "$GW_TLS_PORT" "$GW_METRICS_PORT" 1 "$MOCK_PORT"
TPID[switchyard]=$GW_PID
TAGS+=(switchyard); LABEL[switchyard]="Switchyard"
PORT[switchyard]=$GW_PORT; MODEL[switchyard]=openai/gpt-4o-mini; TKEY[switchyard]=$KEY

if [ -n "${PEER_BIN:-}" ]; then
    [ -x "$PEER_BIN" ] || die "PEER_BIN=$PEER_BIN is not executable"
    PEER_NAME=${PEER_NAME:-peer}
    mkdir -p "$WORK/peer"
    args=${PEER_ARGS:-}
    args=${args//\{port\}/$PEER_PORT}
    args=${args//\{upstream\}/http://127.0.0.1:$MOCK_PORT/v1}
    args=${args//\{mock_port\}/$MOCK_PORT}
    args=${args//\{work\}/$WORK/peer}
    log "starting $PEER_NAME: $PEER_BIN $args"
    # shellcheck disable=SC2086 # PEER_ARGS is a word list on purpose
    (cd "$WORK/peer" && exec $GW_PIN "$PEER_BIN" $args) >"$WORK/peer.log" 2>&1 &
    TPID[peer]=$!
    PIDS+=("${TPID[peer]}")
    TAGS+=(peer); LABEL[peer]=$PEER_NAME
    PORT[peer]=$PEER_PORT; MODEL[peer]=${PEER_MODEL:-openai/gpt-4o-mini}; TKEY[peer]=${PEER_KEY:-$KEY}
fi

for t in "${TAGS[@]}"; do
    case $t in
        litellm) secs=180; lf="$WORK/litellm.log" ;;
        nginx) secs=30; lf="$WORK/nginx/logs/error.log" ;;
        switchyard) secs=30; lf="$WORK/gateway.log" ;;
        peer) secs=60; lf="$WORK/peer.log" ;;
        *) secs=30; lf="$WORK/mock.log" ;;
    esac
    log "waiting for $t to answer"
    wait_ready "$t" "${TPID[$t]}" "${PORT[$t]}" "${MODEL[$t]}" "${TKEY[$t]}" "$secs" "$lf"
    s=$(post_status "${PORT[$t]}" "${MODEL[$t]}" "${TKEY[$t]}" true)
    [ "$s" = 200 ] && grep -q 'data: \[DONE\]' "$WORK/last-body" ||
        die "$t: a streamed request did not complete (HTTP $s): $(head -c 300 "$WORK/last-body")"
done
log "all targets answer chat and stream requests"

# ---------------------------------------------------------- measurement ----
declare -A R
parse_line() { # "PREFIX tag=T k=v ..." -> R[T.k]=v
    local tag="" kv
    for kv in $1; do
        case "$kv" in
            tag=*) tag=${kv#tag=} ;;
            *=*) R["$tag.${kv%%=*}"]=${kv#*=} ;;
        esac
    done
}
run_wrk() { # $1 tag, $2 target, $3 conns, $4 seconds, $5 stream (0/1)
    local out="$WORK/wrk-$1.txt" line
    BENCH_TAG="$1" BENCH_MODEL="${MODEL[$2]}" BENCH_KEY="${TKEY[$2]}" BENCH_STREAM="$5" \
        $LOAD_PIN wrk -t1 -c"$3" -d"$4s" --timeout "$WRK_TIMEOUT" --latency -s "$HERE/chat.lua" \
        "http://127.0.0.1:${PORT[$2]}" >"$out" 2>&1 || { cat "$out" >&2; die "wrk failed ($1)"; }
    line=$(grep '^BENCH ' "$out") || { cat "$out" >&2; die "no result line from wrk ($1)"; }
    echo "$line" >>"$WORK/raw.txt"
    parse_line "$line"
}
tree_ticks() { tree_stat "$1" | cut -d' ' -f1; }

NCPU=$(nproc)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
read -r BUSY0 TOTAL0 < <(machine_jiffies)
OURS0=0
for t in "${TAGS[@]}"; do OURS0=$((OURS0 + $(tree_ticks "${TPID[$t]}"))); done

# settle PID: waits (at most SETTLE_MAX s) until the target's tree uses less
# than 5 % of a core over 0.5 s, so work left from one run (requests still in
# flight when wrk stopped) is finished, and counted, before the next starts.
settle() {
    local a b i
    for i in $(seq 1 $((SETTLE_MAX * 2))); do
        a=$(tree_ticks "$1"); sleep 0.5; b=$(tree_ticks "$1")
        [ $(( (b - a) * 100 * 2 )) -lt $(( CLK_TCK * 5 )) ] && return 0
    done
    log "still busy after ${SETTLE_MAX}s; going on"
}
measured() { # $1 run tag, $2 target, $3 conns, $4 seconds, $5 stream: CPU from start to settled
    local c0 c1 w0 w1
    c0=$(tree_ticks "${TPID[$2]}"); w0=$(date +%s%N)
    run_wrk "$1" "$2" "$3" "$4" "$5"
    settle "${TPID[$2]}"
    c1=$(tree_ticks "${TPID[$2]}"); w1=$(date +%s%N)
    R["$1.cpu_ticks"]=$((c1 - c0))
    R["$1.window_us"]=$(( (w1 - w0) / 1000 ))
}

for t in "${TAGS[@]}"; do
    pid=${TPID[$t]}
    log "$t: warm-up ${WARMUP}s at c=$CONNS"
    run_wrk "$t-warm" "$t" "$CONNS" "$WARMUP" 0
    settle "$pid"
    log "$t: chat c=$CONNS ${DURATION}s"
    measured "$t-chat" "$t" "$CONNS" "$DURATION" 0
    log "$t: stream c=$CONNS ${DURATION}s"
    measured "$t-stream" "$t" "$CONNS" "$DURATION" 1
    log "$t: chat c=1 ${DURATION}s"
    measured "$t-c1" "$t" 1 "$DURATION" 0
    read -r _ rss nprocs < <(tree_stat "$pid")
    R["$t.rss_kib"]=$rss
    R["$t.nprocs"]=$nprocs
    kill -0 "$pid" 2>/dev/null || die "$t died during its run"
done

log "streaming first-token times: $TTFB_N requests per target, in rotation"
specs=()
for t in "${TAGS[@]}"; do specs+=("$t:${PORT[$t]}:${MODEL[$t]}:${TKEY[$t]}"); done
$LOAD_PIN python3 "$HERE/ttfb.py" "$TTFB_N" "${specs[@]}" >"$WORK/ttfb.txt" 2>"$WORK/ttfb.err" ||
    { cat "$WORK/ttfb.err" >&2; die "ttfb.py failed"; }
cat "$WORK/ttfb.err" >&2
while read -r line; do
    case "$line" in TTFB\ *) echo "$line" >>"$WORK/raw.txt"; parse_line "$line" ;; esac
done <"$WORK/ttfb.txt"

read -r BUSY1 TOTAL1 < <(machine_jiffies)
OURS1=0
for t in "${TAGS[@]}"; do OURS1=$((OURS1 + $(tree_ticks "${TPID[$t]}"))); done
# wrk, python and curl are this shell's reaped children.
CHILD_TICKS=$(times | awk -v tck="$CLK_TCK" 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/)
    printf "%d\n", ((u[1] * 60 + u[2]) + (s[1] * 60 + s[2])) * tck }')
OURS=$((OURS1 - OURS0 + CHILD_TICKS))
# The mock is the direct target's tree and also serves every other target:
# counted once above, which is right.
read -r CORES_BUSY CORES_OTHER < <(awk -v b=$((BUSY1 - BUSY0)) -v t=$((TOTAL1 - TOTAL0)) \
    -v o="$OURS" -v n="$NCPU" 'BEGIN { busy = t ? n * b / t : 0; other = t ? n * (b - o) / t : 0
        if (other < 0) other = 0; printf "%.2f %.2f\n", busy, other }')

# ---------------------------------------------------------------- report ----
mkdir -p "$(dirname "$OUT")"
export R_DUMP TAGS_LIST LABELS_DUMP
R_DUMP=$(for k in "${!R[@]}"; do echo "$k=${R[$k]}"; done)
TAGS_LIST="${TAGS[*]}"
LABELS_DUMP=$(for t in "${TAGS[@]}"; do echo "$t=${LABEL[$t]}"; done)
SKIPPED_DUMP=$(printf '%s\n' "${SKIPPED[@]+"${SKIPPED[@]}"}") \
DATE="$(date -u '+%Y-%m-%d %H:%M:%S UTC')" MACHINE="$(machine_line)" COMMIT="$(commit_line)" BINARY="$(binary_line)" \
PINNING="$PINNING" DURATION="$DURATION" WARMUP="$WARMUP" CONNS="$CONNS" TTFB_N="$TTFB_N" \
GAP="$MOCK_EVENT_GAP_MS" CLK_TCK="$CLK_TCK" LOAD_BEFORE="$LOAD_BEFORE" NCPU="$NCPU" \
CORES_BUSY="$CORES_BUSY" CORES_OTHER="$CORES_OTHER" RAW="$(cat "$WORK/raw.txt")" \
BAD_FILE="$WORK/bad.txt" python3 - >"$WORK/report.md" <<'PY'
import os

e = os.environ
R = dict(l.split("=", 1) for l in e["R_DUMP"].splitlines() if "=" in l)
LABEL = dict(l.split("=", 1) for l in e["LABELS_DUMP"].splitlines() if "=" in l)
tags = e["TAGS_LIST"].split()
tck = float(e["CLK_TCK"])
conns = int(e["CONNS"])
num = lambda k: float(R.get(k, "0") or 0)

def rps(run):
    d = num(run + ".duration_us")
    return num(run + ".requests") / (d / 1e6) if d else 0.0

def cpu_us(run):
    # Requests still in flight when wrk stopped (at most one per connection)
    # were served before the target settled: their CPU is in the window.
    n = num(run + ".requests") + (1 if run.endswith("-c1") else conns)
    return num(run + ".cpu_ticks") * 1e6 / tck / n if n else None

def ms(us):
    return "%.2f" % (us / 1000.0)

def ratio(a, b):
    return "%.2f×" % (a / b) if a is not None and b else "—"

base = "nginx" if "nginx" in tags else None
rows = []
for t in tags:
    chat, stream, c1 = rps(t + "-chat"), rps(t + "-stream"), t + "-c1"
    direct = t == "direct"
    cc, sc = (None, None) if direct else (cpu_us(t + "-chat"), cpu_us(t + "-stream"))
    added50 = num(c1 + ".p50_us") - num("direct-c1.p50_us")
    added99 = num(c1 + ".p99_us") - num("direct-c1.p99_us")
    n_cc = cpu_us(base + "-chat") if base else None
    n_sc = cpu_us(base + "-stream") if base else None
    n_p99 = num(base + "-chat.p99_us") if base else None
    busy = num(t + "-chat.cpu_ticks") / tck / (num(t + "-chat.window_us") / 1e6 or 1) * 100
    rows.append("| %s | %s | %s | %s / %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %s / %s | %.1f (%d) |" % (
        LABEL.get(t, t),
        "{:,.0f}".format(chat), "—" if direct else ratio(chat, rps("direct-chat")),
        ms(num(t + "-chat.p50_us")), ms(num(t + "-chat.p99_us")),
        "—" if t == base or not base else ratio(num(t + "-chat.p99_us"), n_p99),
        "{:.1f}".format(cc) if cc is not None else "—",
        "—" if direct else "%.0f %%" % busy,
        "—" if direct or t == base or not base else ratio(cc, n_cc),
        "{:,.0f}".format(stream),
        "{:.1f}".format(sc) if sc is not None else "—",
        "—" if direct or t == base or not base else ratio(sc, n_sc),
        "—" if direct else "{:+.0f}".format(added50) + " / " + "{:+.0f}".format(added99),
        ms(num(t + ".first_p50_us")), ms(num(t + ".first_p99_us")),
        ms(num(t + ".total_p50_us")), ms(num(t + ".total_p99_us")),
        num(t + ".rss_kib") / 1024, int(num(t + ".nprocs"))))

errs = []
bad = []
for t in tags:
    for kind in ("warm", "chat", "stream", "c1"):
        run = "%s-%s" % (t, kind)
        x = {k: int(num(run + ".err_" + k)) for k in ("status", "connect", "read", "write", "timeout")}
        errs.append("| %s | %d | %d | %d | %d | %d | %d |" % (
            run, num(run + ".requests"), x["status"], x["connect"], x["read"], x["write"], x["timeout"]))
        if any(x.values()):
            bad.append("%s: %s" % (run, ", ".join("%s=%d" % kv for kv in x.items() if kv[1])))
        if num(run + ".requests") == 0:
            bad.append("%s: no request completed" % run)
    f, n = int(num(t + ".failures")), int(num(t + ".n"))
    errs.append("| %s-ttfb | %d | %d failed streams | — | — | — | — |" % (t, n, f))
    if f or n == 0:
        bad.append("%s-ttfb: %d failed streams, %d complete" % (t, f, n))

out = []
out.append("## Switchyard and its peers: the same load, one run")
out.append("")
out.append("- Date: %s; commit %s" % (e["DATE"], e["COMMIT"]))
out.append("- Machine: %s" % e["MACHINE"])
out.append("- Gateway binary: %s" % e["BINARY"])
out.append("- Pinning: %s" % e["PINNING"])
out.append("- Machine load: load average %s before; during the run %s of %s cores busy on average, "
           "**%s cores' worth by processes outside this benchmark**" % (
               e["LOAD_BEFORE"], e["CORES_BUSY"], e["NCPU"], e["CORES_OTHER"]))
out.append("- Settings: %ss per wrk run (`wrk -t1`, after %ss warm-up at c=%s); chat = small non-streaming "
           "completion (~800 B answer), stream = 14 SSE events %s ms apart; first-token times over %s "
           "sequential streams per target, targets in rotation; Switchyard `dev --threads 1`, JSON access "
           "log on; nginx 1 worker, upstream keepalive, `proxy_buffering off`, access log on; LiteLLM "
           "1 worker, master key, default settings otherwise" % (
               e["DURATION"], e["WARMUP"], e["CONNS"], e["GAP"], e["TTFB_N"]))
for s in e.get("SKIPPED_DUMP", "").splitlines():
    if s.strip():
        out.append("- %s" % s)
out.append("")
c = e["CONNS"]
out.append("| Target | chat req/s c=%s | ÷ direct | chat p50 / p99 c=%s (ms) | p99 ÷ nginx | chat CPU/req (µs) | its CPU use in the chat run | ÷ nginx "
           "| stream req/s c=%s | stream CPU/req (µs) | ÷ nginx | added c=1 p50 / p99 vs direct (µs) "
           "| first token p50 / p99 (ms) | stream complete p50 / p99 (ms) | RSS after load, MiB (processes) |" % (c, c, c))
out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
out.extend(rows)
out.append("")
out.append("CPU per request is utime+stime of the target's whole process tree (`/proc/<pid>/stat`, nginx master + "
           "worker, LiteLLM's python processes) over the run, divided by the requests wrk completed; 1 s ÷ it ≈ "
           "requests per second per fully used core. The CPU window runs from the start of the wrk run until the target is "
           "idle again, and the requests counted include those in flight when wrk stopped (one per connection). The direct row has no gateway (its load runs the mock only). "
           "*Its CPU use* is that CPU time over the same window's wall time: well below 100 % while the gateway is the "
           "bottleneck means other processes took its core (see Machine load), which lowers req/s and raises "
           "latency but not CPU per request. RSS is the sum over the tree (shared pages counted per process).")
out.append("")
out.append("Errors per run (wrk: status ≥ 400 and socket errors; TTFB client: each stream a 200 ending in `data: [DONE]`):")
out.append("")
out.append("| Run | Requests | Non-2xx | Connect | Read | Write | Timeout |")
out.append("|---|---:|---:|---:|---:|---:|---:|")
out.extend(errs)
out.append("")
out.append("<details><summary>Raw result lines</summary>")
out.append("")
out.append("```")
out.append(e["RAW"])
out.append("```")
out.append("</details>")
print("\n".join(out))
with open(e["BAD_FILE"], "w") as f:
    for b in bad:
        f.write(b + "\n")
PY

cp "$WORK/report.md" "$OUT"
cat "$WORK/report.md"
log "table saved to ${OUT#"$ROOT"/}"
if [ -s "$WORK/bad.txt" ]; then
    {
        echo
        echo "############################################################"
        echo "[peers] FAILED: some requests did not succeed:"
        sed 's/^/[peers]   /' "$WORK/bad.txt"
        echo "############################################################"
    } >&2
    exit 1
fi
