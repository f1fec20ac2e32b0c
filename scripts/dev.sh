#!/usr/bin/env bash
# Runs the whole gateway locally: `switchyard dev` (edge on :8080 and :8443,
# in-process egress, providers from *_API_KEY variables, simulated provider).
# Extra arguments go to `switchyard dev`, e.g. scripts/dev.sh --log-format pretty
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo run --release --bin switchyard -- dev "$@"
