#!/usr/bin/env python3
"""Memory of the gateway under many open streams and half-open connections.

Driven by benches/memory.sh, which starts the mock (slow SSE events) and
`switchyard dev`; this client does the load and reads the gateway's memory
from /proc/<pid>/status itself, so each figure is taken at the right moment:

  1. idle RSS (after a few requests, SETTLE seconds of quiet);
  2. STREAMS concurrent `"stream": true` chat completions; once every one
     has received its first SSE event (all open at once), RSS -> KB per
     open stream; every stream is then read to `data: [DONE]` and checked;
  3. SETTLE and SETTLE_LONG seconds after the last one ended, RSS again
     -> ratio to idle (the later reading is the one judged), and once more
     after LIGHT_N sequential small requests;
  4. HALF_OPEN connections that send part of a request head and stall:
     RSS -> KB per connection; then how many the gateway closes, and when
     (its header-read timeout); RSS once they are gone;
  5. PER_IP_PROBE connections from one address (127.0.0.1), to see the
     per-IP connection cap close the excess at once.

Client sockets are spread over source addresses 127.0.0.2.. (at most
PER_IP each; all of 127/8 is loopback) so the per-IP cap does not cut the
stream and half-open tests short. Standard library only.

Usage: memory_client.py GATEWAY_PID PORT MODEL KEY   (settings from env)
Prints `MEM key=value ...` lines (parsed by memory.sh) and progress on stderr.
"""
import asyncio
import http.client
import os
import sys
import time

PID, PORT, MODEL, KEY = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
STREAMS = int(os.environ.get("STREAMS", "2000"))
HALF_OPEN = int(os.environ.get("HALF_OPEN", "3000"))
PER_IP = int(os.environ.get("PER_IP", "200"))
PER_IP_PROBE = int(os.environ.get("PER_IP_PROBE", "300"))
OPENING = int(os.environ.get("OPENING", "256"))  # streams being opened at once
SETTLE = float(os.environ.get("SETTLE", "10"))
# A second after-burst reading: allocators that give memory back do it with
# a delay (mimalloc, jemalloc's decay), glibc mostly not at all.
SETTLE_LONG = float(os.environ.get("SETTLE_LONG", "30"))
LIGHT_N = int(os.environ.get("LIGHT_N", "200"))  # requests after SETTLE_LONG
HALF_OPEN_WAIT = float(os.environ.get("HALF_OPEN_WAIT", "40"))

BODY = ('{"model":"%s","messages":[{"role":"user","content":"hi"}],"stream":true}' % MODEL).encode()
REQUEST = (
    "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
    "Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
    "Accept: text/event-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    % (PORT, KEY, len(BODY))
).encode() + BODY
PARTIAL_HEAD = ("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Slow: " % PORT).encode()


def log(msg):
    print("[memory] " + msg, file=sys.stderr, flush=True)


def status_kib(field):
    with open("/proc/%d/status" % PID) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss():
    return status_kib("VmRSS")


def source_ip(i):
    """127.0.0.2, 127.0.0.3, ... with at most PER_IP connections each."""
    n = 2 + i // PER_IP
    return "127.0.%d.%d" % (n // 250, n % 250 + 1) if n >= 250 else "127.0.0.%d" % n


def light_traffic(n):
    """n sequential small chat completions on one connection: some
    allocators only give freed memory back when a thread allocates again."""
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    body = BODY.replace(b'"stream":true', b'"stream":false')
    ok = 0
    for _ in range(n):
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": "Bearer " + KEY, "Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        ok += r.status == 200
    conn.close()
    return ok


def out(**kv):
    print("MEM " + " ".join("%s=%s" % (k, v) for k, v in kv.items()), flush=True)


class Streams:
    def __init__(self, n):
        self.n = n
        self.opened = 0
        self.done = 0
        self.failed = []
        self.done_before_all_open = 0
        self.all_open = asyncio.Event()
        self.gate = asyncio.Semaphore(OPENING)
        self.first_event_ms = []

    def mark_open(self):
        self.opened += 1
        if self.opened == self.n:
            self.all_open.set()

    async def one(self, i):
        opened = False
        writer = None
        try:
            async with self.gate:
                t0 = time.perf_counter()
                reader, writer = await asyncio.open_connection("127.0.0.1", PORT, local_addr=(source_ip(i), 0))
                writer.write(REQUEST)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
                status = head.split(b" ", 2)[1]
                if status != b"200":
                    rest = await asyncio.wait_for(reader.read(300), 5)
                    raise RuntimeError("HTTP %s %r" % (status.decode(), rest[:200]))
                buf = b""
                while b"data:" not in buf:
                    chunk = await asyncio.wait_for(reader.read(65536), 60)
                    if not chunk:
                        raise RuntimeError("closed before the first event")
                    buf += chunk
                self.first_event_ms.append((time.perf_counter() - t0) * 1000)
            opened = True
            self.mark_open()
            tail = buf[-64:]
            while b"data: [DONE]" not in tail:
                chunk = await asyncio.wait_for(reader.read(65536), 120)
                if not chunk:
                    raise RuntimeError("stream cut before data: [DONE]")
                tail = tail[-64:] + chunk
                if b'"error"' in chunk:
                    raise RuntimeError("error event %r" % chunk[:200])
            self.done += 1
            if not self.all_open.is_set():
                self.done_before_all_open += 1
        except Exception as e:  # noqa: BLE001 - every failure is reported
            self.failed.append("stream %d: %s: %s" % (i, type(e).__name__, e))
            if not opened:
                self.mark_open()  # do not wait for it forever
        finally:
            if writer is not None:
                writer.close()


async def wait_quiet(seconds):
    await asyncio.sleep(seconds)


async def half_open(n, ip_of, label):
    """n connections sending a partial head; returns (conns, close times)."""
    conns = []
    for i in range(n):
        try:
            r, w = await asyncio.open_connection("127.0.0.1", PORT, local_addr=(ip_of(i), 0))
            w.write(PARTIAL_HEAD)
            conns.append((r, w))
        except OSError as e:
            log("%s: connect %d failed: %s" % (label, i, e))
    return conns


async def watch_closes(conns, t0, limit):
    """Seconds after t0 at which the gateway closed each connection (None: still open at limit)."""
    async def one(r):
        try:
            left = limit - (time.monotonic() - t0)
            data = await asyncio.wait_for(r.read(4096), max(0.01, left))
            # A 408 or similar answer, or EOF: either way the gateway ended it.
            while data:
                data = await asyncio.wait_for(r.read(4096), max(0.01, limit - (time.monotonic() - t0)))
            return time.monotonic() - t0
        except asyncio.TimeoutError:
            return None
        except (ConnectionError, OSError):
            return time.monotonic() - t0
    return await asyncio.gather(*(one(r) for r, _ in conns))


def pct(vals, p):
    if not vals:
        return 0
    s = sorted(vals)
    return s[max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))]


async def stream_burst(idle):
    s = Streams(STREAMS)
    t0 = time.monotonic()
    tasks = [asyncio.create_task(s.one(i)) for i in range(STREAMS)]
    await s.all_open.wait()
    t_open = time.monotonic() - t0
    open_now = s.opened - s.done - len(s.failed)
    samples = []
    for _ in range(3):
        samples.append(rss())
        await asyncio.sleep(0.3)
    rss_open = max(samples)
    log("all %d opened in %.1f s (%d open right now); RSS %.1f MiB" % (STREAMS, t_open, open_now, rss_open / 1024))
    out(phase="open", streams=STREAMS, open_now=open_now, open_seconds="%.1f" % t_open,
        rss_kib=rss_open, first_event_p50_ms="%.0f" % pct(s.first_event_ms, 50),
        first_event_p99_ms="%.0f" % pct(s.first_event_ms, 99))
    await asyncio.gather(*tasks)
    t_end = time.monotonic() - t0
    peak_after_streams = status_kib("VmHWM")
    log("streams ended after %.1f s: %d complete, %d failed; settling %.0f s" % (
        t_end, s.done, len(s.failed), SETTLE))
    for f in s.failed[:5]:
        log("FAILED " + f)
    await asyncio.sleep(SETTLE)
    after = rss()
    await asyncio.sleep(max(0.0, SETTLE_LONG - SETTLE))
    after_long = rss()
    light_ok = await asyncio.to_thread(light_traffic, LIGHT_N)
    await asyncio.sleep(1.0)
    after_light = rss()
    out(phase="after_streams", rss_kib=after, rss_long_kib=after_long, rss_light_kib=after_light,
        light_ok=light_ok, light_n=LIGHT_N, hwm_kib=peak_after_streams,
        complete=s.done, failed=len(s.failed), done_before_all_open=s.done_before_all_open,
        seconds="%.1f" % t_end)
    return len(s.failed)


async def main():
    await wait_quiet(SETTLE)
    idle = rss()
    out(phase="idle", rss_kib=idle, hwm_kib=status_kib("VmHWM"))
    log("idle RSS %.1f MiB; opening %d streams" % (idle / 1024, STREAMS))

    failed = 0
    if STREAMS > 0:
        failed = await stream_burst(idle)
    else:
        log("STREAMS=0: no stream burst; half-open connections on a fresh process")

    # Half-open connections, spread over source addresses.
    base = rss()
    log("opening %d half-open connections" % HALF_OPEN)
    t1 = time.monotonic()
    conns = await half_open(HALF_OPEN, source_ip, "half-open")
    await asyncio.sleep(1.0)  # let the gateway accept and read them
    ho = max(rss(), rss())
    out(phase="half_open", opened=len(conns), rss_before_kib=base, rss_kib=ho)
    log("%d half-open; RSS %.1f -> %.1f MiB; waiting up to %.0f s for the gateway to close them" % (
        len(conns), base / 1024, ho / 1024, HALF_OPEN_WAIT))
    closes = await watch_closes(conns, t1, HALF_OPEN_WAIT)
    closed = [c for c in closes if c is not None]
    for _, w in conns:
        w.close()
    await asyncio.sleep(SETTLE)
    out(phase="half_open_closed", closed=len(closed), still_open=len(closes) - len(closed),
        close_min_s="%.1f" % (min(closed) if closed else -1), close_p50_s="%.1f" % pct(closed, 50),
        close_max_s="%.1f" % (max(closed) if closed else -1), wait_s="%.0f" % HALF_OPEN_WAIT, rss_kib=rss())

    # Per-IP cap: PER_IP_PROBE connections from 127.0.0.1 alone.
    if PER_IP_PROBE > 0:
        t2 = time.monotonic()
        probe = await half_open(PER_IP_PROBE, lambda i: "127.0.0.1", "per-ip probe")
        closes = await watch_closes(probe, t2, 2.0)
        for _, w in probe:
            w.close()
        out(phase="per_ip", opened=len(probe), closed_within_2s=sum(1 for c in closes if c is not None))

    out(phase="end", rss_kib=rss(), hwm_kib=status_kib("VmHWM"))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
