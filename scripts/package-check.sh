#!/usr/bin/env bash
# CI check of the Debian package: builds it with `cargo deb`, installs it with dpkg -i, runs the
# installed CLI from /tmp with two `python3 -m http.server` on one port (both serve: the second
# is moved), checks `status` and the completions, removes the package and checks that no file
# of it is left. Needs root; refuses to touch an styxy-preload package installed beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "package-check: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i / dpkg -r)"
command -v dpkg >/dev/null || fail "needs dpkg (Debian/Ubuntu)"
if dpkg-query -W -f '${Status}' styxy-preload 2>/dev/null | grep -q 'ok installed'; then
  fail "a styxy-preload package is already installed here; this check installs and removes its own (dpkg -r styxy-preload first)"
fi
command -v cargo-deb >/dev/null || { echo "package-check: installing cargo-deb" >&2; cargo install cargo-deb --locked -q; }

W=$(mktemp -d /tmp/styxy-package-check.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -- -"$p" 2>/dev/null || true; done
  [ -x /usr/bin/styxy-preload ] && /usr/bin/styxy-preload daemon stop >/dev/null 2>&1 || true
  for p in "${PIDS[@]}"; do kill -9 -- -"$p" 2>/dev/null || true; done
  if dpkg-query -W -f '${Status}' styxy-preload 2>/dev/null | grep -q 'ok installed'; then dpkg -r styxy-preload >/dev/null 2>&1 || true; fi
  rm -rf "$W"
}
trap cleanup EXIT
start=$(date +%s)
cargo deb -q >"$W/deb.out" 2>"$W/deb.err" || fail "cargo deb failed: $(tail -n 5 "$W/deb.err")"
deb=$(tail -n 1 "$W/deb.out")
[ -f "$deb" ] || fail "cargo deb printed no package path"
echo "package-check: built $deb in $(($(date +%s) - start)) s"
contents=$(dpkg-deb -c "$deb")
for want in ./usr/bin/styxy-preload ./usr/lib/styxy-preload/libstyxy_preload.so \
  ./usr/share/man/man1/styxy-preload.1.gz ./usr/share/bash-completion/completions/styxy-preload \
  ./usr/share/zsh/vendor-completions/_styxy-preload ./usr/share/fish/vendor_completions.d/styxy-preload.fish \
  ./usr/lib/systemd/user/styxy-preload.socket ./usr/lib/systemd/user/styxy-preload.service ./usr/share/doc/styxy-preload/README.md; do
  grep -q " $want\$" <<<"$contents" || fail "the package lacks $want"
done

# a private world (after the build: rustup finds its toolchains through HOME): nothing of the machine's daemon, log or state is used
export HOME=$W/home XDG_RUNTIME_DIR=$W/run XDG_STATE_HOME=$W/state XDG_CONFIG_HOME=$W/config
mkdir -p "$HOME" "$XDG_RUNTIME_DIR" "$XDG_STATE_HOME" "$XDG_CONFIG_HOME"
chmod 700 "$XDG_RUNTIME_DIR"
unset STYXY_URL STYXY_PRELOAD_SESSION STYXY_DAEMON_HOST LD_PRELOAD
export STYXY_DAEMON_PORT=1 # never an upstream Styxy of this machine

dpkg -i "$deb" >"$W/dpkg.log" 2>&1 || fail "dpkg -i failed: $(tail -n 3 "$W/dpkg.log")"

# the first free port from 8000 (another job may hold 8000 on a shared machine)
P=$(python3 -c '
import socket
for p in range(8000, 8100):
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", p)); print(p); break
    except OSError: pass
    finally: s.close()')
serves() { python3 -c 'import sys, urllib.request; urllib.request.urlopen("http://127.0.0.1:%s/" % sys.argv[1], timeout=2)' "$1" 2>/dev/null; }
wait_until() { # SECS CMD...: polls CMD every 0.1 s
  local i n=$(($1 * 10)); shift
  for ((i = 0; i < n; i++)); do "$@" && return 0; sleep 0.1; done
  return 1
}
(cd /tmp && exec setsid /usr/bin/styxy-preload exec -- python3 -m http.server "$P" >"$W/s1.out" 2>"$W/s1.err") & PIDS+=($!)
wait_until 10 serves "$P" || fail "the installed exec: the first server on $P does not serve ($(cat "$W/s1.err"))"
(cd /tmp && exec setsid /usr/bin/styxy-preload exec -- python3 -m http.server "$P" >"$W/s2.out" 2>"$W/s2.err") & PIDS+=($!)
moved() { grep -o "port $P is taken; .* got [0-9]*" "$W/s2.err" | grep -o '[0-9]*$'; }
wait_until 10 moved >/dev/null || fail "the installed exec: the second server was not moved off $P ($(cat "$W/s2.err"))"
P2=$(moved)
wait_until 10 serves "$P2" || fail "the second server does not serve on $P2"
serves "$P" || fail "the first server stopped serving on $P"
echo "package-check: /usr/bin/styxy-preload exec from /tmp: two servers asked for $P, both serve ($P and $P2)"
(cd /tmp && /usr/bin/styxy-preload status >"$W/status" 2>&1) || fail "the installed status fails: $(grep -v '^[✓·]' "$W/status")"
grep -q "✓ library: /usr/lib/styxy-preload/libstyxy_preload.so" "$W/status" || fail "status does not use the packaged library: $(head -n 1 "$W/status")"

bash -n /usr/share/bash-completion/completions/styxy-preload || fail "the bash completion does not parse"
bash -c '. /usr/share/bash-completion/completions/styxy-preload && complete -p styxy-preload' >/dev/null || fail "the bash completion registers nothing"
if command -v zsh >/dev/null; then zsh -n /usr/share/zsh/vendor-completions/_styxy-preload || fail "the zsh completion does not parse"; fi
if command -v fish >/dev/null; then fish -n /usr/share/fish/vendor_completions.d/styxy-preload.fish || fail "the fish completion does not parse"; fi
if command -v man >/dev/null; then man -w styxy-preload >/dev/null 2>&1 || fail "man styxy-preload finds no page"; fi
echo "package-check: completions parse, man page and systemd user units installed"

for p in "${PIDS[@]}"; do kill -- -"$p" 2>/dev/null || true; done
/usr/bin/styxy-preload daemon stop >/dev/null 2>&1 || true
PIDS=()
dpkg -r styxy-preload >"$W/dpkg.log" 2>&1 || fail "dpkg -r failed: $(tail -n 3 "$W/dpkg.log")"
left=$(awk '{print $6}' <<<"$contents" | sed 's#^\.##' | while read -r f; do if [ -e "$f" ] && [ ! -d "$f" ]; then echo "$f"; fi; done)
[ -z "$left" ] || fail "after dpkg -r these remain: $left"
[ ! -e /usr/lib/styxy-preload ] || fail "after dpkg -r /usr/lib/styxy-preload remains"
echo "package-check: dpkg -r left nothing under /usr"
