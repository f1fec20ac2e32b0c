# Shared helpers for benches/peers.sh, benches/memory.sh and benches/soak.sh.
# Sourced, not run. The caller sets LOG_TAG before sourcing and `set -euo
# pipefail` itself. benches/run.sh predates this file and keeps its own copy.
#
# Provides: log/die, apt_install, need_wrk, build_binaries (sets GW_BIN and
# MOCK_BIN), start_work_dir (WORK, PIDS and the cleanup trap), free_ports,
# tree_stat, cpu_ticks, rss_kib, machine_line, commit_line, wait_http_post.

BENCH_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_ROOT=$(dirname "$BENCH_HERE")
LOG_TAG=${LOG_TAG:-bench}
CLK_TCK=$(getconf CLK_TCK)

log() { echo "[$LOG_TAG] $*" >&2; }
die() { echo "[$LOG_TAG] ERROR: $*" >&2; exit 1; }

# apt_install PKG...: installs Debian packages when root or passwordless sudo.
apt_install() {
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo -n"
        else
            return 1
        fi
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

need_wrk() {
    if ! command -v wrk >/dev/null 2>&1; then
        log "wrk not found; installing it with apt-get"
        apt_install wrk || die "wrk is not installed and neither root nor passwordless sudo is available"
    fi
}

# build_binaries: the release gateway and mock, unless SKIP_BUILD=1.
build_binaries() {
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/bench-target}
    if [ "${SKIP_BUILD:-0}" = 1 ]; then
        log "SKIP_BUILD=1: using the binaries already in $CARGO_TARGET_DIR/release"
    else
        command -v cargo >/dev/null 2>&1 || die "cargo is required (or SKIP_BUILD=1 with built binaries)"
        log "building release binaries (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
        (cd "$BENCH_ROOT" && cargo build --release -p switchyard -p switchyard-testkit >&2)
    fi
    GW_BIN="$CARGO_TARGET_DIR/release/switchyard"
    MOCK_BIN="$CARGO_TARGET_DIR/release/mock-upstream"
    [ -x "$GW_BIN" ] || die "missing $GW_BIN"
    [ -x "$MOCK_BIN" ] || die "missing $MOCK_BIN"
    BINARY_DESC="\`$GW_BIN\` (built $(date -u -r "$GW_BIN" '+%Y-%m-%d %H:%M:%S UTC')$([ "${SKIP_BUILD:-0}" = 1 ] && echo ', SKIP_BUILD=1: not necessarily from this commit'))"
}

# start_work_dir NAME: a temp dir, and a trap stopping every pid in PIDS
# (children first killed by pid, then waited for) and removing the dir.
start_work_dir() {
    WORK=$(mktemp -d "/tmp/switchyard-$1.XXXXXX")
    PIDS=()
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}
bench_cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -n "${KEEP_WORK:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}

# free_ports N: N distinct free loopback ports, chosen by the kernel.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks:
    s.close()
PY
}

# tree_stat PID: "ticks rss_kib nprocs" for PID and all its descendants:
# utime+stime (+ reaped children's cutime+cstime) in clock ticks, the sum of
# VmRSS (shared pages counted once per process), and the number of processes.
tree_stat() {
    python3 - "$1" <<'PY'
import os, sys
root = int(sys.argv[1])
parent, stat = {}, {}
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        with open("/proc/%s/stat" % d) as f:
            s = f.read()
    except OSError:
        continue
    fields = s[s.rindex(")") + 2:].split()
    pid = int(d)
    parent[pid] = int(fields[1])
    stat[pid] = sum(int(x) for x in fields[11:15])
tree, todo = [], [root]
while todo:
    p = todo.pop()
    if p not in stat:
        continue
    tree.append(p)
    todo.extend(c for c, pp in parent.items() if pp == p)
rss = 0
for p in tree:
    try:
        with open("/proc/%d/status" % p) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
    except OSError:
        pass
print(sum(stat[p] for p in tree), rss, len(tree))
PY
}
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

# Busy and total jiffies of the whole machine, from /proc/stat.
machine_jiffies() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat; }

machine_line() {
    local cpu
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    echo "nproc=$(nproc), CPU: ${cpu:-unknown}, kernel $(uname -r), $(awk '/^MemTotal:/ { printf "%.1f GiB RAM", $2 / 1048576 }' /proc/meminfo)"
}
commit_line() {
    local c
    c=$(git -C "$BENCH_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [ -n "$(git -C "$BENCH_ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        c="$c (+ uncommitted changes)"
    fi
    echo "$c"
}

# The binary measured, with its build time: with SKIP_BUILD=1 it need not
# come from the commit above.
# Taken when the binaries are chosen: a rebuild during the run does not change
# what the running process is.
binary_line() { echo "$BINARY_DESC"; }

# fleet_setup DIR MOCK_PORT KEY: backhaul certificates for an edge and an
# egress of region `us` (each scoped to its role and region) in DIR/pki, and
# DIR/fleet.yaml sending openai/* to the mock through that egress, with one
# tenant (`bench`) holding KEY. Needs GW_BIN.
fleet_setup() {
    local dir=$1 mock_port=$2 key=$3
    "$GW_BIN" gen-certs --out "$dir/pki" --name edge --role edge --region us >/dev/null
    "$GW_BIN" gen-certs --out "$dir/pki" --name egress --role egress --region us >/dev/null
    cat >"$dir/fleet.yaml" <<EOF
regions:
  us: { jurisdiction: us }
providers:
  openai:
    kind: openai
    base_url: "http://127.0.0.1:$mock_port/v1"
    region: us
tenants:
  - id: bench
    key_sha256: "$("$GW_BIN" hash-key "$key")"
EOF
}

# start_mock PORT [GAP_MS]: the fixture-replaying mock; sets MOCK_PID.
start_mock() {
    MOCK_EVENT_GAP_MS=${2:-1} ${MOCK_PIN:-} "$MOCK_BIN" "127.0.0.1:$1" >"$WORK/mock.log" 2>&1 &
    MOCK_PID=$!
    PIDS+=("$MOCK_PID")
}

# start_switchyard PORT TLS_PORT METRICS_PORT THREADS MOCK_PORT [EXTRA ARGS...]:
# `switchyard dev` with the empty policy, its openai provider pointed at the
# mock and the JSON access log on (appended to $WORK/gateway.log, so it can
# be truncated while the gateway runs); sets GW_PID.
# GW_PIN (e.g. "taskset -c 1") is prefixed when set.
start_switchyard() {
    local port=$1 tls=$2 metrics=$3 threads=$4 mock=$5
    shift 5
    : >"$WORK/policy.yaml"
    env -u ANTHROPIC_API_KEY -u ANTHROPIC_BASE_URL -u GEMINI_API_KEY -u GEMINI_BASE_URL \
        -u SWITCHYARD_LOG -u SWITCHYARD_LOG_FORMAT \
        SWITCHYARD_DEV_KEY="$KEY" OPENAI_API_KEY=x \
        OPENAI_BASE_URL="${PROVIDER_URL:-http://127.0.0.1:$mock/v1}" \
        ${GW_ENV:-} ${GW_PIN:-} "$GW_BIN" dev \
            --listen "127.0.0.1:$port" --tls-listen "127.0.0.1:$tls" \
            --metrics-listen "127.0.0.1:$metrics" \
            --config "$WORK/policy.yaml" --state-dir "$WORK/state" \
            --threads "$threads" --log-format json "$@" \
        >"$WORK/gateway.stdout" 2>>"$WORK/gateway.log" &
    GW_PID=$!
    PIDS+=("$GW_PID")
}

# post_status PORT MODEL KEY STREAM: HTTP status of one chat completion
# (body to $WORK/last-body).
post_status() {
    curl -sS -o "$WORK/last-body" -w '%{http_code}' --max-time 30 \
        -H 'content-type: application/json' -H "authorization: Bearer $3" \
        -d "{\"model\":\"$2\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":$4}" \
        "http://127.0.0.1:$1/v1/chat/completions" 2>/dev/null || echo 000
}

# wait_ready LABEL PID PORT MODEL KEY SECONDS LOGFILE: until a chat completion
# answers 200 (dies if PID exits or the time runs out).
wait_ready() {
    local label=$1 pid=$2 port=$3 model=$4 key=$5 secs=$6 logf=$7 i
    for i in $(seq 1 $((secs * 5))); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -30 "$logf" >&2 || true
            die "$label exited before it became ready"
        fi
        if [ "$(post_status "$port" "$model" "$key" false)" = 200 ]; then
            return 0
        fi
        sleep 0.2
    done
    tail -30 "$logf" >&2 || true
    die "$label did not answer 200 within ${secs}s (last body: $(head -c 300 "$WORK/last-body" 2>/dev/null))"
}
