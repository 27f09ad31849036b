#!/usr/bin/env bash
# The Python package (clients/python) and the FastAPI example (examples/fastapi):
# a virtual environment of their own, type checks, and tests against the hub
# built here and a real Redis ($REDIS_URL, default redis://127.0.0.1:6379).
#
#   bash clients/python/ci.sh          # setup, then test
#   bash clients/python/ci.sh setup    # only target/venv-python (tests/python_worker.rs uses it)
#   bash clients/python/ci.sh test     # only the checks and tests
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=target/venv-python
PY=$VENV/bin/python
log() { printf '\n== %s\n' "$*"; }

setup() {
  if [ ! -x "$PY" ] || ! "$PY" -c 'import sys' >/dev/null 2>&1; then
    log "python: making $VENV"
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
      # Debian's python3 needs python3-venv for ensurepip.
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv) >/dev/null
      rm -rf "$VENV"
      python3 -m venv "$VENV"
    fi
  fi
  log "python: installing clients/python and the pinned test tools into $VENV"
  "$PY" -m pip install -q --disable-pip-version-check -r clients/python/requirements-dev.txt
  # As a user would: pip install ./clients/python (not editable).
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall ./clients/python
}

run_tests() {
  log "python: the hub the tests start (cargo build)"
  cargo build --quiet --bin switchboard
  log "python: mypy --strict (clients/python/src)"
  (cd clients/python && "../../$PY" -m mypy)
  log "python: pytest clients/python/tests examples/fastapi"
  "$PY" -m pytest -q -p no:cacheprovider -c clients/python/pyproject.toml --rootdir . \
    clients/python/tests examples/fastapi
}

case "${1:-all}" in
  setup) setup ;;
  test) run_tests ;;
  all) setup; run_tests ;;
  *) echo "usage: $0 [setup|test|all]" >&2; exit 2 ;;
esac
