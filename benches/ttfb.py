#!/usr/bin/env python3
"""Streaming time-to-first-byte, direct vs through the gateway.

Sends N sequential `"stream": true` chat completions over one persistent
HTTP/1.1 connection per target, alternating direct / gateway so both see the
same machine noise, and measures per request (perf_counter, microseconds):

  head_us   request sent -> status line and headers received
  first_us  request sent -> first body bytes (the first SSE event) received
  total_us  request sent -> stream complete ("data: [DONE]")

Usage: ttfb.py N DIRECT_PORT DIRECT_MODEL GATEWAY_PORT GATEWAY_MODEL KEY
       ttfb.py N TAG:PORT:MODEL[:KEY] [TAG:PORT:MODEL[:KEY] ...]

The second form takes any number of targets (benches/peers.sh: direct,
nginx, LiteLLM, Switchyard, ...), visited in rotation; the key defaults to
"x". Prints one `TTFB tag=... ` line per target (parsed by benches/run.sh
and benches/peers.sh). Standard library only.
"""
import http.client
import json
import sys
import time

WARMUP = 20


def percentile(sorted_vals, p):
    if not sorted_vals:
        return 0
    # nearest-rank, like wrk/HdrHistogram (value at or below which p% fall)
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


class Target:
    def __init__(self, tag, port, model, key):
        self.tag = tag
        self.port = port
        self.body = json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        ).encode()
        self.headers = {
            "Content-Type": "application/json",
            "Authorization": "Bearer " + key,
            "Accept": "text/event-stream",
        }
        self.conn = None
        self.head, self.first, self.total = [], [], []
        self.failures = []
        self.reconnects = 0

    def one(self, record):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.conn.connect()
            self.reconnects += 1
        t0 = time.perf_counter()
        self.conn.request("POST", "/v1/chat/completions", body=self.body, headers=self.headers)
        resp = self.conn.getresponse()
        t_head = time.perf_counter()
        first = resp.read1(65536)
        t_first = time.perf_counter()
        rest = resp.read()
        t_end = time.perf_counter()
        body = first + rest
        ok = resp.status == 200 and b"data: [DONE]" in body and b'"error"' not in body
        if resp.will_close:
            self.conn.close()
            self.conn = None
        if not ok:
            self.failures.append("status=%d body=%r" % (resp.status, body[:200]))
            return
        if record:
            self.head.append((t_head - t0) * 1e6)
            self.first.append((t_first - t0) * 1e6)
            self.total.append((t_end - t0) * 1e6)

    def report(self):
        h, f, t = sorted(self.head), sorted(self.first), sorted(self.total)
        print(
            "TTFB tag=%s n=%d failures=%d connections=%d "
            "head_p50_us=%d head_p99_us=%d first_p50_us=%d first_p99_us=%d "
            "total_p50_us=%d total_p99_us=%d"
            % (
                self.tag, len(f), len(self.failures), self.reconnects,
                percentile(h, 50), percentile(h, 99), percentile(f, 50), percentile(f, 99),
                percentile(t, 50), percentile(t, 99),
            )
        )
        for msg in self.failures[:5]:
            print("TTFB-FAILURE tag=%s %s" % (self.tag, msg), file=sys.stderr)


def parse_targets(args):
    """The positional form of run.sh, or TAG:PORT:MODEL[:KEY] specs."""
    if len(args) == 5 and ":" not in args[0]:
        return [Target("direct", int(args[0]), args[1], args[4]),
                Target("gateway", int(args[2]), args[3], args[4])]
    targets = []
    for spec in args:
        parts = spec.split(":", 3)
        if len(parts) < 3:
            sys.exit("bad target %r: want TAG:PORT:MODEL[:KEY]" % spec)
        targets.append(Target(parts[0], int(parts[1]), parts[2], parts[3] if len(parts) > 3 else "x"))
    return targets


def main():
    n = int(sys.argv[1])
    targets = parse_targets(sys.argv[2:])
    if not targets:
        sys.exit(__doc__)
    for i in range(WARMUP + n):
        record = i >= WARMUP
        # Rotate which goes first so no target always follows the same one.
        k = i % len(targets)
        for t in targets[k:] + targets[:k]:
            try:
                t.one(record)
            except (OSError, http.client.HTTPException) as e:
                t.failures.append("%s: %s" % (type(e).__name__, e))
                if t.conn is not None:
                    t.conn.close()
                    t.conn = None
    for t in targets:
        t.report()


if __name__ == "__main__":
    main()
