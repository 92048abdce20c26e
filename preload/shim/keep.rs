//! A coordinated bind kept in one round trip on the daemon's `hook.sock`
//! (docs/ARCHITECTURE.md "Hook ↔ daemon protocol"), and the ports this process kept.

use core::ffi::{c_int, c_void};
use core::sync::atomic::Ordering;

use crate::corelib::{core_fn, CORE_UNANSWERED};
use crate::env::{env, own_rules, session_tag};
use crate::maps::{port_map, runtime_file};
use crate::sock::{shares_port, stream, Inet};
use crate::sys::{
    close, errno, getpid, getsockopt, getuid, poll, recv, send, socket, PollFd, SockLen, UCred, AF_INET6, AF_UNIX, MSG_DONTWAIT,
    MSG_NOSIGNAL, POLLIN, SOCK_CLOEXEC, SOCK_SEQPACKET, SOL_SOCKET, SO_PEERCRED,
};
use crate::{hookproto, AddrFn, REAL_CONNECT};

/// How long a bind waits for the daemon's answer on the shim's socket: the hooks' own
/// allocate budget (`Timeouts::HOOK`). Then the bind goes as asked, as theirs would.
const HOOK_ANSWER_MS: c_int = 200;

/// Ports this process bound through [`keep`] (pid and port; a forked child's pid differs,
/// so its `listen()` still confirms with the daemon, becoming an owner).
static KEPT: [core::sync::atomic::AtomicU64; 4] = [const { core::sync::atomic::AtomicU64::new(0) }; 4];

fn kept_key(port: u16) -> u64 {
    // SAFETY: getpid cannot fail.
    (u64::from(unsafe { getpid() } as u32) << 16) | u64::from(port)
}

/// The daemon granted `port` to this process through [`keep`]: it owns the allocation
/// already, its `listen()` has nothing to confirm.
pub(crate) fn kept_here(port: u16) -> bool {
    let key = kept_key(port);
    KEPT.iter().any(|k| k.load(Ordering::Relaxed) == key)
}

/// A coordinated bind in one round trip on the daemon's `hook.sock`
/// (docs/ARCHITECTURE.md "Hook ↔ daemon protocol"): the daemon grants exactly the port
/// asked for, this binds it and reports the result (the daemon logs it). `None` when
/// the hooks' logic must decide: rules of the process's own, a shared port, no daemon,
/// or anything but that very port (a remap tells the person, the hooks' logic does).
///
/// # Safety
/// `fd`, `addr` and `len` are the program's call to bind, `inet` read from its address,
/// `real` libc's bind.
pub(crate) unsafe fn keep(fd: c_int, addr: *const c_void, len: SockLen, inet: &Inet, real: AddrFn) -> Option<c_int> {
    let port = inet.port;
    if own_rules() || shares_port(fd) || !stream(fd) || moved_for_session(port) {
        return None;
    }
    // SAFETY: the program's own call, to libc's function (this function's contract).
    let plain = || unsafe { real(fd, addr, len) };
    if kept_here(port) {
        // this process owns the port's allocation already (a probe then the real bind, a
        // restart, a twin): a kernel call alone; a failure goes to the hooks' logic, which
        // says why
        return (plain() == 0).then_some(0);
    }
    let family = if inet.family == AF_INET6 { 6 } else { 4 };
    // SAFETY: copied into the ask here.
    let s = unsafe { env(c"STYXY_PRELOAD_SESSION") }.unwrap_or_default();
    let session = s.get(..hookproto::SESSION_MAX + 1).unwrap_or(s);
    let ask = hookproto::Ask { kind: hookproto::KEEP, port, family, errno: 0, session };
    let conn = hook_socket()?;
    let heard = match ask.encode() {
        Some(m) => exchange(conn, &m),
        None => Heard::Nothing,
    };
    match heard {
        Heard::Answer(a) if a.status == hookproto::GRANTED && a.port == port => {}
        Heard::Silent => {
            // a stalled daemon: bound as asked, and said (the hooks' logic logs it without
            // asking again)
            // SAFETY: our own connection, opened by `hook_socket`.
            unsafe { close(conn) };
            return Some(match core_fn(&CORE_UNANSWERED) {
                // SAFETY: the program's call and libc's function, as the core takes them.
                Some(hook) => unsafe { hook(fd, addr, len, real) },
                None => plain(),
            });
        }
        _ => {
            // SAFETY: our own connection, opened by `hook_socket`.
            unsafe { close(conn) };
            return None;
        }
    }
    let rc = plain();
    let err = if rc == 0 { 0 } else { errno() };
    if let Some(done) = (hookproto::Ask { kind: hookproto::DONE, errno: err, ..ask }).encode() {
        // SAFETY: `done.len()` bytes of `done`, on our own connection.
        unsafe { send(conn, done.as_ptr().cast(), done.len(), MSG_DONTWAIT | MSG_NOSIGNAL) };
    }
    // SAFETY: our own connection, opened by `hook_socket`.
    unsafe { close(conn) };
    if rc != 0 {
        return None; // the hooks' logic binds again and says why it fails
    }
    let key = kept_key(port);
    if let Some(slot) = KEPT.iter().find(|k| k.load(Ordering::Relaxed) == 0).or(KEPT.get(usize::from(port) % KEPT.len())) {
        slot.store(key, Ordering::Relaxed);
    }
    Some(0)
}

/// The port map says this session's `port` lives elsewhere, or another session holds
/// it: a remap, which the hooks' logic makes (and tells the person); no point asking.
fn moved_for_session(port: u16) -> bool {
    let Some(view) = port_map() else { return false };
    let tag = session_tag().unwrap_or(0);
    let holder = view.held(port);
    view.lookup(tag, port).is_some_and(|a| a != port) || (holder != 0 && holder != tag)
}

/// A connection to the daemon's `hook.sock`, when it answers and runs as our uid.
fn hook_socket() -> Option<c_int> {
    // struct sockaddr_un: the family, then the path (108 bytes)
    let mut sun = [0u8; 110];
    let mut path = [0u8; 4096];
    let n = runtime_file(&mut path, b"/hook.sock\0");
    if n == 0 || n >= 108 {
        return None;
    }
    sun.get_mut(..2)?.copy_from_slice(&(AF_UNIX as u16).to_ne_bytes());
    sun.get_mut(2..2 + n)?.copy_from_slice(path.get(..n)?);
    // SAFETY: a new socket of ours (closed by our caller, or below).
    let fd = unsafe { socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    let connect = REAL_CONNECT.next();
    let mut cred = UCred { pid: 0, uid: u32::MAX, gid: 0 };
    let mut cl: SockLen = core::mem::size_of::<UCred>() as SockLen;
    // SAFETY: libc's connect with a `sockaddr_un` of `2 + n + 1` bytes (family, path,
    // NUL) in `sun`; getsockopt writes at most `cl` bytes into `cred`; getuid cannot fail.
    let ours = unsafe {
        connect.is_some_and(|connect| connect(fd, sun.as_ptr().cast(), (2 + n + 1) as SockLen) == 0)
            && getsockopt(fd, SOL_SOCKET, SO_PEERCRED, (&mut cred as *mut UCred).cast(), &mut cl) == 0
            && cred.uid == getuid()
    };
    if !ours {
        // SAFETY: our own socket, opened above.
        unsafe { close(fd) };
        return None;
    }
    Some(fd)
}

/// What the daemon said to an ask.
enum Heard {
    Answer(hookproto::Answer),
    /// Nothing within [`HOOK_ANSWER_MS`]: it is stalled (stopped, swamped).
    Silent,
    /// The exchange failed otherwise (a signal, a closed or foreign socket).
    Nothing,
}

/// Sends `ask` and waits (boundedly) for the daemon's answer.
fn exchange(conn: c_int, ask: &[u8]) -> Heard {
    // SAFETY: `ask.len()` bytes of `ask` (any fd may be sent to: at worst an error).
    if unsafe { send(conn, ask.as_ptr().cast(), ask.len(), MSG_DONTWAIT | MSG_NOSIGNAL) } != ask.len() as isize {
        return Heard::Nothing;
    }
    let mut p = PollFd { fd: conn, events: POLLIN, revents: 0 };
    // SAFETY: one `PollFd`, `p`.
    match unsafe { poll(&mut p, 1, HOOK_ANSWER_MS) } {
        0 => return Heard::Silent,
        1 => {}
        _ => return Heard::Nothing,
    }
    let mut buf = [0u8; hookproto::ANSWER_LEN + 1];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { recv(conn, buf.as_mut_ptr().cast(), buf.len(), MSG_DONTWAIT) };
    match usize::try_from(n).ok().and_then(|n| buf.get(..n)).and_then(hookproto::Answer::decode) {
        Some(a) => Heard::Answer(a),
        None => Heard::Nothing,
    }
}
