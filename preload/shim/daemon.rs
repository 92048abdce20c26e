//! Reaching the daemon on `hook.sock` (docs/ARCHITECTURE.md "Hook ↔ daemon protocol"): a
//! connection of ours (bounded, above stdio, to our own uid's daemon; a socket-activated
//! one woken), the wait for its answer while it beats, and what was heard ([`Heard`]).

use core::ffi::c_int;
use core::sync::atomic::Ordering;

use crate::cstring::{append, decimal, put};
use crate::libc_calls::{
    above_stdio, errno, monotonic_ms, monotonic_us, set_errno, PollFd, SockLen, TimeVal, UCred, AF_UNIX, AT_FDCWD, AT_SYMLINK_NOFOLLOW,
    EACCES, EAGAIN, ECONNREFUSED, EINTR, ENOENT, ENOTDIR, MSG_DONTWAIT, MSG_NOSIGNAL, O_CLOEXEC, O_NONBLOCK, O_RDONLY, POLLIN,
    SCHED_RESET_ON_FORK, SOCK_CLOEXEC, SOCK_DGRAM, SOCK_NONBLOCK, SOCK_SEQPACKET, SOCK_STREAM, SOL_SOCKET, SO_PEERCRED, SO_SNDTIMEO,
    STATX_MODE_UID_SIZE, S_IFMT, S_IFSOCK, YIELDING_POLICIES,
};
use crate::maps::{own_uid, runtime_file, with_port_map, RUNTIME_PATH_MAX};
use crate::said::first_warning;
use crate::settings::env;
use crate::sys::{
    close, connect, getpid, getsockopt, open, poll, read, recv, sched_getscheduler, sched_yield, send, sendto, setsockopt, socket, statx,
};
use crate::tell::notice;
use crate::{hookproto, mapview};

/// How long a bind waits for the daemon when there is no port map to read its beat from:
/// the hooks' own allocate budget (`Timeouts::HOOK`). Then the bind goes as asked.
pub(crate) const HOOK_ANSWER_MS: u64 = 200;

/// One wait on the daemon (a connect to a full backlog, an answer) before its beat is
/// looked at again.
const SLICE_MS: c_int = 100;

/// Whether a bind goes on waiting for the daemon, `started` (monotonic ms) after it
/// began: while the daemon beats in the port map (alive, however busy the machine) and
/// patience lasts; a stopped or hung daemon's beat goes stale, and the bind goes as
/// asked (docs/ARCHITECTURE.md "Hook ↔ daemon protocol").
fn worth_waiting(started: u64) -> bool {
    let now = monotonic_ms();
    let waited = now.saturating_sub(started);
    let Some(liveness) = with_port_map(|m| m.liveness(now)) else {
        return waited < HOOK_ANSWER_MS;
    };
    waited < mapview::PATIENCE_MS
        && match liveness {
            mapview::Liveness::Alive => true,
            // a beat late on a machine that starves the daemon of CPU: alive while its
            // process runs or waits to, not when it is stopped or gone
            mapview::Liveness::Late(pid) => process_runs(pid),
            mapview::Liveness::Gone => false,
        }
}

/// Whether process `pid` runs or waits to (`/proc/<pid>/stat`, [`mapview::runs`]).
pub(crate) fn process_runs(pid: u32) -> bool {
    let mut path = [0u8; 32];
    let n = append(&mut path, 0, b"/proc/\0");
    let n = decimal(&mut path, n, pid);
    if n == 0 || append(&mut path, n, b"/stat\0") == 0 {
        return false;
    }
    let saved = errno();
    // SAFETY: `path` is NUL-terminated (append); the fd is ours, closed below.
    let fd = above_stdio(unsafe { open(path.as_ptr().cast(), O_RDONLY | O_NONBLOCK | O_CLOEXEC) });
    let mut stat = [0u8; 512];
    let n = if fd < 0 {
        -1
    } else {
        // SAFETY: read writes at most `stat.len()` bytes into `stat`; then our fd is closed.
        unsafe {
            let n = read(fd, stat.as_mut_ptr().cast(), stat.len());
            close(fd);
            n
        }
    };
    set_errno(saved);
    usize::try_from(n).ok().and_then(|n| stat.get(..n)).is_some_and(mapview::runs)
}

/// The native-endian `u32` at `at` in `st`.
pub(crate) fn u32_at(st: &[u8; 256], at: usize) -> u32 {
    st.get(at..at + 4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_ne_bytes)
}

/// How long a bind waits for a socket-activated daemon to start (its `hook.sock` to
/// appear) after this process's connection started it — a start is ~40 ms on an idle
/// machine, and its beat begins only with `hook.sock`, so a busy machine needs more than
/// [`HOOK_ANSWER_MS`] and nothing tells sooner that it comes —; and the slice it looks
/// again after.
const ACTIVATION_MS: u64 = 500;

const ACTIVATION_SLICE_MS: c_int = 5;

/// The pid of this process once a daemon it woke brought no `hook.sock` in time (one
/// that runs without it): not woken, nor waited for, again.
static WOKEN_IN_VAIN: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// A connection to the daemon's `hook.sock` ([`hook_socket_once`]). When nothing listens
/// there but a manager (systemd) holds the daemon's HTTP socket, a connection to that one
/// starts the daemon (socket activation, as the daemon exits when idle): its `hook.sock`
/// is waited for ([`ACTIVATION_MS`]; not again by a process it failed).
pub(crate) fn hook_socket(started: u64) -> Result<c_int, Heard> {
    let first = hook_socket_once(started, u64::MAX);
    let me = getpid() as u32;
    // a daemon that beats runs without `hook.sock` (it could not make one): no wake brings it
    let beats = with_port_map(|m| m.alive(started)) == Some(true);
    if !matches!(first, Err(Heard::Absent)) || WOKEN_IN_VAIN.load(Ordering::Relaxed) == me || beats || !wake_daemon() {
        return first;
    }
    loop {
        let mut none = PollFd { fd: -1, events: 0, revents: 0 };
        // SAFETY: one ignored `PollFd` (fd -1): a bounded sleep.
        unsafe { poll(&mut none, 1, ACTIVATION_SLICE_MS) };
        let now = monotonic_ms();
        let waited = now.saturating_sub(started);
        match hook_socket_once(started, u64::MAX) {
            Err(Heard::Absent) if waited < ACTIVATION_MS => {}
            Err(Heard::Absent) => {
                WOKEN_IN_VAIN.store(me, Ordering::Relaxed);
                return Err(Heard::Absent);
            }
            r => return r,
        }
    }
}

/// A connection to the daemon's `hook.sock` for a message that only informs it (a note, a
/// confirmation, a refused connect): never a wake, and a full backlog waited for at most
/// [`HOOK_ANSWER_MS`] — nothing the program waits for hangs on a log line.
pub(crate) fn hook_socket_brief(started: u64) -> Result<c_int, Heard> {
    hook_socket_once(started, HOOK_ANSWER_MS)
}

/// Sends `msg` to the daemon on a connection of its own ([`hook_socket_brief`]), waits for
/// no answer, and closes it; what was heard when the daemon could not be reached.
pub(crate) fn tell(msg: &[u8]) -> Result<(), Heard> {
    let conn = hook_socket_brief(monotonic_ms())?;
    // SAFETY: `msg.len()` bytes of `msg`, on our own connection, closed here.
    unsafe {
        send(conn, msg.as_ptr().cast(), msg.len(), MSG_DONTWAIT | MSG_NOSIGNAL);
        close(conn);
    }
    Ok(())
}

/// Leaves `msg` (a `NOTE`) in the daemon's mailbox ([`hookproto::MAILBOX`]), a datagram
/// socket nobody waits on: it wakes no thread of the daemon (a wake-up costs its sender
/// ~20 us in a VM), which reads it within [`mapview::BEAT_EVERY_MS`]. Only a socket of
/// ours is written to (as a connection's peer is checked). `false` when it is not there,
/// not ours, or full (the kernel queues few datagrams): then [`tell`].
pub(crate) fn mailed(msg: &[u8]) -> bool {
    let mut path = [0u8; RUNTIME_PATH_MAX];
    let n = runtime_file(&mut path, hookproto::MAILBOX);
    let Some(sun) = unix_addr(&path, n) else { return false };
    let mut st = [0u8; 256];
    // SAFETY: `path` is NUL-terminated (runtime_file); statx writes a `struct statx` (256
    // bytes) into `st`.
    let ours = unsafe { statx(AT_FDCWD, path.as_ptr().cast(), AT_SYMLINK_NOFOLLOW, STATX_MODE_UID_SIZE, st.as_mut_ptr()) } == 0
        && own_uid(u32_at(&st, 20))
        && (u32_at(&st, 28) as u16) & S_IFMT == S_IFSOCK;
    if !ours {
        return false;
    }
    // SAFETY: a new socket of ours, closed below.
    let fd = above_stdio(unsafe { socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0) });
    if fd < 0 {
        return false;
    }
    // SAFETY: `msg.len()` bytes of `msg` to the `sockaddr_un` of `2 + n + 1` bytes in
    // `sun`, never waiting; then our own socket is closed.
    unsafe {
        let sent = sendto(fd, msg.as_ptr().cast(), msg.len(), MSG_DONTWAIT | MSG_NOSIGNAL, sun.as_ptr().cast(), (2 + n + 1) as SockLen);
        close(fd);
        sent == msg.len() as isize
    }
}

/// Connects to the daemon's HTTP socket (`STYXY_URL`'s `unix:` path, else `daemon.sock` in
/// the runtime directory) and hangs up, without a word: a socket-activated daemon starts.
/// `true` when something listens there.
fn wake_daemon() -> bool {
    // SAFETY: copied into `path` here.
    let url = unsafe { env(c"STYXY_URL") }.and_then(|u| u.strip_prefix(b"unix:")).filter(|p| p.starts_with(b"/"));
    let mut path = [0u8; RUNTIME_PATH_MAX];
    let n = match url {
        Some(p) => put(&mut path, 0, p),
        None => runtime_file(&mut path, "daemon.sock"),
    };
    let Some(sun) = unix_addr(&path, n) else { return false };
    // SAFETY: a new socket of ours, closed below.
    let fd = above_stdio(unsafe { socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0) });
    if fd < 0 {
        return false;
    }
    // SAFETY: a `sockaddr_un` of `2 + n + 1` bytes in `sun`; then our own socket is closed.
    unsafe {
        let listens = connect(fd, sun.as_ptr().cast(), (2 + n + 1) as SockLen) == 0 || errno() == EAGAIN;
        close(fd);
        listens
    }
}

/// The `sockaddr_un` for the `n`-byte path in `path` (the family, then the path and its
/// NUL); `None` when it does not fit.
fn unix_addr(path: &[u8; RUNTIME_PATH_MAX], n: usize) -> Option<[u8; 110]> {
    if n == 0 || n >= 108 {
        return None;
    }
    let mut sun = [0u8; 110];
    sun.get_mut(..2)?.copy_from_slice(&(AF_UNIX as u16).to_ne_bytes());
    sun.get_mut(2..2 + n)?.copy_from_slice(path.get(..n)?);
    Some(sun)
}

/// A connection to the daemon's `hook.sock`, when it answers and runs as our uid, on an
/// fd ≥ 3; `Err(Silent)` when its backlog stays full while it does not beat (stopped),
/// `Err(Absent)` when nothing listens there, `Err(Foreign)` when it is another user's.
fn hook_socket_once(started: u64, limit_ms: u64) -> Result<c_int, Heard> {
    let mut path = [0u8; RUNTIME_PATH_MAX];
    let n = runtime_file(&mut path, hookproto::SOCKET);
    let sun = unix_addr(&path, n).ok_or(Heard::Nothing)?;
    let fd = our_socket().ok_or(Heard::Nothing)?;
    let connected = connect_bounded(fd, &sun, n, started, limit_ms);
    let mut cred = UCred { pid: 0, uid: u32::MAX, gid: 0 };
    let mut cl: SockLen = core::mem::size_of::<UCred>() as SockLen;
    // SAFETY: getsockopt writes at most `cl` bytes into `cred`.
    let peer = connected.is_ok() && unsafe { getsockopt(fd, SOL_SOCKET, SO_PEERCRED, (&mut cred as *mut UCred).cast(), &mut cl) } == 0;
    if !peer || !own_uid(cred.uid) {
        // SAFETY: our own socket, opened by `our_socket`.
        unsafe { close(fd) };
        return Err(match connected {
            Err(Heard::Foreign(_)) => Heard::Foreign(owner_of(&path)),
            Err(heard) => heard,
            Ok(()) if peer => Heard::Foreign(cred.uid),
            Ok(()) => Heard::Nothing,
        });
    }
    Ok(fd)
}

/// A new `SOCK_SEQPACKET` Unix socket of ours, close-on-exec and never on fd 0–2 (a
/// program started with stdio closed must not find our socket there).
fn our_socket() -> Option<c_int> {
    // SAFETY: a new socket of ours (closed by our caller, or below).
    let fd = above_stdio(unsafe { socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0) });
    (fd >= 0).then_some(fd)
}

/// Connects `fd` to the `sockaddr_un` in `sun` (a path of `n` bytes): a full backlog is
/// waited for in slices (`SO_SNDTIMEO`) while the daemon beats, a signal resumes it.
fn connect_bounded(fd: c_int, sun: &[u8; 110], n: usize, started: u64, limit_ms: u64) -> Result<(), Heard> {
    let slice = TimeVal { sec: 0, usec: i64::from(SLICE_MS) * 1000 };
    // SAFETY: a `struct timeval` read by the kernel from `slice`.
    unsafe { setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, (&slice as *const TimeVal).cast(), core::mem::size_of::<TimeVal>() as SockLen) };
    loop {
        // SAFETY: a `sockaddr_un` of `2 + n + 1` bytes (family, path, NUL) in `sun`.
        if unsafe { connect(fd, sun.as_ptr().cast(), (2 + n + 1) as SockLen) } == 0 {
            return Ok(());
        }
        match errno() {
            EAGAIN | EINTR if worth_waiting(started) && monotonic_ms().saturating_sub(started) < limit_ms => {}
            EAGAIN | EINTR => return Err(Heard::Silent),
            ENOENT | ECONNREFUSED | ENOTDIR => return Err(Heard::Absent),
            EACCES => return Err(Heard::Foreign(u32::MAX)),
            _ => return Err(Heard::Nothing),
        }
    }
}

/// The owner of the socket at `path` (NUL-terminated), or of the nearest directory above
/// it we may look at: whose daemon it is.
fn owner_of(path: &[u8; RUNTIME_PATH_MAX]) -> u32 {
    let mut p = *path;
    loop {
        let mut st = [0u8; 256];
        // SAFETY: `p` is NUL-terminated; statx writes a `struct statx` (256 bytes) into `st`.
        if unsafe { statx(AT_FDCWD, p.as_ptr().cast(), AT_SYMLINK_NOFOLLOW, STATX_MODE_UID_SIZE, st.as_mut_ptr()) } == 0 {
            return u32_at(&st, 20);
        }
        // cut at the last '/' (never the root's)
        match p.iter().position(|c| *c == 0).and_then(|end| p.get(..end)).and_then(|b| b.iter().rposition(|c| *c == b'/')) {
            Some(slash) if slash > 0 => {
                if let Some(c) = p.get_mut(slash) {
                    *c = 0;
                }
            }
            _ => return u32::MAX,
        }
    }
}

/// What the daemon said to an ask.
pub(crate) enum Heard {
    Answer(hookproto::Answer),
    /// No answer, and the daemon does not beat: it is stopped or hung ([`worth_waiting`]).
    Silent,
    /// Nothing listens on `hook.sock`: no daemon.
    Absent,
    /// The daemon is another user's (its uid; `u32::MAX` when it cannot be told).
    Foreign(u32),
    /// It closed the ask unanswered: a daemon of another version of the layout.
    Closed,
    /// Fallback mode: not this process's as it is ([`hookproto::BUSY`]).
    Busy,
    /// The exchange failed otherwise (no daemon, a closed or foreign socket).
    Nothing,
}

/// Whether `conn` has something to read within [`SPIN_US`], looked at without sleeping
/// (yielding to any other thread that wants this CPU, the daemon's among them).
fn answered_soon(conn: c_int) -> bool {
    let policy = sched_getscheduler(0) & !SCHED_RESET_ON_FORK;
    if !YIELDING_POLICIES.contains(&policy) {
        return false; // a real-time thread would not let the daemon run on its CPU
    }
    let spun = monotonic_us();
    for _ in 0..SPIN_LOOKS {
        let mut p = PollFd { fd: conn, events: POLLIN, revents: 0 };
        // SAFETY: one `PollFd`, `p`, not waited for.
        if unsafe { poll(&mut p, 1, 0) } == 1 {
            return true;
        }
        if monotonic_us().wrapping_sub(spun) >= SPIN_US {
            return false;
        }
        sched_yield();
    }
    false
}

/// How many looks [`answered_soon`] takes at most (its bound if the clock stood still).
const SPIN_LOOKS: u32 = 10_000;

/// Sends `ask` and waits for the daemon's answer ([`sent_and_answered`]).
pub(crate) fn exchange(conn: c_int, ask: &[u8], started: u64) -> Heard {
    if let Err(heard) = sent_and_answered(conn, ask, started, u64::MAX) {
        return heard;
    }
    let mut buf = [0u8; hookproto::TOLD_MAX];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { recv(conn, buf.as_mut_ptr().cast(), buf.len(), MSG_DONTWAIT) };
    if n == 0 {
        return Heard::Closed;
    }
    let msg = usize::try_from(n).ok().and_then(|n| buf.get(..n)).unwrap_or_default();
    if let Some(line) = hookproto::Answer::line_of(msg, hookproto::DECLINED).filter(|l| !l.is_empty()) {
        // refused, and why: said once a process, as a daemon that cannot be asked is
        if first_warning() {
            notice(&[line]);
        }
        return Heard::Nothing;
    }
    match hookproto::Answer::decode(msg) {
        Some(a) => Heard::Answer(a),
        None => Heard::Nothing,
    }
}

/// How long a shim stays on its CPU for the daemon's answer before it sleeps in
/// `poll`: the daemon answers within tens of microseconds, and an answer that finds the
/// shim asleep waits for its idle CPU to wake (tens of microseconds more on a virtual
/// machine, and the daemon pays for the wake-up too).
const SPIN_US: u64 = 200;

/// Sends `msg` on `conn` and waits until the daemon's answer is there, while it is
/// [`worth_waiting`] for (and at most `limit_ms` since `started`): first on the CPU
/// ([`answered_soon`]), then asleep. A signal resumes the wait (never a second ask, which
/// would find the port "taken" by this very grant).
pub(crate) fn sent_and_answered(conn: c_int, msg: &[u8], started: u64, limit_ms: u64) -> Result<(), Heard> {
    // SAFETY: `msg.len()` bytes of `msg` (any fd may be sent to: at worst an error).
    if unsafe { send(conn, msg.as_ptr().cast(), msg.len(), MSG_DONTWAIT | MSG_NOSIGNAL) } != msg.len() as isize {
        return Err(Heard::Nothing);
    }
    if answered_soon(conn) {
        return Ok(());
    }
    loop {
        let mut p = PollFd { fd: conn, events: POLLIN, revents: 0 };
        // SAFETY: one `PollFd`, `p`.
        match unsafe { poll(&mut p, 1, SLICE_MS) } {
            1 => return Ok(()),
            0 => {}
            _ if errno() == EINTR => {}
            _ => return Err(Heard::Nothing),
        }
        if !worth_waiting(started) || monotonic_ms().saturating_sub(started) >= limit_ms {
            return Err(Heard::Silent);
        }
    }
}
