#!/usr/bin/env bash
# Install Py Dragon Swarm into ./.venv. Usage: scripts/install.sh [EXTRAS], e.g. "test".
# llama-cpp-python compiles from source the first time (about 9 minutes on 2 cores);
# pip keeps the wheel in its cache, so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing python3-venv (needs root or sudo)" >&2
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq python3-venv
fi
if ! command -v cc >/dev/null || ! command -v cmake >/dev/null; then
  echo "installing a C/C++ toolchain and cmake for llama.cpp (needs root or sudo)" >&2
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq build-essential cmake
fi

if [ "$extras" = "test" ] && ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium for the dashboard's browser tests (needs root or sudo)" >&2
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
fi

# Only orchestrator replicas (`--redis`, `dragon up --replicas`) and their tests need a Redis
# server, so without root or sudo this warns and goes on. Debian's package also starts its own
# service on 127.0.0.1:6379; the project never uses it: it starts its own, with a password.
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then sudo_cmd=""; elif command -v sudo >/dev/null; then sudo_cmd="sudo"; else sudo_cmd="none"; fi
  echo "installing Debian's redis-server for orchestrator replicas (--redis) and their tests" >&2
  if [ "$sudo_cmd" = "none" ] || ! { $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq redis-server; }; then
    echo "warning: could not install redis-server (needs root or sudo): one orchestrator on SQLite works," \
      "but replicas (--redis) and their tests need it: apt-get install redis-server" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
target="."; [ -n "$extras" ] && target=".[$extras]"
echo "installing dragonswarm${extras:+ with $extras} (a first llama.cpp build takes several minutes)..." >&2
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  .venv/bin/python -m pip install --progress-bar off -q -e "$target"
