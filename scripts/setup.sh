#!/usr/bin/env bash
# Installs the system packages the build needs when they are missing:
# cmake and a C compiler (Pingora builds zlib-ng with CMake) and python3-venv
# for the SDK tests, redis-server for the shared-limit tests. Sourced by
# dev.sh and test.sh.
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
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
