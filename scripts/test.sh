#!/usr/bin/env bash
# The one test command (README quick start, .ci/run): installs what the tests need when it
# is missing — from the distribution's packages, when running as root on Debian/Ubuntu —
# then runs every test. Otherwise one line names what to install, and it exits 1.
# The real dev tools of tests/realtools.rs come from their registries, exact versions:
# the npm packages of tests/fixtures/realtools/package.json into
# ${CARGO_TARGET_DIR:-target}/npm-tools (exported as STYXY_TEST_NPM_TOOLS), and
# jupyter_server (tests/fixtures/realtools/requirements.txt) with pip.
# Each end-to-end test runs in a network namespace of its own (tests/common/mod.rs), which
# needs CAP_SYS_ADMIN: as root it has it; a normal user's run goes inside a user namespace
# (unshare --user --map-root-user), where the tests that need other real uids cannot run.
#   scripts/test.sh [ARGS for the runner...]     cargo nextest run (cargo test without it), e.g. scripts/test.sh preload::
#   scripts/test.sh --fast                       unit and protocol tests only (the inner loop)
set -euo pipefail
cd "$(dirname "$0")/.."

# the inner loop: unit tests of every crate and the daemon's protocol, no real tools
if [ "${1:-}" = --fast ]; then
  shift
  exec cargo test --workspace --lib --bins --test daemon_api --test daemon_hardening --test cli_hardening "$@"
fi

command -v cargo >/dev/null || { echo "test.sh: cargo not found: install Rust (https://rustup.rs), then run scripts/test.sh again" >&2; exit 1; }

# command the tests run : Debian package that provides it
needs=(
  cc:build-essential                          # the C fixtures (dynamic and static)
  python3:python3                             # servers and helpers in the end-to-end tests
  node:nodejs                                 # Node servers and child_process
  npm:npm                                     # the real Node tools (tests/realtools.rs)
  chromium:chromium                           # the browser Playwright drives (tests/realtools.rs)
  go:golang-go                                # the Go fixture of the seccomp tests
  systemd-socket-activate:systemd             # the socket-activation test
  caddy:caddy                                 # real servers run twice in two sessions:
  redis-server:redis-server                   #   caddy's admin API, redis's twin binds,
  hugo:hugo                                   #   hugo's printed URL
)
missing() {
  local pair out=()
  for pair in "${needs[@]}"; do
    command -v "${pair%%:*}" >/dev/null || out+=("${pair#*:}")
  done
  # PostgreSQL's server (two clusters in two sessions): Debian keeps it off PATH
  command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || out+=(postgresql)
  echo "${out[@]}"
}

pkgs=$(missing)
if [ -n "$pkgs" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing $pkgs (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086 # a list of package names
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends $pkgs; } >/tmp/styxy-test-apt.log 2>&1 ||
      { echo "test.sh: apt-get install $pkgs failed (log: /tmp/styxy-test-apt.log): install them, then run scripts/test.sh again" >&2; exit 1; }
    still=$(missing)
    [ -z "$still" ] || { echo "test.sh: still missing after apt-get: $still" >&2; exit 1; }
  else
    echo "test.sh: the tests need these packages (Debian/Ubuntu names): $pkgs — install them (e.g. sudo apt-get install $pkgs), or run scripts/test.sh as root to let it install them" >&2
    exit 1
  fi
fi

fixtures=tests/fixtures/realtools
# Each install says so in one line; its output goes to a log named on failure.
install() { # what log command...
  local what=$1 log=$2
  shift 2
  echo "test.sh: installing $what" >&2
  "$@" >"$log" 2>&1 || { echo "test.sh: installing $what failed (log: $log): install it by hand, then run scripts/test.sh again" >&2; exit 1; }
}

# npm packages, exact versions, into the target directory (never the global prefix);
# installed.json says an install of this very package.json finished
npm_tools=$(realpath -m "${CARGO_TARGET_DIR:-target}/npm-tools")
export STYXY_TEST_NPM_TOOLS=$npm_tools
if ! cmp -s "$fixtures/package.json" "$npm_tools/installed.json"; then
  mkdir -p "$npm_tools"
  cp "$fixtures/package.json" "$npm_tools/package.json"
  install "the npm packages of $fixtures/package.json into $npm_tools (npm install)" /tmp/styxy-test-npm.log \
    npm install --prefix "$npm_tools" --no-audit --no-fund --no-package-lock --no-update-notifier
  cp "$fixtures/package.json" "$npm_tools/installed.json"
fi

# Python packages of the real-program tests (jupyter_server, gunicorn, uvicorn), exact versions in
# requirements.txt, for python3 (the Python the tests run): pip, or pip told that a
# distribution-managed Python may take them (PEP 668)
if ! python3 - "$fixtures/requirements.txt" 2>/dev/null <<'PY'
import importlib.metadata as m, sys
pins = [l.split("#")[0].strip().split("==") for l in open(sys.argv[1])]
sys.exit(any(m.version(name) != version for name, version in (p for p in pins if len(p) == 2)))
PY
then
  pip=(python3 -m pip install -q --disable-pip-version-check -r "$fixtures/requirements.txt")
  install "the Python packages of $fixtures/requirements.txt (pip)" /tmp/styxy-test-pip.log sh -c '"$@" || "$@" --break-system-packages' pip "${pip[@]}"
fi

# everything the tests need is here now: a test that finds a program missing fails
export STYXY_TEST_INSTALLED=1
# cargo-nextest runs the tests of every binary side by side (each test is hermetic: its own
# network namespace, directories and daemon), four at a time as most of them wait on real
# processes; cargo test runs one binary after another
runner=(cargo test --workspace --no-fail-fast)
if cargo nextest --version >/dev/null 2>&1; then
  runner=(cargo nextest run --workspace --no-fail-fast --test-threads "${STYXY_TEST_THREADS:-4}")
fi
if [ "$(id -u)" != 0 ]; then
  runner=(unshare --user --map-root-user -- "${runner[@]}")
fi
exec "${runner[@]}" "$@"
