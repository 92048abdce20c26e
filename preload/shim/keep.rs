//! A coordinated bind, kept or moved, in one round trip on the daemon's `hook.sock`
//! (docs/ARCHITECTURE.md "Hook ↔ daemon protocol"), and what this process kept: its
//! ports, and a tool's first port in fallback mode.

use core::ffi::{c_int, c_void, CStr};
use core::sync::atomic::Ordering;

use crate::cluster;
use crate::cstring::{decimal, put};
use crate::daemon::{exchange, hook_socket, Heard};
use crate::libc_calls::{errno, monotonic_ms, set_errno, SockLen, AF_INET6, EADDRINUSE, MSG_DONTWAIT, MSG_NOSIGNAL};
use crate::maps::with_port_map;
use crate::said::{self, own_comm, thread_comm, unasked};
use crate::settings::{env, session_tag};
use crate::sockinfo::Inet;
use crate::sys::{close, getpid, send};
use crate::tell::notice;
use crate::{hookproto, AddrFn};

/// Granted ports found taken at OS level (someone uncoordinated bound one between the
/// daemon's check and this bind), each asked again, before the bind goes as asked.
const MAX_RETRIES: u32 = 3;

/// Ports this process bound through [`keep`] (pid and port; a forked child's pid differs,
/// so its `listen()` still confirms with the daemon, becoming an owner).
static KEPT: [core::sync::atomic::AtomicU64; 4] = [const { core::sync::atomic::AtomicU64::new(0) }; 4];

pub(crate) fn kept_key(port: u16) -> u64 {
    (u64::from(getpid() as u32) << 16) | u64::from(port)
}

/// Whether `port` was kept through [`keep`] by this process (it owns the allocation
/// already: its `listen()` has nothing to confirm) and by an ancestor before a `fork` (this
/// process's `listen()` confirms it, becoming an owner that outlives its parent).
pub(crate) fn kept_by(port: u16) -> (bool, bool) {
    if KEPT.iter().all(|k| k.load(Ordering::Relaxed) == 0) {
        return (false, false); // nothing kept: no getpid
    }
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
    let session = unsafe { session() };
    // its name: the daemon answers before it reads the rest of who asks
    let mut comm = [0u8; 17];
    let ask = hookproto::Ask {
        kind: hookproto::KEEP,
        port,
        family: family_byte(inet.family),
        flags,
        origin: origin.unwrap_or(0),
        session,
        comm: own_comm(&mut comm),
        ..NO_ASK
    };
    let saved = errno();
    if let Some(got) = stuck_to(port, flags) {
        // SAFETY: the program's call, `inet` read from its address, libc's function.
        if unsafe { bind_to(fd, addr, len, inet, real, got) } == 0 {
            said::stuck(&ask, got);
            return Some(bound(fd, port, got, saved));
        }
        set_errno(saved); // taken meanwhile, or refused: asked as any bind
    }
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
        // SAFETY: the program's call, `inet` read from its address, libc's function.
        let rc = unsafe { bind_to(fd, addr, len, inet, real, granted.port) };
        let err = if rc == 0 { 0 } else { errno() };
        done(conn, &hookproto::Ask { kind: hookproto::DONE, port: granted.port, errno: err, ..ask });
        set_errno(saved);
        match err {
            0 => return Some(bound(fd, port, granted.port, saved)),
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

/// The program's bind, of `port` (the one it asked, or another in a copy of its address).
///
/// # Safety
/// As [`keep`]'s.
unsafe fn bind_to(fd: c_int, addr: *const c_void, len: SockLen, inet: &Inet, real: AddrFn, port: u16) -> c_int {
    if port == inet.port {
        // SAFETY: the program's own call, to libc's function (this function's contract).
        unsafe { real(fd, addr, len) }
    } else {
        let moved = inet.with_port(port);
        // SAFETY: `len` (≤ 128, all of `inet.bytes`) bytes of `moved`: the program's
        // address with the granted port.
        unsafe { real(fd, moved.as_ptr().cast(), len) }
    }
}

/// `fd` is bound to `got` for `asked`: kept by this process, the person told of a move;
/// 0, with errno as at entry (`saved`).
fn bound(fd: c_int, asked: u16, got: u16, saved: c_int) -> c_int {
    remember_kept(got);
    if got != asked {
        told_moved(fd, asked, got);
    }
    set_errno(saved);
    0
}

/// The session's own port for `port` (docs/ARCHITECTURE.md "Session stickiness"): the port
/// map of a daemon that beats says this session holds a port for it — what a `KEEP` would
/// be answered again (a server restarted, a second process of the session) — bound with
/// no round trip. Only for a plain ask (no other flag than [`hookproto::MAY_MOVE`], which
/// another port needs).
fn stuck_to(port: u16, flags: u8) -> Option<u16> {
    let tag = session_tag().filter(|_| flags & !hookproto::MAY_MOVE == 0)?;
    let now = monotonic_ms();
    let got = with_port_map(|m| m.alive(now).then(|| m.found(tag, port).0).flatten().filter(|p| m.held(*p) == tag)).flatten()?;
    (got == port || flags & hookproto::MAY_MOVE != 0).then_some(got)
}

/// An ask with nothing in it, for `..NO_ASK`.
pub(crate) const NO_ASK: hookproto::Ask<'static> =
    hookproto::Ask { kind: 0, port: 0, family: 4, errno: 0, flags: 0, origin: 0, session: &[], note: 0, comm: &[] };

/// `STYXY_PRELOAD_SESSION` as an ask carries it (empty for none): one byte too long for
/// [`hookproto::SESSION_MAX`] when it is longer, so that the ask is not sent (a cut session
/// would be another's).
///
/// # Safety
/// As [`env`]: the bytes are copied into a message before the hook returns.
pub(crate) unsafe fn session<'a>() -> &'a [u8] {
    // SAFETY: this function's contract.
    let s = unsafe { env(c"STYXY_PRELOAD_SESSION") }.unwrap_or_default();
    s.get(..hookproto::SESSION_MAX + 1).unwrap_or(s)
}

/// 4 or 6, as an ask names an address family.
pub(crate) fn family_byte(family: u16) -> u8 {
    if family == AF_INET6 {
        6
    } else {
        4
    }
}

/// Sends the `DONE` `ask` on `conn` without waiting, and closes it. Its message's buffer
/// lives in this frame alone: a hook's stack stays small (a thread may have 16 kB).
#[inline(never)]
fn done(conn: c_int, ask: &hookproto::Ask) {
    let mut msg = [0u8; hookproto::DONE_MAX];
    let n = done_message(ask, &mut msg);
    // SAFETY: `n` (≤ DONE_MAX) bytes of `msg`, on our own connection, closed here.
    unsafe {
        send(conn, msg.as_ptr().cast(), n, MSG_DONTWAIT | MSG_NOSIGNAL);
        close(conn);
    }
}

/// The `DONE` for `ask` into `buf`: the ask, then the variables of this process's
/// environment that name its event log (`hookproto::LOG_VARS`, as many as fit): the
/// daemon writes the bind's event there. Its length (0 sends nothing).
pub(crate) fn done_message(ask: &hookproto::Ask, buf: &mut [u8]) -> usize {
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
#[inline(never)]
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
        Heard::Closed => Err(Heard::Closed),
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
    let comm = thread_comm(&mut comm);
    let (mut a, mut g, mut p) = ([0u8; 8], [0u8; 8], [0u8; 12]);
    let (an, gn) = (decimal(&mut a, 0, u32::from(asked)), decimal(&mut g, 0, u32::from(got)));
    let pn = decimal(&mut p, 0, getpid() as u32);
    let (a, g, p) = (a.get(..an).unwrap_or(&[]), g.get(..gn).unwrap_or(&[]), p.get(..pn).unwrap_or(&[]));
    notice(&[b"port ", a, b" is taken; ", comm, b" (pid ", p, b") got ", g]);
}
