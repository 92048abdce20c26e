//! `libstyxy_preload_core.so`: what the hooks do once the interposer has decided a
//! call is worth a look. Loaded with `dlopen` by `libstyxy_preload.so` on the first
//! interesting `bind()`, `listen()` or `connect()` of a process, never at start.
//!
//! Every entry point runs behind a reentrancy guard (our own sockets go through the
//! same hooks) and `catch_unwind`: on any failure the real function is called with the
//! original arguments, so the program sees what it would have seen without us.
//! There is no lock and no thread here: per-process state is published lock-free, so
//! a child forked while another thread was inside a hook starts clean.

// The entry points below are `unsafe fn`s whose contract (`# Safety`) is the program's call
// itself, which they hand on whole to libc's function and to `Addr::read`.
#![allow(unsafe_op_in_unsafe_fn)]

pub mod bind;
pub mod call;
pub mod connect;
pub mod listen;
pub mod process;
pub mod report;
pub mod sys;
#[cfg(test)]
mod testing;

use std::panic::{catch_unwind, AssertUnwindSafe};

use libc::{c_int, sockaddr, socklen_t, ECONNREFUSED};

pub use call::{Caller, Route, Socket, Verdict};
pub use sys::{Addr, AddrFn, ListenFn};

/// # Safety
/// Called by the interposer with the program's `bind()` arguments and libc's `bind`.
#[no_mangle]
pub unsafe extern "C" fn styxy_core_bind(fd: c_int, addr: *const sockaddr, len: socklen_t, real: AddrFn) -> c_int {
    let plain = || real(fd, addr, len);
    guarded(
        || {
            let p = process::get();
            match Addr::read(addr, len) {
                Some(orig) if !p.supervised => {
                    let mut sock = Local { fd, call: LocalCall::Bind(addr, len, real), errno: sys::errno() };
                    let verdict = bind::decide(p, &p.caller(), &orig, &mut sock, &mut bind::Daemon(&p.endpoint));
                    if matches!(verdict, Verdict::Done(Ok(()))) {
                        note_moved(fd, orig.port);
                    }
                    finish(verdict, sock.errno, plain)
                }
                _ => plain(),
            }
        },
        plain,
    )
}

/// # Safety
/// Called by the interposer with the program's `bind()` arguments and libc's `bind`
/// when the daemon did not answer its own ask in time: bound as asked, and said.
#[no_mangle]
pub unsafe extern "C" fn styxy_core_unanswered(fd: c_int, addr: *const sockaddr, len: socklen_t, real: AddrFn) -> c_int {
    let plain = || real(fd, addr, len);
    guarded(
        || {
            let p = process::get();
            let errno = sys::errno();
            if let Some(orig) = Addr::read(addr, len) {
                bind::unanswered(p, &p.caller(), &orig);
            }
            sys::set_errno(errno);
            plain()
        },
        plain,
    )
}

/// # Safety
/// Called by the interposer with the program's `listen()` arguments and libc's `listen`.
#[no_mangle]
pub unsafe extern "C" fn styxy_core_listen(fd: c_int, backlog: c_int, real: ListenFn) -> c_int {
    let plain = || real(fd, backlog);
    guarded(
        || {
            let p = process::get();
            if p.supervised {
                return plain();
            }
            let mut sock = Local { fd, call: LocalCall::Listen(backlog, real), errno: sys::errno() };
            finish(listen::decide(p, &p.caller(), &mut sock), sock.errno, plain)
        },
        plain,
    )
}

/// # Safety
/// Called by the interposer with the program's `connect()` arguments and libc's `connect`.
#[no_mangle]
pub unsafe extern "C" fn styxy_core_connect(fd: c_int, addr: *const sockaddr, len: socklen_t, real: AddrFn) -> c_int {
    let plain = || real(fd, addr, len);
    guarded(
        || {
            let p = process::get();
            let errno = sys::errno();
            let route = match Addr::read(addr, len) {
                Some(orig) if !p.supervised => connect::route(p, &orig, &mut || sys::sock_type(fd)),
                _ => Route::AsAsked,
            };
            sys::set_errno(errno);
            match route {
                Route::AsAsked => plain(),
                Route::To(target) => real(fd, target.ptr(), target.socklen()),
                Route::Refused => {
                    if let Some(orig) = Addr::read(addr, len) {
                        report::refused(p, &p.caller(), &orig);
                    }
                    sys::set_errno(ECONNREFUSED);
                    -1
                }
            }
        },
        plain,
    )
}

/// Records a successful bind that landed elsewhere than `asked` in the interposer's
/// record of moved sockets (`styxy_preload_moved`: what `getsockname` tells a Node
/// cluster primary, docs/ARCHITECTURE.md "What a program sees").
fn note_moved(fd: c_int, asked: u16) {
    if asked == 0 {
        return;
    }
    let errno = sys::errno();
    if let Some(got) = sys::local_addr(fd).filter(|a| a.port != asked) {
        // SAFETY: dlsym of a NUL-terminated name; when found, the interposer's
        // `styxy_preload_moved(int, uint16_t, uint16_t)` (preload/shim/moved.rs).
        unsafe {
            let f = libc::dlsym(libc::RTLD_DEFAULT, c"styxy_preload_moved".as_ptr());
            if !f.is_null() {
                let f: extern "C" fn(c_int, u16, u16) = std::mem::transmute(f);
                f(fd, asked, got.port);
            }
        }
    }
    sys::set_errno(errno);
}

/// The program's own socket, in this process.
struct Local {
    fd: c_int,
    call: LocalCall,
    /// errno at entry: what a successful call leaves behind.
    errno: c_int,
}

enum LocalCall {
    Bind(*const sockaddr, socklen_t, AddrFn),
    Listen(c_int, ListenFn),
}

impl Socket for Local {
    fn reachable(&mut self) -> bool {
        true
    }

    fn sock_type(&mut self) -> Option<c_int> {
        sys::sock_type(self.fd)
    }

    fn shares_port(&mut self) -> bool {
        sys::shares_port(self.fd)
    }

    fn local_addr(&mut self) -> Option<Addr> {
        sys::local_addr(self.fd)
    }

    fn run(&mut self, addr: Option<&Addr>) -> Result<(), c_int> {
        sys::set_errno(self.errno);
        // SAFETY: the program's own arguments, or our copy of its address.
        let rc = unsafe {
            match (&self.call, addr) {
                (LocalCall::Bind(_, _, real), Some(a)) => real(self.fd, a.ptr(), a.socklen()),
                (LocalCall::Bind(ptr, len, real), None) => real(self.fd, *ptr, *len),
                (LocalCall::Listen(backlog, real), _) => real(self.fd, *backlog),
            }
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(sys::errno())
        }
    }
}

/// The verdict as the program sees it: a return value and errno.
fn finish(v: Verdict, entry_errno: c_int, plain: impl FnOnce() -> c_int) -> c_int {
    match v {
        Verdict::AsAsked => {
            sys::set_errno(entry_errno);
            plain()
        }
        Verdict::Done(Ok(())) => {
            sys::set_errno(entry_errno);
            0
        }
        Verdict::Done(Err(e)) => {
            sys::set_errno(e);
            -1
        }
    }
}

thread_local! {
    static INSIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `hook` unless this thread is already inside one of ours (then `plain`); a
/// panic falls back to `plain` with the errno of entry.
fn guarded(hook: impl FnOnce() -> c_int, plain: impl FnOnce() -> c_int) -> c_int {
    let entered = INSIDE.try_with(|i| !i.replace(true)).unwrap_or(false);
    if !entered {
        return plain();
    }
    let errno = sys::errno();
    let r = catch_unwind(AssertUnwindSafe(hook));
    let _ = INSIDE.try_with(|i| i.set(false));
    match r {
        Ok(rc) => rc,
        Err(_) => {
            sys::set_errno(errno);
            plain()
        }
    }
}
