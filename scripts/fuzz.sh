#!/usr/bin/env bash
# Fuzzes the SSE decoder, every protocol translator and the policy parser
# with cargo-fuzz (libFuzzer): FUZZ_SECONDS per target (default 60). The
# normal test suite already runs bounded, deterministic versions
# (proto/llm/tests/robustness.rs, control-plane/tests/policy_robustness.rs).
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain
# accept them.
set -euo pipefail
cd "$(dirname "$0")/../proto/llm"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in sse_decoder stream_translators request_translators; do
  cargo fuzz run -O "$target" -- -max_total_time="${FUZZ_SECONDS:-60}"
done
cd ../../control-plane
cargo fuzz run -O policy_parser -- -max_total_time="${FUZZ_SECONDS:-60}"
