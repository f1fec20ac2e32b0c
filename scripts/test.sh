#!/usr/bin/env bash
# Runs every test: unit, fixture conformance, end-to-end (real binary, real
# sockets, mock providers, QUIC backhaul, control plane on SQLite and
# PostgreSQL), the official OpenAI/Anthropic Python SDKs, and the deployment
# files (kustomize overlays rendered, schema-validated and checked by
# checkov; alert rules checked and unit-tested by promtool; the status page
# loaded in headless Chromium).
# Installs what the tests need on a fresh machine first.
set -euo pipefail
cd "$(dirname "$0")/.."
SWITCHYARD_NEED_PYTHON=1 SWITCHYARD_NEED_OPS=1 bash scripts/setup.sh

if ! .venv/bin/python -c 'import openai, anthropic, google.genai, pytest' >/dev/null 2>&1; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/sdk/requirements.txt
fi
if ! [ -x .venv/bin/kubernetes-validate ] || ! [ -x .venv/bin/checkov ]; then
  .venv/bin/pip install -q --disable-pip-version-check -r tests/ops/requirements.txt
fi
export SWITCHYARD_PYTHON="$PWD/.venv/bin/python"
export SWITCHYARD_REQUIRE_SDK=1
export SWITCHYARD_REQUIRE_OPS=1

# A throwaway PostgreSQL (installed from Debian's packages when missing) for
# the control plane's PostgreSQL store and two-replica tests.
SWITCHYARD_TEST_PG_URL=$(bash tests/pg.sh)
export SWITCHYARD_TEST_PG_URL
trap 'bash tests/pg.sh stop' EXIT

cargo test --workspace "$@"
