//! What the shim uses of libc (`dlsym`, the environment, `errno`, the vDSO clock; its
//! system calls are `sys`'s), the kernel's structures and the constants' Linux values.

use core::ffi::{c_char, c_int, c_void};

pub(crate) type SockLen = u32;

#[repr(C)]
pub(crate) struct PollFd {
    pub(crate) fd: c_int,
    pub(crate) events: i16,
    pub(crate) revents: i16,
}

#[repr(C)]
pub(crate) struct UCred {
    pub(crate) pid: c_int,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

#[repr(C)]
pub(crate) struct IoVec {
    pub(crate) base: *mut c_void,
    pub(crate) len: usize,
}

#[repr(C)]
pub(crate) struct TimeSpec {
    pub(crate) sec: i64,
    pub(crate) nsec: i64,
}

#[repr(C)]
pub(crate) struct TimeVal {
    pub(crate) sec: i64,
    pub(crate) usec: i64,
}

#[link(name = "c")]
extern "C" {
    pub(crate) fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    pub(crate) fn getenv(name: *const c_char) -> *const c_char;
    fn __errno_location() -> *mut c_int;
    pub(crate) fn abort() -> !;
    fn clock_gettime(clock: c_int, ts: *mut TimeSpec) -> c_int;
    pub(crate) static environ: crate::exec_hooks::Argv;
    pub(crate) fn faccessat(dirfd: c_int, path: *const c_char, mode: c_int, flags: c_int) -> c_int;
    pub(crate) fn getauxval(kind: u64) -> u64;
    /// libc's `connect` under its other name: a cancellation point, so the shim calls
    /// libc's rather than the system call ([`crate::slot::Direct::Import`]).
    pub(crate) fn __connect(fd: c_int, addr: *const c_void, len: SockLen) -> c_int;
    /// Only where the kernel has no `statx` (`sys::statx`).
    pub(crate) fn statx(dirfd: c_int, path: *const c_char, flags: c_int, mask: u32, buf: *mut u8) -> c_int;
}

pub(crate) const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;
pub(crate) use crate::sockaddr::AF_INET6;
pub(crate) const ENOSYS: c_int = 38;
pub(crate) const EPERM: c_int = 1;
pub(crate) const SOL_SOCKET: c_int = 1;
pub(crate) const SO_TYPE: c_int = 3;
pub(crate) const O_NOCTTY: c_int = 0o400;
pub(crate) const O_NONBLOCK: c_int = 0o4000;
pub(crate) const O_CLOEXEC: c_int = 0o2000000;
pub(crate) const O_RDONLY: c_int = 0;
pub(crate) const O_NOFOLLOW: c_int = 0o400000;
pub(crate) const PROT_READ: c_int = 1;
pub(crate) const MAP_SHARED: c_int = 1;
pub(crate) const AT_EMPTY_PATH: c_int = 0x1000;
pub(crate) const AT_FDCWD: c_int = -100;
pub(crate) const AT_SYMLINK_NOFOLLOW: c_int = 0x100;
pub(crate) const O_DIRECTORY: c_int = 0o200000;
pub(crate) const STATX_INO: u32 = 0x100;
pub(crate) const STATX_MODE_UID_SIZE: u32 = 0x2 | 0x8 | 0x200;
pub(crate) const STATX_NLINK: u32 = 0x4;
pub(crate) const S_IFMT: u16 = 0o170000;
pub(crate) const S_IFSOCK: u16 = 0o140000;
pub(crate) const S_IFREG: u16 = 0o100000;
pub(crate) const S_IFDIR: u16 = 0o040000;
pub(crate) const EADDRINUSE: c_int = 98;
pub(crate) const SO_REUSEPORT: c_int = 15;
pub(crate) const SO_PEERCRED: c_int = 17;
pub(crate) const AF_UNIX: c_int = 1;
pub(crate) const SOCK_SEQPACKET: c_int = 5;
pub(crate) const SOCK_DGRAM: c_int = 2;
pub(crate) const SOCK_CLOEXEC: c_int = 0o2000000;
pub(crate) const POLLIN: i16 = 1;
pub(crate) const MSG_DONTWAIT: c_int = 0x40;
pub(crate) const MSG_NOSIGNAL: c_int = 0x4000;
pub(crate) const SOCK_STREAM: c_int = 1;
pub(crate) const SOCK_NONBLOCK: c_int = 0o4000;
pub(crate) const ECONNREFUSED: c_int = 111;
pub(crate) const ENOENT: c_int = 2;
pub(crate) const EACCES: c_int = 13;
pub(crate) const ENOTDIR: c_int = 20;
pub(crate) const O_WRONLY: c_int = 1;
pub(crate) const O_CREAT: c_int = 0o100;
pub(crate) const O_APPEND: c_int = 0o2000;
pub(crate) const EINTR: c_int = 4;
pub(crate) const EAGAIN: c_int = 11;
pub(crate) const SO_SNDTIMEO: c_int = 21;
pub(crate) const F_DUPFD_CLOEXEC: c_int = 1030;
/// The scheduling policies under which a thread yields to any other (`SCHED_OTHER`,
/// `SCHED_BATCH`, `SCHED_IDLE`); a real-time one yields only to its peers.
pub(crate) const YIELDING_POLICIES: [c_int; 3] = [0, 3, 5];
/// `SCHED_RESET_ON_FORK`, or-ed into `sched_getscheduler`'s answer.
pub(crate) const SCHED_RESET_ON_FORK: c_int = 0x4000_0000;
const CLOCK_MONOTONIC: c_int = 1;
const CLOCK_REALTIME: c_int = 0;

/// `CLOCK_MONOTONIC` in milliseconds (the daemon's beat's clock); errno untouched.
pub(crate) fn monotonic_ms() -> u64 {
    clock_ms(CLOCK_MONOTONIC)
}

/// The wall clock, in ms since the epoch (an event's time).
pub(crate) fn realtime_ms() -> u64 {
    clock_ms(CLOCK_REALTIME)
}

/// `CLOCK_MONOTONIC` in microseconds; errno untouched.
pub(crate) fn monotonic_us() -> u64 {
    clock_us(CLOCK_MONOTONIC)
}

fn clock_ms(clock: c_int) -> u64 {
    clock_us(clock) / 1000
}

fn clock_us(clock: c_int) -> u64 {
    let mut ts = TimeSpec { sec: 0, nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `ts`; with a valid clock it cannot fail.
    unsafe { clock_gettime(clock, &mut ts) };
    (ts.sec as u64).wrapping_mul(1_000_000).wrapping_add(ts.nsec as u64 / 1000)
}
pub(crate) const AT_PHDR: u64 = 3;
pub(crate) const AT_PHNUM: u64 = 5;
pub(crate) const AT_BASE: u64 = 7;
pub(crate) const AT_SECURE: u64 = 23;
pub(crate) const AT_EXECFN: u64 = 31;
pub(crate) const AT_EACCESS: c_int = 0x200;
pub(crate) const X_OK: c_int = 1;
pub(crate) const PR_GET_SECCOMP: c_int = 21;
pub(crate) const PR_GET_NAME: c_int = 16;
pub(crate) const SECCOMP_MODE_FILTER: c_int = 2;
pub(crate) const PROT_WRITE: c_int = 2;
pub(crate) const MAP_PRIVATE_ANONYMOUS: c_int = 0x02 | 0x20;

/// The calling thread's `errno`.
pub(crate) fn errno() -> c_int {
    // SAFETY: `__errno_location` returns the calling thread's errno, valid while it lives.
    unsafe { *__errno_location() }
}

pub(crate) fn set_errno(e: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *__errno_location() = e }
}

/// `fd` (a new fd of ours, or -1) moved above stdio: a program started with fds 0–2 closed
/// must not find our file or socket there, nor write its output into it. A copy on the
/// lowest fd ≥ 3, close-on-exec, and the original closed; -1 when that fails.
pub(crate) fn above_stdio(fd: c_int) -> c_int {
    if !(0..=2).contains(&fd) {
        return fd;
    }
    // SAFETY: a copy of our own fd; the original, ours, is closed.
    unsafe {
        let high = crate::sys::fcntl(fd, F_DUPFD_CLOEXEC, 3);
        crate::sys::close(fd);
        high
    }
}
