//! The environment's switches, each read once per process and cached: disabled, the
//! session, isolation, the mode, the supervisor, rules of the process's own.

use core::ffi::CStr;
use core::sync::atomic::{AtomicU8, Ordering};

use crate::cstring::cstr;
use crate::decide::{self, Class, Mode};
use crate::libc_calls::{above_stdio, errno, getenv, set_errno, AT_FDCWD, O_CLOEXEC, O_NONBLOCK, O_RDONLY, STATX_INO};
use crate::sys::{close, open, read, statx};
use crate::{mapview, switch, NO, UNKNOWN, YES};

static ENABLED: AtomicU8 = AtomicU8::new(UNKNOWN);
static IN_SESSION: AtomicU8 = AtomicU8::new(UNKNOWN);
/// This process's session tag in the port map (0: not computed yet).
static TAG: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);
static ISOLATE: AtomicU8 = AtomicU8::new(UNKNOWN);
static OWN_RULES: AtomicU8 = AtomicU8::new(UNKNOWN);
static SUPERVISED: AtomicU8 = AtomicU8::new(UNKNOWN);

/// The value of `name` in the environment (without its NUL), `None` when unset.
///
/// # Safety
/// The bytes are used before the hook returns to the program, which may change its
/// environment afterwards (and does not meanwhile: `getenv`'s own condition).
pub(crate) unsafe fn env<'a>(name: &CStr) -> Option<&'a [u8]> {
    // SAFETY: `getenv` takes a NUL-terminated name and answers null or such a string,
    // unchanged while it is used (this function's contract).
    unsafe { cstr(getenv(name.as_ptr())) }
}

/// Set and not empty.
fn set(v: Option<&[u8]>) -> bool {
    v.is_some_and(|v| !v.is_empty())
}

/// `name`'s value passed `test`, once a process (cached); errno as it was (a test may
/// look at files: `statx`, `/proc/self/status`).
fn env_flag(cache: &AtomicU8, name: &CStr, test: fn(Option<&[u8]>) -> bool) -> bool {
    match cache.load(Ordering::Relaxed) {
        YES => true,
        NO => false,
        _ => {
            let saved = errno();
            // SAFETY: the value is tested here and not kept.
            let yes = test(unsafe { env(name) });
            cache.store(if yes { YES } else { NO }, Ordering::Relaxed);
            set_errno(saved);
            yes
        }
    }
}

/// `STYXY_PRELOAD_DISABLE` unset, empty or `0` ([`switch::disables`]), and the process
/// in the daemon's network namespace (`STYXY_PRELOAD_NETNS`, set by `exec` and `env`): in
/// another one (`unshare -n`, a container), ports are that namespace's, and every call is
/// left alone.
pub(crate) fn enabled() -> bool {
    env_flag(&ENABLED, c"STYXY_PRELOAD_DISABLE", |v| !switch::disables(v) && !foreign_netns())
}

/// `STYXY_PRELOAD_NETNS` names a network namespace (the inode of the daemon's
/// `/proc/<pid>/ns/net`) and this process is in another one.
fn foreign_netns() -> bool {
    // SAFETY: parsed here and not kept.
    let Some(want) = (unsafe { env(c"STYXY_PRELOAD_NETNS") }).and_then(number) else {
        return false;
    };
    let mut st = [0u8; 256];
    // SAFETY: a NUL-terminated path; statx writes a `struct statx` (256 bytes) into `st`.
    if unsafe { statx(AT_FDCWD, c"/proc/self/ns/net".as_ptr(), 0, STATX_INO, st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: stx_ino, within `st`, read unaligned.
    let ino = unsafe { core::ptr::read_unaligned(st.as_ptr().add(32).cast::<u64>()) };
    ino != want
}

/// A decimal number of at most 19 digits.
fn number(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0')))
}

pub(crate) fn in_session() -> bool {
    env_flag(&IN_SESSION, c"STYXY_PRELOAD_SESSION", set)
}

/// The process runs under `exec`'s seccomp supervisor, which decides its calls itself:
/// the shim leaves every one alone. `STYXY_PRELOAD_SUPERVISED` says how many seccomp
/// filters a supervised process has at least, and this one must have as many: the
/// variable alone may have leaked into a process outside the supervised tree, or the
/// filter been refused, and such a process is the shim's.
pub(crate) fn supervised() -> bool {
    env_flag(&SUPERVISED, c"STYXY_PRELOAD_SUPERVISED", |v| v.and_then(number).is_some_and(|n| n > 0 && seccomp_filters() >= n))
}

/// This process's seccomp filters: `Seccomp_filters` in `/proc/self/status` (Linux 5.9+;
/// before, where only `Seccomp: 2` says a filter is on, as many as asked: the count cannot
/// be told, and the variable is trusted); 0 when it cannot be read.
fn seccomp_filters() -> u64 {
    let mut status = [0u8; 4096];
    // SAFETY: a NUL-terminated path; the fd is ours, closed below.
    let fd = above_stdio(unsafe { open(c"/proc/self/status".as_ptr(), O_RDONLY | O_NONBLOCK | O_CLOEXEC) });
    if fd < 0 {
        return 0;
    }
    let mut n = 0;
    while let Some(rest) = status.get_mut(n..).filter(|r| !r.is_empty()) {
        // SAFETY: read writes at most `rest.len()` bytes into `rest`, part of `status`.
        let got = unsafe { read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        match usize::try_from(got) {
            Ok(0) | Err(_) => break,
            Ok(got) => n += got,
        }
    }
    // SAFETY: our own fd, opened above.
    unsafe { close(fd) };
    let text = status.get(..n).unwrap_or_default();
    let field = |name: &[u8]| {
        let at = text.windows(name.len()).position(|w| w == name)? + name.len();
        let value = text.get(at..)?.split(|c| *c == b'\n').next()?.trim_ascii();
        number(value)
    };
    field(b"\nSeccomp_filters:").unwrap_or_else(|| if field(b"\nSeccomp:") == Some(2) { u64::MAX } else { 0 })
}

/// The class a rule of the process's own (`STYXY_PRELOAD_PORTS`) gives `port`
/// ([`decide::rule_class`]); `None` when no rule covers it (or there are none).
pub(crate) fn rule_class(port: u16) -> Option<Class> {
    if !env_flag(&OWN_RULES, c"STYXY_PRELOAD_PORTS", set) {
        return None;
    }
    // SAFETY: parsed here and not kept.
    decide::rule_class(unsafe { env(c"STYXY_PRELOAD_PORTS") }?, port)
}

/// `STYXY_PRELOAD_ISOLATE` not turned off ([`switch::is_off`]).
pub(crate) fn isolate() -> bool {
    env_flag(&ISOLATE, c"STYXY_PRELOAD_ISOLATE", |v| !v.is_some_and(switch::is_off))
}

/// The session's tag (`mapview::tag` of `STYXY_PRELOAD_SESSION`), computed once.
pub(crate) fn session_tag() -> Option<u32> {
    let t = TAG.load(Ordering::Relaxed);
    if t != 0 {
        return Some(t);
    }
    // SAFETY: hashed here and not kept.
    let t = mapview::tag(unsafe { env(c"STYXY_PRELOAD_SESSION") }?);
    TAG.store(t, Ordering::Relaxed);
    Some(t)
}

/// The process's mode (`STYXY_PRELOAD_MODE`; `STYXY_DISABLE_REASSIGN` set to 1, true or
/// yes means observe), read as the supervisor reads it (`process::Process::from_vars`),
/// once.
pub(crate) fn mode() -> Mode {
    static MODE: AtomicU8 = AtomicU8::new(UNKNOWN);
    const MODES: [Mode; 4] = [Mode::Coordinate, Mode::OnConflict, Mode::Observe, Mode::Fallback];
    if let Some(m) = MODES.get(usize::from(MODE.load(Ordering::Relaxed)).wrapping_sub(1)) {
        return *m;
    }
    // SAFETY: each value is read here and not kept.
    let (reassign, named) = unsafe { (env(c"STYXY_DISABLE_REASSIGN"), env(c"STYXY_PRELOAD_MODE")) };
    let off = reassign.map(trim).is_some_and(|v| [&b"1"[..], b"true", b"yes"].iter().any(|w| v.eq_ignore_ascii_case(w)));
    let m = match named.map(trim) {
        _ if off => Mode::Observe,
        Some(b"on-conflict") => Mode::OnConflict,
        Some(b"observe") => Mode::Observe,
        Some(b"fallback") => Mode::Fallback,
        _ => Mode::Coordinate,
    };
    let at = MODES.iter().position(|x| *x == m).unwrap_or(0);
    MODE.store(at as u8 + 1, Ordering::Relaxed);
    m
}

/// `v` without the whitespace around it.
fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}
