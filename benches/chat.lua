-- wrk script: POST a small non-streaming chat completion and, when the run
-- ends, print one machine-readable line that benches/run.sh parses.
--
-- Environment:
--   BENCH_MODEL  model name to send (default "openai/gpt-4o-mini")
--   BENCH_KEY    bearer key (default "x")
--   BENCH_TAG    label printed on the result line (default "run")
--   BENCH_STREAM "1" to request an SSE stream (the whole stream is timed)
--   BENCH_DELAY_MS  pause (ms) before each request on a connection, for a
--                   modest rate instead of saturation (default: none)

local model = os.getenv("BENCH_MODEL") or "openai/gpt-4o-mini"
local key = os.getenv("BENCH_KEY") or "x"

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
local stream = os.getenv("BENCH_STREAM") == "1" and "true" or "false"
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"hi"}],"stream":' .. stream .. '}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key

local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "")
if delay_ms and delay_ms > 0 then
   -- Only defined when asked for: wrk calls it before every request.
   function delay()
      return delay_ms
   end
end

-- No response() callback on purpose: defining one makes wrk hand every
-- response's headers and body to Lua, which would slow the client down.
-- wrk still counts status >= 400 in summary.errors.status.

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "BENCH tag=%s requests=%d duration_us=%d bytes=%d " ..
      "p50_us=%d p90_us=%d p99_us=%d p999_us=%d mean_us=%.1f max_us=%d " ..
      "err_connect=%d err_read=%d err_write=%d err_timeout=%d err_status=%d\n",
      os.getenv("BENCH_TAG") or "run",
      summary.requests, summary.duration, summary.bytes,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.mean, latency.max,
      e.connect, e.read, e.write, e.timeout, e.status))
end
