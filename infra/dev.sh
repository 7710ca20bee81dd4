#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu machine with Python >= 3.11:
#   bash infra/dev.sh up [emofleet up flags]   set up, then run the pipeline on the embedded stack
#   bash infra/dev.sh test [pytest flags]      set up, then run the whole test suite
#   bash infra/dev.sh setup                    set up only
#   bash infra/dev.sh check-install            `pip install .` (no extras, as the Dockerfile does) into a
#                                              separate virtualenv, then import every backend it must ship
# Set-up is idempotent: system packages only when missing, a virtualenv refreshed only when pyproject.toml
# changed since its last install.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[emofleet setup] %s\n' "$*" >&2; }

find_python() {
  for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  log "Python >= 3.11 not found; install it (e.g. apt-get install python3.11 python3.11-venv) or set PYTHON"
  exit 1
}

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! command -v apt-get >/dev/null 2>&1; then
    log "please install: $* (no apt-get here)"; return 1
  fi
  log "installing system packages: $*"
  $sudo apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

system_packages() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)   # decodes containers libsndfile cannot (m4a, aac, ...)
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)  # validates docker-compose.yml offline
  command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)  # real speech for the segmentation tests and bench
  command -v sox >/dev/null 2>&1 || missing+=(sox)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium chromium-driver)  # the gateway page's browser test
  if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}" || log "continuing without: ${missing[*]}"
  fi
}

pyproject_stamp() { sha256sum pyproject.toml | cut -d' ' -f1; }

virtualenv() {
  local python stamp
  python=$(find_python)
  [ -x .venv/bin/python ] || { log "creating .venv"; "$python" -m venv .venv; }
  stamp=$(pyproject_stamp)
  if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
    log "installing the project and its pinned dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test,bench]"
    echo "$stamp" > .venv/.installed
  fi
}

# Outside the work tree, so fresh clones (CI) reuse it while pyproject.toml is unchanged.
PRODUCTION_VENV=${EMOFLEET_PRODUCTION_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/emofleet/production-venv}

check_install() {
  local stamp
  stamp=$(pyproject_stamp)
  if [ "$(cat "$PRODUCTION_VENV/.installed" 2>/dev/null)" != "$stamp" ]; then
    log "installing the project without extras into $PRODUCTION_VENV"
    rm -rf "$PRODUCTION_VENV"
    "$(find_python)" -m venv "$PRODUCTION_VENV"
    "$PRODUCTION_VENV/bin/python" -m pip install -q --upgrade pip
    # the CPU build of the pinned torch first (on local disk here); a bare resolve may pick the CUDA build
    "$PRODUCTION_VENV/bin/python" -m pip install -q "$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')"
    "$PRODUCTION_VENV/bin/python" -m pip install -q .
    echo "$stamp" > "$PRODUCTION_VENV/.installed"
  fi
  # -P: import the installed dependencies, never this tree's modules
  "$PRODUCTION_VENV/bin/python" -P infra/check_imports.py
}

setup() { system_packages; virtualenv; }

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  setup) setup ;;
  check-install) check_install ;;
  up)    setup; exec .venv/bin/emofleet up "$@" ;;
  test)  setup; exec .venv/bin/python -m pytest "$@" ;;
  *)     echo "usage: bash infra/dev.sh {up|test|setup|check-install} [args...]" >&2; exit 2 ;;
esac
