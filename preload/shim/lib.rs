//! `libstyxy_preload.so`: the interposer that `LD_PRELOAD` puts into every process.
//!
//! It is `no_std` and links nothing but libc, so loading it costs what any preload
//! library costs (a Rust `std` library would pull in `libgcc_s` and cost every process
//! an extra ~16%). It does no work at load time. Each hook filters with a few
//! comparisons (address family, port, loopback, session), decides with the one decision
//! (`decide`, common/src/decide.rs) and asks the daemon on `hook.sock` ([`keep`]) what it
//! must. It is the whole library: nothing of ours is ever loaded beside it, and the daemon
//! writes every event (what the shim did alone it tells in a note, [`said::note`]).
//!
//! Built by `build.rs` with `-C panic=abort` (Cargo cannot set panic per package);
//! nothing here can panic: no indexing, no unwrap.
//!
//! The fence (docs/ARCHITECTURE.md "The hooks inside foreign processes"): every `unsafe`
//! block says why it holds (`// SAFETY:`), every `unsafe fn` what its caller must hold
//! (`# Safety`), and `.ci/run` runs clippy on this crate with the lints below. A function
//! that reads through a pointer the program passed is `unsafe`; what it read goes on as
//! slices. A function of libc becomes a typed function in one place ([`slot::Slot`]).
//!
//! Here: the four exports and what each decides. Beside: [`sockinfo`] (the program's
//! address and socket), [`settings`] (the environment's switches), [`maps`] (the daemon's
//! policy and port maps), [`keep`] (a coordinated bind in one round trip on `hook.sock`),
//! [`daemon`] (reaching the daemon there), [`said`] (what else it is told, the spool and
//! the line when it cannot be asked), [`exec_hooks`] (static and Go programs started
//! under the seccomp supervisor), [`slot`] (a function of libc, found once), [`linkmap`]
//! (whether libc comes next, from the loader's list), [`elf`] (ELF's fields), [`sys`] (the
//! kernel, called directly), [`libc_calls`] (libc), [`cstring`] (C strings).
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

use core::ffi::{c_int, c_void};

use decide::{Class, ListenWay, Listening, Mode, Plan, Route, Seen, SocketFacts};
use keep::{keep, kept_by, origin};
use libc_calls::{abort, errno, set_errno, SockLen, EADDRINUSE, ECONNREFUSED, ENOSYS};
use maps::{port_class, vacant_block, with_port_map};
use said::{confirm, note, refused};
use settings::{enabled, in_session, isolate, mode, rule_class, session_tag, supervised};
use slot::{Direct, Slot};
use sockinfo::{stream, Facts, Inet};

/// What the daemon says of a block of ports as a link, a fresh process's look (one codec
/// for both ends).
#[allow(dead_code)]
#[path = "../../common/src/blocklink.rs"]
mod blocklink;
/// What happens to a call: the one decision, shared with the supervisor and the daemon.
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
mod cstring;
mod daemon;
mod elf;
mod exec_hooks;
mod keep;
mod libc_calls;
mod linkmap;
mod maps;
mod said;
mod settings;
mod slot;
mod sockinfo;
mod sys;
mod tell;

type AddrFn = unsafe extern "C" fn(c_int, *const c_void, SockLen) -> c_int;
type ListenFn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type NameFn = unsafe extern "C" fn(c_int, *mut c_void, *mut SockLen) -> c_int;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: unreachable in practice (nothing here panics); abort is always safe.
    unsafe { abort() }
}

// SAFETY: libc's `int bind(int, const struct sockaddr *, socklen_t)`, the system call.
static REAL_BIND: Slot<AddrFn> = unsafe { Slot::direct(c"bind", Direct::Kernel(sys::bind)) };
// SAFETY: libc's `int listen(int, int)`, the system call.
static REAL_LISTEN: Slot<ListenFn> = unsafe { Slot::direct(c"listen", Direct::Kernel(sys::listen)) };
// SAFETY: libc's `int connect(int, const struct sockaddr *, socklen_t)`, also called `__connect`.
static REAL_CONNECT: Slot<AddrFn> = unsafe { Slot::direct(c"connect", Direct::Import(libc_calls::__connect)) };
// SAFETY: libc's `int getsockname(int, struct sockaddr *, socklen_t *)`, the system call.
static REAL_GETSOCKNAME: Slot<NameFn> = unsafe { Slot::direct(c"getsockname", Direct::Kernel(sys::getsockname)) };

/// A cached answer (an environment switch).
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

/// A bind, as [`decide::plan`] says for its port's class (a rule of the process's own,
/// else the policy map): as asked (and only an `EADDRINUSE` goes further), or kept in one
/// round trip with the daemon ([`keep`]); what the daemon cannot be asked about goes as
/// asked, and what the shim did alone is told ([`note`]).
///
/// # Safety
/// `fd`, `addr` and `len` are the program's call to bind(2); `real` is libc's bind.
unsafe fn shim_bind(real: AddrFn, fd: c_int, addr: *const c_void, len: SockLen) -> c_int {
    // SAFETY: the program's own call, to libc's function (this function's contract).
    let plain = || unsafe { real(fd, addr, len) };
    // SAFETY: the program's address, read during its call.
    let Some(inet) = unsafe { Inet::of_call(addr, len) }.filter(|a| a.port != 0 && enabled() && !supervised()) else {
        return plain();
    };
    let saved = errno();
    let Some((class, own)) = class_of(inet.port) else {
        return plain();
    };
    let mode = mode();
    let mut facts = Facts::of(fd, if mode == Mode::Fallback { origin() } else { None });
    let plan = decide::plan(class, mode, &mut facts);
    // what the daemon plans with: the mode, the socket's sharing, the process's own rules
    let mode_flag = match mode {
        Mode::Fallback => hookproto::FALLBACK,
        Mode::OnConflict => hookproto::ON_CONFLICT_MODE,
        _ => 0,
    };
    let shares = |facts: &mut Facts| if facts.shares_port() { hookproto::SHARES_PORT } else { 0 };
    let own = if own { hookproto::OWN_RULES } else { 0 };
    set_errno(saved);
    let kept = match plan {
        Plan::AsAsked(_) => None,
        Plan::Observe => {
            let rc = plain();
            note(hookproto::NOTE_OBSERVED, inet.port, inet.family, own);
            return rc;
        }
        Plan::TryFirst { single, fallback } => {
            let rc = plain();
            // bound, or failed as the kernel says: only a stream's EADDRINUSE goes further
            if rc == 0 || errno() != EADDRINUSE || !facts.stream() {
                return rc;
            }
            if single {
                // a single-instance type's EADDRINUSE stands, and the daemon logs why
                note(hookproto::NOTE_SINGLE, inet.port, inet.family, own);
                return rc;
            }
            // another port of its type in one round trip — or, for a tool that moves on
            // by itself, its EADDRINUSE
            let taken = hookproto::TAKEN | mode_flag | own | if fallback { 0 } else { hookproto::MAY_MOVE };
            // SAFETY: the program's call, `inet` read from its address, libc's function.
            unsafe { keep(fd, addr, len, &inet, real, taken, None) }
        }
        // the daemon keeps this very port for us in one round trip (a tool that moves on
        // by itself: this port or its EADDRINUSE)
        Plan::AskFirst { fallback } => {
            let flags = shares(&mut facts) | mode_flag | own | if fallback { 0 } else { hookproto::MAY_MOVE };
            set_errno(saved);
            // SAFETY: the program's call, `inet` read from its address, libc's function.
            unsafe { keep(fd, addr, len, &inet, real, flags, facts.moved_from()) }
        }
    };
    match kept {
        Some(rc) => self::kept(rc, saved),
        None => {
            set_errno(saved);
            plain()
        }
    }
}

/// The class of `port` and whether a rule of the process's own gave it: the rule's
/// ([`rule_class`]), else the policy map's. Without a map this process may read (no
/// daemon ever ran here, or it is another user's) an unprivileged port below the
/// ephemeral range is asked about, so that the person hears why it is not coordinated;
/// `None` for a byte the map should not hold.
fn class_of(port: u16) -> Option<(Class, bool)> {
    if let Some(class) = rule_class(port) {
        return Some((class, true));
    }
    match port_class(port) {
        Some(byte) => Class::of_byte(byte).map(|c| (c, false)),
        None if (1024..32768).contains(&port) => Some((Class::Coordinated, false)),
        None => Some((Class::Untouched, false)),
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
/// afterwards, for a port a `fork`'s parent kept ([`confirm`]); or, for a socket the
/// kernel binds at this very listen, the port it chose told ([`note`]). A port-0 or
/// uncoordinated bind's listen reads no map: one `getsockname`.
///
/// # Safety
/// `fd` and `backlog` are the program's call to listen(2); `real` is libc's listen.
unsafe fn shim_listen(real: ListenFn, fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: the program's own call, to libc's function (this function's contract).
    let plain = || unsafe { real(fd, backlog) };
    if !enabled() || supervised() {
        return plain();
    }
    let saved = errno();
    let port = local_port(fd).map(|(_, port)| port);
    let p = port.unwrap_or(0);
    let (kept_here, kept_before) = kept_by(p);
    let way = decide::listen_way(Listening { port, kept_here, kept_before });
    set_errno(saved);
    let rc = plain();
    if rc != 0 {
        return rc;
    }
    match way {
        ListenWay::AsAsked => {}
        ListenWay::Confirm => confirm(p),
        ListenWay::Observe => {
            if let Some((family, chosen)) = local_port(fd).filter(|(_, port)| *port != 0) {
                note(hookproto::NOTE_KERNEL_CHOSE, chosen, family, 0);
            }
        }
    }
    set_errno(saved);
    rc
}

/// The family and port `fd` is bound to (`getsockname`); `None` for a socket that is not
/// an inet one.
fn local_port(fd: c_int) -> Option<(u16, u16)> {
    let mut ss = [0u8; 128];
    let mut sl: SockLen = 128;
    // SAFETY: getsockname writes at most `sl` (128) bytes into `ss`, and their length into `sl`.
    if unsafe { sys::getsockname(fd, ss.as_mut_ptr().cast::<c_void>(), &mut sl) } == 0 {
        ss.get(..(sl as usize).min(128)).and_then(Inet::parse).map(|a| (a.family, a.port))
    } else {
        None
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
/// port map ([`decide::route`]).
///
/// # Safety
/// `fd`, `addr` and `len` are the program's call to connect(2); `real` is libc's connect.
unsafe fn shim_connect(real: AddrFn, fd: c_int, addr: *const c_void, len: SockLen) -> c_int {
    // SAFETY: the program's own call, to libc's function (this function's contract).
    let plain = || unsafe { real(fd, addr, len) };
    // SAFETY: the program's address, read during its call.
    let Some(inet) =
        unsafe { Inet::of_call(addr, len) }.filter(|a| a.port != 0 && in_session() && a.is_loopback() && enabled() && !supervised())
    else {
        return plain();
    };
    match port_route(fd, inet.port) {
        Some(Route::To(actual)) if (len as usize) <= 128 => {
            // the caller's address with the session's actual port
            let copy = inet.with_port(actual);
            // SAFETY: `len` (≤ 128, all of `inet.bytes`) bytes of `copy`, a sockaddr like the program's.
            unsafe { real(fd, copy.as_ptr().cast(), len) }
        }
        // as if nothing listened; the daemon logs it and the person is told once ([`refused`])
        Some(Route::Refused) => {
            refused(inet.port, inet.family);
            set_errno(ECONNREFUSED);
            -1
        }
        _ => plain(),
    }
}

/// Where a loopback connect of `fd` in a session goes ([`decide::route`] over the port
/// map, the process's own rules and the policy map); `None` outside any session.
fn port_route(fd: c_int, port: u16) -> Option<Route> {
    let tag = session_tag()?;
    if vacant_block(port) {
        return Some(Route::AsAsked); // nobody holds or asked for a port near it
    }
    let Some((remapped, holder)) = with_port_map(|m| m.found(tag, port)) else {
        return Some(Route::AsAsked); // no daemon yet: nothing to follow
    };
    let class = || rule_class(port).or_else(|| port_class(port).and_then(Class::of_byte));
    Some(decide::route(port, Seen { tag, remapped, holder }, isolate(), class, || stream(fd)))
}
