//! A coordinated bind, kept or moved, in one round trip on the daemon's `hook.sock`
//! (docs/ARCHITECTURE.md "Hook ↔ daemon protocol"), the ports this process kept, and
//! what it tells the daemon: a refused connect, what it did alone ([`note`]), and — when
//! the daemon cannot be asked — the spool and the one line on stderr.

use core::ffi::{c_int, c_void, CStr};
use core::sync::atomic::Ordering;

use crate::cluster;
use crate::cstring::{append, decimal, put};
use crate::libc_calls::{
    above_stdio, close, errno, getpid, getsockopt, getuid, monotonic_ms, open, poll, prctl, read, realtime_ms, recv, send, set_errno,
    setsockopt, socket, statx, write, PollFd, SockLen, TimeVal, UCred, AF_INET6, AF_UNIX, AT_FDCWD, AT_SYMLINK_NOFOLLOW, EACCES,
    EADDRINUSE, EAGAIN, ECONNREFUSED, EINTR, ENOENT, ENOTDIR, MSG_DONTWAIT, MSG_NOSIGNAL, O_APPEND, O_CLOEXEC, O_CREAT, O_NOFOLLOW,
    O_NONBLOCK, O_RDONLY, O_WRONLY, POLLIN, PR_GET_NAME, SOCK_CLOEXEC, SOCK_NONBLOCK, SOCK_SEQPACKET, SOCK_STREAM, SOL_SOCKET, SO_PEERCRED,
    SO_SNDTIMEO, STATX_MODE_UID_SIZE, S_IFMT, S_IFREG,
};
use crate::maps::{own_uid, runtime_file, with_port_map, RUNTIME_PATH_MAX};
use crate::settings::env;
use crate::sockinfo::Inet;
use crate::tell::notice;
use crate::{hookproto, mapview, AddrFn, REAL_CONNECT};

/// How long a bind waits for the daemon when there is no port map to read its beat from:
/// the hooks' own allocate budget (`Timeouts::HOOK`). Then the bind goes as asked.
const HOOK_ANSWER_MS: u64 = 200;

/// One wait on the daemon (a connect to a full backlog, an answer) before its beat is
/// looked at again.
const SLICE_MS: c_int = 100;

/// Granted ports found taken at OS level (someone uncoordinated bound one between the
/// daemon's check and this bind), each asked again, before the bind goes as asked.
const MAX_RETRIES: u32 = 3;

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
fn process_runs(pid: u32) -> bool {
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

/// Ports this process bound through [`keep`] (pid and port; a forked child's pid differs,
/// so its `listen()` still confirms with the daemon, becoming an owner).
static KEPT: [core::sync::atomic::AtomicU64; 4] = [const { core::sync::atomic::AtomicU64::new(0) }; 4];

fn kept_key(port: u16) -> u64 {
    // SAFETY: getpid cannot fail.
    (u64::from(unsafe { getpid() } as u32) << 16) | u64::from(port)
}

/// Whether `port` was kept through [`keep`] by this process (it owns the allocation
/// already: its `listen()` has nothing to confirm) and by an ancestor before a `fork` (this
/// process's `listen()` confirms it, becoming an owner that outlives its parent).
pub(crate) fn kept_by(port: u16) -> (bool, bool) {
    let mine = kept_key(port);
    let (mut here, mut before) = (false, false);
    for k in KEPT.iter().map(|k| k.load(Ordering::Relaxed)) {
        here |= k == mine;
        before |= k != 0 && k != mine && k & 0xffff == u64::from(port);
    }
    (here, before)
}

fn kept_here(port: u16) -> bool {
    kept_by(port).0
}

/// Tells the daemon this process listens on `port`, which an ancestor kept before a
/// `fork` (`hookproto::CONFIRM`): it becomes an owner of the allocation, which then
/// outlives the parent. One message, no answer awaited; errno as it was.
pub(crate) fn confirm(port: u16) {
    let saved = errno();
    // SAFETY: copied into the message here.
    let session = session_bytes(unsafe { env(c"STYXY_PRELOAD_SESSION") }.unwrap_or_default());
    let ask = hookproto::Ask { kind: hookproto::CONFIRM, port, session, ..NO_ASK };
    if let (Some(m), Ok(conn)) = (ask.encode(), hook_socket(monotonic_ms())) {
        // SAFETY: `m.len()` bytes of `m`, on our own connection, closed here.
        unsafe {
            send(conn, m.as_ptr().cast(), m.len(), MSG_DONTWAIT | MSG_NOSIGNAL);
            close(conn);
        }
    }
    set_errno(saved);
}

/// A coordinated bind in one round trip on the daemon's `hook.sock`
/// (docs/ARCHITECTURE.md "Hook ↔ daemon protocol"): the daemon grants the port asked for,
/// or another one (a remap: this process may move), this binds it, reports the result
/// (the daemon logs it) and tells the person of a move. Called for a stream socket whose
/// plan is to ask first ([`crate::decide::plan`]), `flags` [`hookproto::MAY_MOVE`] (and
/// [`hookproto::SHARES_PORT`] when it sets `SO_REUSEPORT`); or whose bind as asked failed
/// with `EADDRINUSE`, `flags` also [`hookproto::TAKEN`]. In fallback mode
/// ([`hookproto::FALLBACK`], `origin` the port the tool first wanted) the port is this
/// one or none: [`hookproto::BUSY`] is the tool's `EADDRINUSE`, and it moves on by
/// itself. A granted port someone uncoordinated took is asked again, [`MAX_RETRIES`]
/// times. `None`: the bind goes as asked — declined, or the daemon could not be asked
/// ([`unasked`]), or the kernel refuses the address itself.
///
/// # Safety
/// `fd`, `addr` and `len` are the program's call to bind, `inet` read from its address,
/// `real` libc's bind.
pub(crate) unsafe fn keep(
    fd: c_int,
    addr: *const c_void,
    len: SockLen,
    inet: &Inet,
    real: AddrFn,
    flags: u8,
    origin: Option<u16>,
) -> Option<c_int> {
    let port = inet.port;
    if flags & hookproto::TAKEN == 0 && kept_here(port) {
        // this process owns the port's allocation already (a probe then the real bind, a
        // restart, a twin): a kernel call alone
        return None;
    }
    // SAFETY: copied into the ask here.
    let session = session_bytes(unsafe { env(c"STYXY_PRELOAD_SESSION") }.unwrap_or_default());
    let ask = hookproto::Ask {
        kind: hookproto::KEEP,
        port,
        family: family_byte(inet.family),
        flags,
        origin: origin.unwrap_or(0),
        session,
        ..NO_ASK
    };
    let saved = errno();
    for _ in 0..=MAX_RETRIES {
        let (conn, granted) = match ask_daemon(&ask) {
            Ok(answer) => answer,
            Err(Heard::Busy) => {
                // not this tool's as it is: it moves on by itself (the daemon logged it)
                remember_origin(origin.unwrap_or(port));
                set_errno(EADDRINUSE);
                return Some(-1);
            }
            Err(heard) => {
                unasked(heard, &ask);
                set_errno(saved);
                return None;
            }
        };
        let rc = if granted.port == port {
            // SAFETY: the program's own call, to libc's function (this function's contract).
            unsafe { real(fd, addr, len) }
        } else {
            let moved = inet.with_port(granted.port);
            // SAFETY: `len` (≤ 128, all of `inet.bytes`) bytes of `moved`: the program's
            // address with the granted port.
            unsafe { real(fd, moved.as_ptr().cast(), len) }
        };
        let err = if rc == 0 { 0 } else { errno() };
        let mut done = [0u8; hookproto::DONE_MAX];
        let n = done_message(&hookproto::Ask { kind: hookproto::DONE, port: granted.port, errno: err, ..ask }, &mut done);
        // SAFETY: `n` (≤ DONE_MAX) bytes of `done`, on our own connection, closed here.
        unsafe {
            send(conn, done.as_ptr().cast(), n, MSG_DONTWAIT | MSG_NOSIGNAL);
            close(conn);
        }
        set_errno(saved);
        match err {
            0 => {
                remember_kept(granted.port);
                if granted.port != port {
                    told_moved(fd, port, granted.port);
                }
                return Some(0);
            }
            // the session serves this port already: a second bind fails as it would
            // without us (get-port, tests expecting EADDRINUSE); the daemon said why
            EADDRINUSE if granted.existing => {
                set_errno(EADDRINUSE);
                return Some(-1);
            }
            // someone uncoordinated took the grant: asked again (the daemon logged it)
            EADDRINUSE => {}
            // the kernel refuses the address itself: the program's own bind fails the same way
            _ => return None,
        }
    }
    None
}

/// An ask with nothing in it, for `..NO_ASK`.
const NO_ASK: hookproto::Ask<'static> =
    hookproto::Ask { kind: 0, port: 0, family: 4, errno: 0, flags: 0, origin: 0, session: &[], note: 0, comm: &[] };

/// The session as an ask carries it: one byte too long for [`hookproto::SESSION_MAX`] when
/// it is longer, so that the ask is not sent (a cut session would be another's).
fn session_bytes(s: &[u8]) -> &[u8] {
    s.get(..hookproto::SESSION_MAX + 1).unwrap_or(s)
}

/// 4 or 6, as an ask names an address family.
fn family_byte(family: u16) -> u8 {
    if family == AF_INET6 {
        6
    } else {
        4
    }
}

/// The daemon could not be asked about `ask`'s bind, which goes as asked: said once a
/// process on stderr, and logged through the spool when no daemon answers (a stopped one,
/// none at all). Another user's daemon is only said: its spool is not ours.
fn unasked(heard: Heard, ask: &hookproto::Ask) {
    let why: &[u8] = match heard {
        Heard::Silent => hookproto::TIMEOUT.as_bytes(),
        Heard::Absent => hookproto::NO_COORDINATOR.as_bytes(),
        Heard::Foreign(owner) => return warn_other_user(owner),
        _ => return,
    };
    let note = if matches!(heard, Heard::Silent) { hookproto::NOTE_UNANSWERED } else { hookproto::NOTE_NO_COORDINATOR };
    spool(&hookproto::Ask { kind: hookproto::NOTE, note, ..*ask });
    if first_warning() {
        let mut path = [0u8; RUNTIME_PATH_MAX];
        let n = runtime_file(&mut path, b"/hook.sock\0");
        let path = path.get(..n).unwrap_or(&[]);
        let (through, fix) = (hookproto::PASS_THROUGH.as_bytes(), hookproto::START_IT.as_bytes());
        notice(&[why, b" (unix:", path, b")", through, fix]);
    }
}

/// The pid of this process once it said the daemon could not be asked (one line a process).
static WARNED: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// This process has not said yet that the daemon could not be asked (and now has).
fn first_warning() -> bool {
    // SAFETY: getpid cannot fail.
    let me = unsafe { getpid() } as u32;
    WARNED.swap(me, Ordering::Relaxed) != me
}

/// The daemon is uid `owner`'s (a server run with runuser, su or sudo in a session): said
/// once, with how to coordinate it all the same.
fn warn_other_user(owner: u32) {
    if !first_warning() {
        return;
    }
    let (mut o, mut m) = ([0u8; 12], [0u8; 12]);
    // SAFETY: getuid cannot fail.
    let (on, mn) = (decimal(&mut o, 0, owner), decimal(&mut m, 0, unsafe { getuid() }));
    let [a, b, c] = hookproto::OTHER_USER;
    let (o, m) = (o.get(..on).unwrap_or(&[]), m.get(..mn).unwrap_or(&[]));
    notice(&[a.as_bytes(), o, b.as_bytes(), m, c.as_bytes(), hookproto::PASS_THROUGH.as_bytes()]);
}

/// Tells the daemon what this process did alone (`note`, [`hookproto::NOTE`]) for `port`
/// (`flags`: [`hookproto::OWN_RULES`] when a rule of its own covers it): one message, no
/// answer awaited, spooled when the daemon cannot be asked; errno as it was.
pub(crate) fn note(note: u8, port: u16, family: u16, flags: u8) {
    let saved = errno();
    // SAFETY: copied into the message here.
    let session = session_bytes(unsafe { env(c"STYXY_PRELOAD_SESSION") }.unwrap_or_default());
    let mut comm = [0u8; 17];
    let ask = hookproto::Ask { kind: hookproto::NOTE, port, family: family_byte(family), flags, session, note, ..NO_ASK };
    let ask = hookproto::Ask { comm: own_comm(&mut comm), ..ask };
    let mut msg = [0u8; hookproto::DONE_MAX];
    let n = done_message(&ask, &mut msg);
    match (msg.get(..n).filter(|m| !m.is_empty()), hook_socket(monotonic_ms())) {
        (Some(m), Ok(conn)) => {
            // SAFETY: `m.len()` bytes of `m`, on our own connection, closed here.
            unsafe {
                send(conn, m.as_ptr().cast(), m.len(), MSG_DONTWAIT | MSG_NOSIGNAL);
                close(conn);
            }
        }
        (_, Ok(conn)) => {
            // SAFETY: our own connection, opened by `hook_socket`.
            unsafe { close(conn) };
        }
        (Some(_), Err(Heard::Absent | Heard::Silent)) => spool(&ask),
        _ => {}
    }
    set_errno(saved);
}

/// This process's name (`PR_GET_NAME`), in `buf`.
fn own_comm(buf: &mut [u8; 17]) -> &[u8] {
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into `buf`.
    unsafe { prctl(PR_GET_NAME, buf.as_mut_ptr()) };
    buf.split(|c| *c == 0).next().unwrap_or(&[])
}

/// Appends `ask` (a `NOTE`), with this process's name, pid, the time and its log
/// variables, to the daemon's spool ([`hookproto::SPOOL`]), which the daemon logs when
/// it runs again: only a regular file of ours, below [`hookproto::SPOOL_MAX`], in one
/// `write` that never waits. Nothing when the daemon's directory is not there.
fn spool(ask: &hookproto::Ask) {
    let mut comm = [0u8; 17];
    let ask = hookproto::Ask { comm: if ask.comm.is_empty() { own_comm(&mut comm) } else { ask.comm }, ..*ask };
    let mut msg = [0u8; hookproto::DONE_MAX];
    let n = done_message(&ask, &mut msg);
    let mut rec = [0u8; hookproto::DONE_MAX + 16];
    // SAFETY: getpid cannot fail.
    let n = hookproto::spool_record(unsafe { getpid() } as u32, realtime_ms(), msg.get(..n).unwrap_or(&[]), &mut rec);
    let mut path = [0u8; RUNTIME_PATH_MAX];
    if n == 0 || runtime_file(&mut path, b"/hook.spool\0") == 0 {
        return;
    }
    let flags = O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC;
    // SAFETY: `path` is NUL-terminated (runtime_file); the fd is ours, closed below.
    let fd = above_stdio(unsafe { open(path.as_ptr().cast(), flags, 0o600) });
    if fd < 0 {
        return;
    }
    let mut st = [0u8; 256];
    // SAFETY: statx of our own fd (AT_EMPTY_PATH) writes a `struct statx` (256 bytes) into `st`.
    let fits =
        unsafe { statx(fd, c"".as_ptr(), crate::libc_calls::AT_EMPTY_PATH, STATX_MODE_UID_SIZE, st.as_mut_ptr()) } == 0 && spool_fits(&st);
    if fits {
        // SAFETY: `n` bytes of `rec`, to our own fd.
        unsafe { write(fd, rec.as_ptr().cast(), n) };
    }
    // SAFETY: our own fd, opened above.
    unsafe { close(fd) };
}

/// A `struct statx` of a regular file of ours below [`hookproto::SPOOL_MAX`].
fn spool_fits(st: &[u8; 256]) -> bool {
    let (uid, mode, size) = (u32_at(st, 20), u32_at(st, 28) as u16, u64::from(u32_at(st, 40)) | u64::from(u32_at(st, 44)) << 32);
    mode & S_IFMT == S_IFREG && own_uid(uid) && size < hookproto::SPOOL_MAX
}

/// The native-endian `u32` at `at` in `st`.
fn u32_at(st: &[u8; 256], at: usize) -> u32 {
    st.get(at..at + 4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_ne_bytes)
}

/// The `DONE` for `ask` into `buf`: the ask, then the variables of this process's
/// environment that name its event log (`hookproto::LOG_VARS`, as many as fit): the
/// daemon writes the bind's event there. Its length (0 sends nothing).
fn done_message(ask: &hookproto::Ask, buf: &mut [u8; hookproto::DONE_MAX]) -> usize {
    let (Some(head), Some(to)) = (ask.encode(), buf.get_mut(..hookproto::ASK_LEN)) else { return 0 };
    to.copy_from_slice(&head);
    let mut n = hookproto::ASK_LEN;
    for key in hookproto::LOG_VARS {
        let mut name = [0u8; 32];
        if put(&mut name, 0, key.as_bytes()) == 0 {
            continue;
        }
        // SAFETY: `name` is NUL-terminated (`put`); the value is copied into `buf` here and
        // not kept.
        let Some(value) = (unsafe { env(CStr::from_ptr(name.as_ptr().cast())) }) else { continue };
        let entry = [key.as_bytes(), b"=", value, b"\0"];
        let len: usize = entry.iter().map(|p| p.len()).sum();
        let Some(mut slot) = buf.get_mut(n..n + len) else { continue };
        for part in entry {
            let Some((head, rest)) = slot.split_at_mut_checked(part.len()) else { break };
            head.copy_from_slice(part);
            slot = rest;
        }
        n += len;
    }
    n
}

/// Asks the daemon: the open connection and its grant (the port asked, or another when
/// the daemon moved it), or what was heard instead.
fn ask_daemon(ask: &hookproto::Ask) -> Result<(c_int, hookproto::Answer), Heard> {
    let started = monotonic_ms();
    let conn = hook_socket(started)?;
    // in fallback mode the daemon may log a BUSY itself: the ask carries the log's variables
    let mut msg = [0u8; hookproto::DONE_MAX];
    let n = match ask.flags & hookproto::FALLBACK {
        0 => ask.encode().map(|m| put_bytes(&mut msg, &m)).unwrap_or(0),
        _ => done_message(ask, &mut msg),
    };
    let heard = match msg.get(..n).filter(|m| !m.is_empty()) {
        Some(m) => exchange(conn, m, started),
        None => Heard::Nothing,
    };
    let granted = match heard {
        Heard::Answer(a) if a.status == hookproto::GRANTED && a.port == ask.port => Ok(a),
        Heard::Answer(a) if a.status == hookproto::MOVED && a.port != 0 && a.port != ask.port && ask.flags & hookproto::MAY_MOVE != 0 => {
            Ok(a)
        }
        Heard::Answer(a) if a.status == hookproto::BUSY && ask.flags & hookproto::FALLBACK != 0 => Err(Heard::Busy),
        Heard::Silent => Err(Heard::Silent),
        _ => Err(Heard::Nothing),
    };
    if granted.is_err() {
        // SAFETY: our own connection, opened by `hook_socket`.
        unsafe { close(conn) };
    }
    granted.map(|a| (conn, a))
}

/// `m` copied to the start of `buf`; its length.
fn put_bytes(buf: &mut [u8; hookproto::DONE_MAX], m: &[u8]) -> usize {
    match buf.get_mut(..m.len()) {
        Some(to) => {
            to.copy_from_slice(m);
            m.len()
        }
        None => 0,
    }
}

/// Fallback mode: the port this process's tool first wanted, before it moved on by
/// itself (pid and port, as [`KEPT`]).
static ORIGIN: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// The port this process's tool first wanted, once it was told one was not its own.
pub(crate) fn origin() -> Option<u16> {
    let v = ORIGIN.load(Ordering::Relaxed);
    (v != 0 && v >> 16 == kept_key(0) >> 16).then_some(v as u16)
}

fn remember_origin(port: u16) {
    ORIGIN.store(kept_key(port), Ordering::Relaxed);
}

/// This process holds `port`'s allocation now: its `listen()` has nothing to confirm.
fn remember_kept(port: u16) {
    let key = kept_key(port);
    if let Some(slot) = KEPT.iter().find(|k| k.load(Ordering::Relaxed) == 0).or(KEPT.get(usize::from(port) % KEPT.len())) {
        slot.store(key, Ordering::Relaxed);
    }
}

/// `fd`'s bind of `asked` landed on `got`: recorded (what a cluster primary's
/// `getsockname` shows), and told the person once (a twin, or a probe then the bind, is
/// one move).
fn told_moved(fd: c_int, asked: u16, got: u16) {
    let twin = cluster::seen(asked, got);
    cluster::record(fd, asked, got);
    if twin {
        return;
    }
    let mut comm = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into `comm`.
    unsafe { prctl(PR_GET_NAME, comm.as_mut_ptr()) };
    let comm = comm.split(|c| *c == 0).next().unwrap_or(&[]);
    let (mut a, mut g, mut p) = ([0u8; 8], [0u8; 8], [0u8; 12]);
    let (an, gn) = (decimal(&mut a, 0, u32::from(asked)), decimal(&mut g, 0, u32::from(got)));
    // SAFETY: getpid cannot fail.
    let pn = decimal(&mut p, 0, unsafe { getpid() } as u32);
    let (a, g, p) = (a.get(..an).unwrap_or(&[]), g.get(..gn).unwrap_or(&[]), p.get(..pn).unwrap_or(&[]));
    notice(&[b"port ", a, b" is taken; ", comm, b" (pid ", p, b") got ", g]);
}

/// How long a bind waits for a socket-activated daemon to start (its `hook.sock` to
/// appear) after this process's connection started it: [`HOOK_ANSWER_MS`], and up to
/// this while a daemon beats in the port map; and the slice it looks again after.
const ACTIVATION_MS: u64 = 1000;
const ACTIVATION_SLICE_MS: c_int = 5;

/// The pid of this process once a daemon it woke brought no `hook.sock` in time (one
/// that runs without it): not woken, nor waited for, again.
static WOKEN_IN_VAIN: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// A connection to the daemon's `hook.sock` ([`hook_socket_once`]). When nothing listens
/// there but a manager (systemd) holds the daemon's HTTP socket, a connection to that one
/// starts the daemon (socket activation, as the daemon exits when idle): its `hook.sock`
/// is waited for ([`ACTIVATION_MS`]; not again by a process it failed).
fn hook_socket(started: u64) -> Result<c_int, Heard> {
    let first = hook_socket_once(started);
    // SAFETY: getpid cannot fail.
    let me = unsafe { getpid() } as u32;
    if !matches!(first, Err(Heard::Absent)) || WOKEN_IN_VAIN.load(Ordering::Relaxed) == me || !wake_daemon() {
        return first;
    }
    loop {
        let mut none = PollFd { fd: -1, events: 0, revents: 0 };
        // SAFETY: one ignored `PollFd` (fd -1): a bounded sleep.
        unsafe { poll(&mut none, 1, ACTIVATION_SLICE_MS) };
        let now = monotonic_ms();
        let waited = now.saturating_sub(started);
        let beats = || with_port_map(|m| m.alive(now)) == Some(true);
        match hook_socket_once(started) {
            Err(Heard::Absent) if waited < HOOK_ANSWER_MS || (waited < ACTIVATION_MS && beats()) => {}
            Err(Heard::Absent) => {
                WOKEN_IN_VAIN.store(me, Ordering::Relaxed);
                return Err(Heard::Absent);
            }
            r => return r,
        }
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
        None => runtime_file(&mut path, b"/daemon.sock\0"),
    };
    let Some(sun) = unix_addr(&path, n) else { return false };
    // SAFETY: a new socket of ours, closed below.
    let fd = above_stdio(unsafe { socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0) });
    let Some(connect) = REAL_CONNECT.next().filter(|_| fd >= 0) else { return false };
    // SAFETY: libc's connect with a `sockaddr_un` of `2 + n + 1` bytes in `sun`; then our
    // own socket is closed.
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
fn hook_socket_once(started: u64) -> Result<c_int, Heard> {
    let mut path = [0u8; RUNTIME_PATH_MAX];
    let n = runtime_file(&mut path, b"/hook.sock\0");
    let sun = unix_addr(&path, n).ok_or(Heard::Nothing)?;
    let fd = our_socket().ok_or(Heard::Nothing)?;
    let connected = connect_bounded(fd, &sun, n, started);
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
fn connect_bounded(fd: c_int, sun: &[u8; 110], n: usize, started: u64) -> Result<(), Heard> {
    let connect = REAL_CONNECT.next().ok_or(Heard::Nothing)?;
    let slice = TimeVal { sec: 0, usec: i64::from(SLICE_MS) * 1000 };
    // SAFETY: a `struct timeval` read by the kernel from `slice`.
    unsafe { setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, (&slice as *const TimeVal).cast(), core::mem::size_of::<TimeVal>() as SockLen) };
    loop {
        // SAFETY: libc's connect with a `sockaddr_un` of `2 + n + 1` bytes (family, path,
        // NUL) in `sun`.
        if unsafe { connect(fd, sun.as_ptr().cast(), (2 + n + 1) as SockLen) } == 0 {
            return Ok(());
        }
        match errno() {
            EAGAIN | EINTR if worth_waiting(started) => {}
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
enum Heard {
    Answer(hookproto::Answer),
    /// No answer, and the daemon does not beat: it is stopped or hung ([`worth_waiting`]).
    Silent,
    /// Nothing listens on `hook.sock`: no daemon.
    Absent,
    /// The daemon is another user's (its uid; `u32::MAX` when it cannot be told).
    Foreign(u32),
    /// Fallback mode: not this process's as it is ([`hookproto::BUSY`]).
    Busy,
    /// The exchange failed otherwise (no daemon, a closed or foreign socket).
    Nothing,
}

/// Sends `ask` and waits for the daemon's answer ([`sent_and_answered`]).
fn exchange(conn: c_int, ask: &[u8], started: u64) -> Heard {
    if let Err(heard) = sent_and_answered(conn, ask, started, u64::MAX) {
        return heard;
    }
    let mut buf = [0u8; hookproto::TOLD_MAX];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { recv(conn, buf.as_mut_ptr().cast(), buf.len(), MSG_DONTWAIT) };
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

/// Sends `msg` on `conn` and waits until the daemon's answer is there, while it is
/// [`worth_waiting`] for (and at most `limit_ms` since `started`); a signal resumes the wait (never a second ask, which would find
/// the port "taken" by this very grant).
fn sent_and_answered(conn: c_int, msg: &[u8], started: u64, limit_ms: u64) -> Result<(), Heard> {
    // SAFETY: `msg.len()` bytes of `msg` (any fd may be sent to: at worst an error).
    if unsafe { send(conn, msg.as_ptr().cast(), msg.len(), MSG_DONTWAIT | MSG_NOSIGNAL) } != msg.len() as isize {
        return Err(Heard::Nothing);
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

/// Connects refused in this process (pid and port, as [`KEPT`]): each is told to the daemon
/// once.
static REFUSED: [core::sync::atomic::AtomicU64; 8] = [const { core::sync::atomic::AtomicU64::new(0) }; 8];
/// The pid of this process once it told the person of a refusal (one line a process).
static TOLD: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// A connect of this process to loopback `port` was refused (another session's server):
/// the daemon is told, once per port — it writes the event and answers the line to tell,
/// which the person is told once per process. Waits at most [`HOOK_ANSWER_MS`]; errno as
/// it was. `false` when the daemon could not be asked at all (no daemon, a session id
/// too long for the message): the hooks' logic refuses it then, and says so.
pub(crate) fn refused(port: u16, family: u16) -> bool {
    let key = kept_key(port);
    if REFUSED.iter().any(|k| k.load(Ordering::Relaxed) == key) {
        return true;
    }
    let saved = errno();
    // SAFETY: copied into the message here.
    let session = unsafe { env(c"STYXY_PRELOAD_SESSION") }.unwrap_or_default();
    let mut msg = [0u8; hookproto::DONE_MAX];
    let n = done_message(&hookproto::Ask { kind: hookproto::REFUSED, port, family: family_byte(family), session, ..NO_ASK }, &mut msg);
    let started = monotonic_ms();
    let conn = match (msg.get(..n).filter(|m| !m.is_empty()), hook_socket(started)) {
        (Some(msg), Ok(conn)) => Some((msg, conn)),
        (_, Ok(conn)) => {
            // SAFETY: our own connection, opened by `hook_socket`.
            unsafe { close(conn) };
            None
        }
        (_, Err(_)) => None,
    };
    let Some((msg, conn)) = conn else {
        set_errno(saved);
        return false;
    };
    let mut buf = [0u8; hookproto::TOLD_MAX];
    let got = sent_and_answered(conn, msg, started, HOOK_ANSWER_MS).ok().map(|()| {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        unsafe { recv(conn, buf.as_mut_ptr().cast(), buf.len(), MSG_DONTWAIT) }
    });
    // SAFETY: our own connection, opened by `hook_socket`.
    unsafe { close(conn) };
    let line = got.and_then(|n| usize::try_from(n).ok()).and_then(|n| buf.get(..n)).and_then(hookproto::Answer::told_line);
    if let Some(line) = line {
        let slot = REFUSED.iter().find(|k| k.load(Ordering::Relaxed) == 0).or(REFUSED.get(usize::from(port) % REFUSED.len()));
        if let Some(slot) = slot {
            slot.store(key, Ordering::Relaxed);
        }
        // SAFETY: getpid cannot fail.
        let me = unsafe { getpid() } as u32;
        if TOLD.swap(me, Ordering::Relaxed) != me {
            notice(&[line]);
        }
    }
    set_errno(saved);
    true
}
