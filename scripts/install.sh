#!/usr/bin/env bash
# Installs styxy-preload into a prefix, or removes it from there.
#   scripts/install.sh [--prefix DIR] [--no-build | --from DIR]    default prefix: ~/.local (/usr/local as root)
#   scripts/install.sh --uninstall [--prefix DIR]
# Puts bin/styxy-preload, lib/styxy-preload/libstyxy_preload.so (where the CLI looks:
# <prefix>/bin/../lib/styxy-preload), the man pages, bash/zsh/fish completions, the systemd
# user units and the README under the prefix. Builds the release first when it is missing
# or older than its sources (CARGO_TARGET_DIR is honoured); --from DIR takes the binary and
# the libraries from DIR as they are.
set -euo pipefail

usage() { sed -n '2,9s/^# \{0,1\}//p' "$0"; }
die() { echo "install.sh: $*" >&2; exit 2; }

prefix="" uninstall=0 build=1 from=""
while [ $# -gt 0 ]; do
  case $1 in
    --prefix) [ $# -ge 2 ] && [ -n "$2" ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
    --prefix=*) prefix=${1#--prefix=}; [ -n "$prefix" ] || die "--prefix needs a directory"; shift ;;
    --uninstall) uninstall=1; shift ;;
    --no-build) build=0; shift ;;
    --from) [ $# -ge 2 ] && [ -d "$2" ] || die "--from needs the directory that holds styxy-preload and its libraries"; from=$(cd "$2" && pwd); build=0; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
if [ -z "$prefix" ]; then
  if [ "$(id -u)" = 0 ]; then prefix=/usr/local; else prefix=${HOME:?HOME is not set}/.local; fi
fi
case $prefix in /*) ;; *) prefix=$PWD/$prefix ;; esac
prefix=${prefix%/}
[ -n "$prefix" ] || die "refusing to install into /"

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# systemd reads user units from ~/.local/share/systemd/user and /usr/local/lib/systemd/user,
# /usr/lib/systemd/user; any other prefix gets lib/systemd/user (link the units from there).
if [ -n "${HOME:-}" ] && [ "$prefix" = "${HOME%/}/.local" ]; then unitdir=share/systemd/user; else unitdir=lib/systemd/user; fi

# prefix-relative destination → source in the repository (or the build)
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$root/$target ;; esac
built=${from:-$target/release}
files=(
  "bin/styxy-preload=$built/styxy-preload"
  "lib/styxy-preload/libstyxy_preload.so=$built/libstyxy_preload.so"
  "share/bash-completion/completions/styxy-preload=packaging/completions/styxy-preload.bash"
  "share/zsh/site-functions/_styxy-preload=packaging/completions/_styxy-preload"
  "share/fish/vendor_completions.d/styxy-preload.fish=packaging/completions/styxy-preload.fish"
  "$unitdir/styxy-preload.socket=packaging/systemd/styxy-preload.socket"
  "$unitdir/styxy-preload.service=packaging/systemd/styxy-preload.service"
  "share/doc/styxy-preload/README.md=README.md"
)
for page in packaging/man/*.1; do files+=("share/man/man1/${page##*/}=$page"); done

if [ $uninstall = 1 ]; then
  if [ "$(id -u)" != 0 ] && command -v systemctl >/dev/null; then
    # stop and disable the socket unit if it is the one installed here
    frag=$(systemctl --user show -P FragmentPath styxy-preload.socket 2>/dev/null || true)
    if [ "$frag" = "$prefix/$unitdir/styxy-preload.socket" ]; then
      systemctl --user disable --now styxy-preload.socket styxy-preload.service >/dev/null 2>&1 || true
    fi
  fi
  removed=0
  for f in "${files[@]}" "share/man/man1/styxy-preload*.1"; do
    for p in "$prefix"/${f%%=*}; do
      if [ -f "$p" ] || [ -L "$p" ]; then rm -f "$p"; removed=$((removed + 1)); fi
    done
  done
  # directories left empty, up to (not including) the prefix
  for f in "${files[@]}"; do
    d=$(dirname "$prefix/${f%%=*}")
    while [ "$d" != "$prefix" ] && [ "${d#"$prefix"/}" != "$d" ] && rmdir "$d" 2>/dev/null; do d=$(dirname "$d"); done
  done
  echo "removed $removed files of styxy-preload from $prefix"
  exit 0
fi

# an artifact is stale when a source it is built from is newer (what cargo would rebuild)
stale() {
  local pair a
  for pair in "styxy-preload:src common/src daemon/src preload/src" \
    "libstyxy_preload.so:preload/shim preload/build.rs common/src"; do
    a=$built/${pair%%:*}
    [ -f "$a" ] || return 0
    # shellcheck disable=SC2086 # a list of paths
    [ -z "$(find ${pair#*:} -newer "$a" -type f -print -quit)" ] || return 0
  done
  return 1
}
if [ $build = 1 ] && stale; then
  command -v cargo >/dev/null || die "the release build is missing or stale and cargo is not on PATH: run \`cargo build --release --workspace\` first (or install Rust)"
  echo "building the release (cargo build --release --workspace)…"
  cargo build --release --workspace -q
fi
for f in "${files[@]}"; do
  [ -f "${f#*=}" ] || die "${f#*=} is missing: run \`cargo build --release --workspace\` first${from:+ (or fix --from)}"
done

for f in "${files[@]}"; do
  dst=$prefix/${f%%=*} src=${f#*=}
  case $dst in */bin/*) mode=755 ;; *) mode=644 ;; esac
  install -d -m 755 "$(dirname "$dst")"
  case $src in
    *.service)
      # the unit runs this prefix's binary
      tmp=$(mktemp)
      sed "s#/usr/bin/styxy-preload#$prefix/bin/styxy-preload#" "$src" >"$tmp"
      install -m 644 "$tmp" "$dst"
      rm -f "$tmp"
      ;;
    *) install -m $mode "$src" "$dst" ;;
  esac
done
# a running user manager sees new units after a reload
if [ "$(id -u)" != 0 ] && command -v systemctl >/dev/null; then systemctl --user daemon-reload >/dev/null 2>&1 || true; fi

echo "installed styxy-preload into $prefix:"
echo "  $prefix/bin/styxy-preload, $prefix/lib/styxy-preload/ (libraries), man pages, completions, $prefix/$unitdir/ (systemd user units)"
case ":$PATH:" in *":$prefix/bin:"*) ;; *) echo "  note: $prefix/bin is not on PATH" ;; esac
case $unitdir in
  share/systemd/user) echo "  socket activation: systemctl --user enable --now styxy-preload.socket" ;;
  *) [ "$prefix" = /usr/local ] && echo "  socket activation (each user): systemctl --user enable --now styxy-preload.socket" ||
    echo "  socket activation: systemctl --user link $prefix/$unitdir/styxy-preload.{socket,service}, then systemctl --user enable --now styxy-preload.socket" ;;
esac
echo "  check it: styxy-preload status"
