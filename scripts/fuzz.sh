#!/usr/bin/env bash
# Fuzzes the SSE decoder and every protocol translator with cargo-fuzz
# (libFuzzer): FUZZ_SECONDS per target (default 60). The normal test suite
# already runs a bounded, deterministic version (proto/llm/tests/robustness.rs).
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain
# accept them.
set -euo pipefail
cd "$(dirname "$0")/../proto/llm"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in sse_decoder stream_translators request_translators; do
  cargo fuzz run -O "$target" -- -max_total_time="${FUZZ_SECONDS:-60}"
done
