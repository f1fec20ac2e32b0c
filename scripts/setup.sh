#!/usr/bin/env bash
# Installs the system packages the build needs when they are missing:
# cmake and a C compiler (Pingora builds zlib-ng with CMake), python3-venv
# for the SDK tests, and for the deployment tests (SWITCHYARD_NEED_OPS=1)
# kubectl (Debian's kubernetes-client: `kubectl kustomize` renders the
# overlays), promtool (Debian's prometheus: checks the alert rules) and
# chromium (loads the control plane's status page).
# redis-server for the shared-limit tests. Sourced by dev.sh and test.sh.
set -euo pipefail

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
if [ "${SWITCHYARD_NEED_PYTHON:-0}" = 1 ]; then
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
  # Shared tenant limit counters: tests start throwaway instances.
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
fi
if [ "${SWITCHYARD_NEED_OPS:-0}" = 1 ]; then
  command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  # The status page is loaded in headless Chromium (tests/ops_status.rs).
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  # No recommends: prometheus would bring node-exporter and more along.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
