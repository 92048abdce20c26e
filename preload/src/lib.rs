//! `libstyxy_preload_core.so`: what the hooks do once the interposer has decided a
//! call is worth a look. Loaded with `dlopen` by `libstyxy_preload.so` on the first
//! interesting `bind()`, `listen()` or `connect()` of a process, never at start.
//!
//! Every entry point runs behind a reentrancy guard (our own sockets go through the
//! same hooks) and `catch_unwind`: on any failure the real function is called with the
//! original arguments, so the program sees what it would have seen without us.
//! There is no lock and no thread here: per-process state is published lock-free, so
//! a child forked while another thread was inside a hook starts clean.

mod bind;
mod connect;
mod listen;
mod process;
mod report;
mod sys;

use std::panic::{catch_unwind, AssertUnwindSafe};

use libc::{c_int, sockaddr, socklen_t};

pub use sys::{AddrFn, ListenFn};

/// # Safety
/// Called by the interposer with the program's `bind()` arguments and libc's `bind`.
#[no_mangle]
pub unsafe extern "C" fn styxy_core_bind(fd: c_int, addr: *const sockaddr, len: socklen_t, real: AddrFn) -> c_int {
    guarded(|| bind::bind(fd, addr, len, real), || real(fd, addr, len))
}

/// # Safety
/// Called by the interposer with the program's `listen()` arguments and libc's `listen`.
#[no_mangle]
pub unsafe extern "C" fn styxy_core_listen(fd: c_int, backlog: c_int, real: ListenFn) -> c_int {
    guarded(|| listen::listen(fd, backlog, real), || real(fd, backlog))
}

/// # Safety
/// Called by the interposer with the program's `connect()` arguments and libc's `connect`.
#[no_mangle]
pub unsafe extern "C" fn styxy_core_connect(fd: c_int, addr: *const sockaddr, len: socklen_t, real: AddrFn) -> c_int {
    guarded(|| connect::connect(fd, addr, len, real), || real(fd, addr, len))
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
