//! `libstyxy_preload.so`: the interposer that `LD_PRELOAD` puts into every process.
//!
//! It is `no_std` and links nothing but libc, so loading it costs what any preload
//! library costs (a Rust `std` library would pull in `libgcc_s` and cost every process
//! an extra ~16%). It does no work at load time. Each hook filters with a few
//! comparisons (address family, port, loopback, session), decides with the one decision
//! (`decide`, common/src/decide.rs) and asks the daemon on `hook.sock` ([`keep`]) what it
//! must; only what that cannot answer (rules of the process's own, observe mode, no
//! daemon, a failed grant) loads `libstyxy_preload_core.so` (once, with `dlopen`) and
//! hands it the call together with the real function.
//!
//! Built by `build.rs` with `-C panic=abort` (Cargo cannot set panic per package);
//! nothing here can panic: no indexing, no unwrap.
//!
//! The fence (docs/ARCHITECTURE.md "The hooks inside foreign processes"): every `unsafe`
//! block says why it holds (`// SAFETY:`), every `unsafe fn` what its caller must hold
//! (`# Safety`), and `.ci/run` runs clippy on this crate with the lints below. A function
//! that reads through a pointer the program passed is `unsafe`; what it read goes on as
//! slices. A `dlsym` answer becomes a typed function in one place ([`slot::Slot`]).
//!
//! Here: the four exports and what each decides. Beside: [`sockinfo`] (the program's
//! address and socket), [`settings`] (the environment's switches), [`maps`] (the daemon's
//! policy and port maps), [`keep`] (a coordinated bind in one round trip on `hook.sock`),
//! [`corelib`] (loading the hooks' logic), [`exec_hooks`] (static and Go programs started
//! under the seccomp supervisor), [`slot`], [`libc_calls`] (libc), [`cstring`] (C strings).
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

use core::ffi::{c_int, c_void};

use corelib::{core_fn, core_present, CORE_BIND, CORE_CONNECT, CORE_LISTEN};
use decide::{Class, Facts, ListenWay, Listening, Mode, Plan, Route, Seen};
use keep::{confirm, keep, kept_by, origin, refused};
use libc_calls::{abort, errno, set_errno, SockLen, EADDRINUSE, ECONNREFUSED, ENOSYS};
use maps::{port_class, with_port_map};
use settings::{enabled, in_session, isolate, mode, own_rules, session_tag};
use slot::Slot;
use sockinfo::{shares_port, stream, Inet};

/// What happens to a call: the one decision, shared with the hooks' logic and the daemon.
#[allow(dead_code)]
#[path = "../../common/src/decide.rs"]
mod decide;
/// The port map's reader, shared with the client crate (one reader for both).
#[allow(dead_code)]
#[path = "../../common/src/mapview.rs"]
mod mapview;

/// The fixed-layout exchange with the daemon for a coordinated bind (one layout for both ends).
#[allow(dead_code)]
#[path = "../../common/src/hookproto.rs"]
mod hookproto;
/// The sockets a bind moved (one record for the shim and the hooks' logic).
#[path = "../../common/src/moved.rs"]
mod moved_table;
/// Where a line of ours may go on stderr (one rule for the shim and the hooks' logic).
#[allow(dead_code)]
#[path = "../../common/src/notice.rs"]
mod notice_rule;
#[path = "../../common/src/sockaddr.rs"]
mod sockaddr;
/// How the environment's switches read (one parse for the shim and the hooks' logic).
#[path = "../../common/src/switch.rs"]
mod switch;

mod cluster;
mod corelib;
mod cstring;
mod exec_hooks;
mod keep;
mod libc_calls;
mod maps;
mod settings;
mod slot;
mod sockinfo;
mod tell;

type AddrFn = unsafe extern "C" fn(c_int, *const c_void, SockLen) -> c_int;
type ListenFn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type NameFn = unsafe extern "C" fn(c_int, *mut c_void, *mut SockLen) -> c_int;
type CoreAddrFn = unsafe extern "C" fn(c_int, *const c_void, SockLen, AddrFn) -> c_int;
type CoreListenFn = unsafe extern "C" fn(c_int, c_int, ListenFn) -> c_int;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: unreachable in practice (nothing here panics); abort is always safe.
    unsafe { abort() }
}

// SAFETY: libc's `int bind(int, const struct sockaddr *, socklen_t)`.
static REAL_BIND: Slot<AddrFn> = unsafe { Slot::new(c"bind") };
// SAFETY: libc's `int listen(int, int)`.
static REAL_LISTEN: Slot<ListenFn> = unsafe { Slot::new(c"listen") };
// SAFETY: libc's `int connect(int, const struct sockaddr *, socklen_t)`.
static REAL_CONNECT: Slot<AddrFn> = unsafe { Slot::new(c"connect") };
// SAFETY: libc's `int getsockname(int, struct sockaddr *, socklen_t *)`.
static REAL_GETSOCKNAME: Slot<NameFn> = unsafe { Slot::new(c"getsockname") };

/// A cached answer (an environment switch, whether the core is loaded).
const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;

/// What a call gets when libc has no such function: `ENOSYS`.
fn missing() -> c_int {
    set_errno(ENOSYS);
    -1
}

/// An export the program calls instead of libc's: it finds libc's function in `$slot`
/// (`ENOSYS` when there is none) and hands the call, with it, to the shim's `$body`.
macro_rules! hook {
    ($slot:ident => fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident) => {
        #[doc = concat!("`", stringify!($name), "` as the program calls it: [`", stringify!($body), "`].")]
        ///
        /// # Safety
        /// The program's call, with the arguments the C function takes.
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            let Some(real) = $slot.next() else {
                return missing();
            };
            // SAFETY: the program's call (this function's contract) and libc's function.
            unsafe { $body(real, $($arg),*) }
        }
    };
}

hook!(REAL_BIND => fn bind(fd: c_int, addr: *const c_void, len: SockLen) -> c_int = shim_bind);
hook!(REAL_LISTEN => fn listen(fd: c_int, backlog: c_int) -> c_int = shim_listen);
hook!(REAL_GETSOCKNAME => fn getsockname(fd: c_int, addr: *mut c_void, len: *mut SockLen) -> c_int = shim_getsockname);
hook!(REAL_CONNECT => fn connect(fd: c_int, addr: *const c_void, len: SockLen) -> c_int = shim_connect);

/// A bind, as [`decide::plan`] says for its port's class in the policy map: as asked
/// (and only an `EADDRINUSE` goes further), or kept in one round trip with the daemon
/// ([`keep`]); the rest — rules of the process's own, no map, a shared port, a failed or
/// declined ask — the hooks' logic decides.
///
/// # Safety
/// `fd`, `addr` and `len` are the program's call to bind(2); `real` is libc's bind.
unsafe fn shim_bind(real: AddrFn, fd: c_int, addr: *const c_void, len: SockLen) -> c_int {
    // SAFETY: the program's own call, to libc's function (this function's contract).
    let plain = || unsafe { real(fd, addr, len) };
    // SAFETY: the program's address, read during its call.
    let Some(inet) = unsafe { Inet::of_call(addr, len) }.filter(|a| a.port != 0 && enabled()) else {
        return plain();
    };
    let saved = errno();
    if let Some(class) = port_class(inet.port).and_then(Class::of_byte) {
        let mut facts = Facts::default();
        let mode = mode();
        let plan = decide::plan(class, mode, || {
            let moved_from = if mode == Mode::Fallback { origin() } else { None };
            facts = Facts { stream: stream(fd), shares_port: shares_port(fd), moved_from };
            facts
        });
        // what the daemon plans with: the mode, the socket's sharing
        let mode_flag = match mode {
            Mode::Fallback => hookproto::FALLBACK,
            Mode::OnConflict => hookproto::ON_CONFLICT_MODE,
            _ => 0,
        };
        let shares = if facts.shares_port { hookproto::SHARES_PORT } else { 0 };
        set_errno(saved);
        match plan {
            Plan::AsAsked(_) => return plain(),
            Plan::TryFirst { single, fallback } => {
                let rc = plain();
                // bound, or failed as the kernel says: only a stream's EADDRINUSE goes further
                if rc == 0 || errno() != EADDRINUSE || !facts.stream {
                    return rc;
                }
                // another port of its type in one round trip — or, for a tool that moves
                // on by itself, its EADDRINUSE (a single-instance type's EADDRINUSE stands,
                // and the hooks' logic says why)
                let taken = hookproto::TAKEN | mode_flag | if fallback { 0 } else { hookproto::MAY_MOVE };
                // SAFETY: the program's call, `inet` read from its address, libc's function.
                if let Some(rc) = (!single).then(|| unsafe { keep(fd, addr, len, &inet, real, taken, None) }).flatten() {
                    return kept(rc, saved);
                }
            }
            // the daemon keeps this very port for us in one round trip (a tool that moves on
            // by itself: this port or its EADDRINUSE), or the hooks' logic decides
            Plan::AskFirst { fallback } => {
                let flags = shares | mode_flag | if fallback { 0 } else { hookproto::MAY_MOVE };
                // SAFETY: the program's call, `inet` read from its address, libc's function.
                if let Some(rc) = unsafe { keep(fd, addr, len, &inet, real, flags, facts.moved_from) } {
                    return kept(rc, saved);
                }
            }
            Plan::Observe => {}
        }
    }
    set_errno(saved);
    match core_fn(&CORE_BIND) {
        // SAFETY: the program's call and libc's function, as the core's bind takes them.
        Some(hook) => unsafe { hook(fd, addr, len, real) },
        None => plain(),
    }
}

/// A bind [`keep`] carried out: its result, with errno as at entry (`saved`) when it is 0.
fn kept(rc: c_int, saved: c_int) -> c_int {
    if rc == 0 {
        set_errno(saved);
    }
    rc
}

/// A listen, as [`decide::listen_way`] says: as asked; or confirmed with the daemon
/// afterwards, for a port a `fork`'s parent kept ([`confirm`]); or the hooks' logic's,
/// for a socket the kernel binds at this listen (observed) or once it is loaded. A
/// port-0 or uncoordinated bind's listen reads no map: one `getsockname`.
///
/// # Safety
/// `fd` and `backlog` are the program's call to listen(2); `real` is libc's listen.
unsafe fn shim_listen(real: ListenFn, fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: the program's own call, to libc's function (this function's contract).
    let plain = || unsafe { real(fd, backlog) };
    if !enabled() {
        return plain();
    }
    let saved = errno();
    let mut ss = [0u8; 128];
    let mut sl: SockLen = 128;
    // SAFETY: getsockname writes at most `sl` (128) bytes into `ss`, and their length into `sl`.
    let named = REAL_GETSOCKNAME.next().is_some_and(|name| unsafe { name(fd, ss.as_mut_ptr().cast(), &mut sl) } == 0);
    let port = if named { ss.get(..(sl as usize).min(128)).and_then(Inet::parse).map(|a| a.port) } else { None };
    let p = port.unwrap_or(0);
    let (kept_here, kept_before) = kept_by(p);
    let way = decide::listen_way(Listening { port, kept_here, kept_before, logic_loaded: core_present() });
    set_errno(saved);
    match way {
        ListenWay::AsAsked => plain(),
        ListenWay::Confirm => {
            let rc = plain();
            if rc == 0 {
                confirm(p);
            }
            rc
        }
        ListenWay::Logic => match core_fn(&CORE_LISTEN) {
            // SAFETY: the program's call and libc's function, as the core's listen takes them.
            Some(hook) => unsafe { hook(fd, backlog, real) },
            None => plain(),
        },
    }
}

/// A getsockname: the kernel's answer, but for a socket this process's bind moved when a
/// child is a Node cluster worker ([`cluster`]; docs/ARCHITECTURE.md "What a program sees").
///
/// # Safety
/// `fd`, `addr` and `len` are the program's call to getsockname(2); `real` is libc's.
unsafe fn shim_getsockname(real: NameFn, fd: c_int, addr: *mut c_void, len: *mut SockLen) -> c_int {
    // SAFETY: the program's own call, to libc's function (this function's contract).
    let rc = unsafe { real(fd, addr, len) };
    // only the family and the port, the first 4 bytes, are read and written: `*len` is the
    // address's whole length, which a buffer the kernel truncated is shorter than
    // SAFETY: the program's `len`, which the kernel just wrote (rc 0), read during its call.
    if rc == 0 && !addr.is_null() && !len.is_null() && unsafe { *len } >= 4 {
        // SAFETY: at least 4 bytes at `addr`, the program's buffer the kernel just filled.
        let head = unsafe { core::slice::from_raw_parts_mut(addr.cast::<u8>(), 4) };
        if let Some(asked) = sockaddr::head(head).and_then(|(_, got)| cluster::shown(fd, got)) {
            sockaddr::set_port(head, asked);
        }
    }
    rc
}

/// A connect: as asked, unless it is a session's loopback connect, which follows the
/// port map ([`route`]) or the hooks' logic.
///
/// # Safety
/// `fd`, `addr` and `len` are the program's call to connect(2); `real` is libc's connect.
unsafe fn shim_connect(real: AddrFn, fd: c_int, addr: *const c_void, len: SockLen) -> c_int {
    // SAFETY: the program's own call, to libc's function (this function's contract).
    let plain = || unsafe { real(fd, addr, len) };
    // SAFETY: the program's address, read during its call.
    let Some(inet) = unsafe { Inet::of_call(addr, len) }.filter(|a| a.port != 0 && in_session() && a.is_loopback() && enabled()) else {
        return plain();
    };
    match port_route(fd, inet.port) {
        Some(Route::To(actual)) if (len as usize) <= 128 => {
            // the caller's address with the session's actual port
            let copy = inet.with_port(actual);
            // SAFETY: `len` (≤ 128, all of `inet.bytes`) bytes of `copy`, a sockaddr like the program's.
            unsafe { real(fd, copy.as_ptr().cast(), len) }
        }
        // as if nothing listened; the daemon logs it and the person is told once ([`refused`]),
        // or the hooks' logic does when the daemon cannot be asked
        Some(Route::Refused) => match if refused(inet.port, inet.family) { None } else { core_fn(&CORE_CONNECT) } {
            // SAFETY: the program's call and libc's function, as the core's connect takes them.
            Some(hook) => unsafe { hook(fd, addr, len, real) },
            None => {
                set_errno(ECONNREFUSED);
                -1
            }
        },
        Some(_) => plain(),
        // the hooks' logic changes only stream connects: a datagram one (a DNS query to
        // 127.0.0.53) never loads it
        None if !stream(fd) => plain(),
        None => match core_fn(&CORE_CONNECT) {
            // SAFETY: the program's call and libc's function, as the core's connect takes them.
            Some(hook) => unsafe { hook(fd, addr, len, real) },
            None => plain(),
        },
    }
}

/// The shim's own answer for a loopback connect of `fd` in a session ([`decide::route`]
/// over the port map and the policy map); `None` when the hooks' logic must decide (the
/// process has rules of its own, or the session id needs more than the map's tag).
fn port_route(fd: c_int, port: u16) -> Option<Route> {
    if own_rules() {
        return None;
    }
    let tag = session_tag()?;
    let Some((remapped, holder)) = with_port_map(|m| (m.lookup(tag, port), m.held(port))) else {
        return Some(Route::AsAsked); // no daemon yet: nothing to follow
    };
    let class = || port_class(port).and_then(Class::of_byte);
    Some(decide::route(port, Seen { tag, remapped, holder }, isolate(), class, || stream(fd)))
}
