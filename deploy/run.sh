#!/usr/bin/env bash
# Quick start on a fresh machine (Python 3.11+). Safe to run again.
#   bash deploy/run.sh demo [emotion-stream up options]   # the pipeline on the sample video
#   bash deploy/run.sh test [pytest options]              # the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

need_root() { if [ "$(id -u)" -ne 0 ]; then echo "sudo"; fi; }

apt_install() {
  # Install Debian packages that are missing; no-op when all are present.
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "please install: ${missing[*]}" >&2; return 1
  fi
  echo "installing ${missing[*]}" >&2
  $(need_root) apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $(need_root) apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

venv() {
  local extras=$1 stamp="$VENV/.installed-$1"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".${extras}"
    touch "$stamp"
  fi
}

case "${1:-}" in
  demo)
    shift
    venv ""
    exec "$VENV/bin/emotion-stream" up "$@"
    ;;
  test)
    shift
    apt_install redis-server ffmpeg python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp \
      gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \
      gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-tools prometheus docker-compose chromium chromium-driver \
      mosquitto mosquitto-clients $(command -v kubectl >/dev/null || echo kubernetes-client) \
      $(command -v node >/dev/null || echo nodejs npm)
    venv "[tensorflow,test]"
    "$VENV/bin/ruff" check .
    "$VENV/bin/mypy" shared services emotion_recognition.py
    exec "$VENV/bin/pytest" "$@"
    ;;
  *)
    echo "usage: bash deploy/run.sh demo|test [options]" >&2
    exit 2
    ;;
esac
