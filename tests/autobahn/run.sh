#!/usr/bin/env bash
# The WebSocket layer against the Autobahn TestSuite (the `fuzzingclient`
# of autobahntestsuite 0.8.2, on Python 2.7 from pyenv): cases 1-10 must be
# OK, NON-STRICT or INFORMATIONAL; 12 and 13 (compression, which the hub
# does not negotiate) must be UNIMPLEMENTED. The server is the
# `autobahn_echo` example: the hub's own frame reader, outbound queue and
# socket writer, echoing every message.
#
#   bash tests/autobahn/run.sh            # from the repository root
#
# The suite is installed once into target/autobahn/py (pip --target: no
# change to the machine's Python); reports go to target/autobahn/reports
# (index.html there shows every case).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=tests/autobahn
work=target/autobahn
mkdir -p "$work"

py2() { PYENV_VERSION=2.7.18 python "$@"; }
if ! py2 --version >/dev/null 2>&1; then
  echo "autobahn: Python 2.7.18 is needed (pyenv install 2.7.18)" >&2
  exit 1
fi
if [ ! -f "$work/py/.installed-0.8.2" ]; then
  echo "autobahn: installing autobahntestsuite 0.8.2 into $work/py"
  rm -rf "$work/py"
  py2 -m pip install -q --disable-pip-version-check --no-warn-script-location \
    --target "$work/py" autobahntestsuite==0.8.2 2>&1 | grep -v DEPRECATION || true
  touch "$work/py/.installed-0.8.2"
fi

cargo build -q --example autobahn_echo
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
target/debug/examples/autobahn_echo "127.0.0.1:$port" >"$work/echo.log" 2>&1 &
echo_pid=$!
trap 'kill "$echo_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do
  grep -q "^listening on" "$work/echo.log" 2>/dev/null && break
  sleep 0.1
done

sed "s/@PORT@/$port/" "$here/spec.json" >"$work/spec.json"
rm -rf "$work/reports"
(cd "$work" && py2 ../../$here/wstest.py py -m fuzzingclient -s spec.json >wstest.log 2>&1) || {
  echo "autobahn: wstest failed:" >&2
  tail -20 "$work/wstest.log" >&2
  exit 1
}
python3 "$here/check.py" "$work/reports/index.json"
