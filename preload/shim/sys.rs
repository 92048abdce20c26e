//! The kernel as the shim calls it: every system call of ours is made here, directly
//! (`syscall` on x86_64, `svc 0` on aarch64, `ecall` on riscv64), with libc's convention
//! kept (−1 and errno on failure).
//!
//! Not through libc's functions, because of what they cost a fresh process: the first
//! call of each is the first touch of its page of libc's code, and ~0.5–1 µs of a page
//! fault or cache misses. A bind of a port nobody coordinates made eight calls in a new
//! process; made directly they cost ~2 µs less (docs/PERFORMANCE.md, "System calls made
//! directly").
//! Calls only ever made here also need no `dlsym`: the shim's own `connect` to the daemon
//! and `getsockname` of a socket are not the program's hooked functions.
//!
//! What stays libc's is not a system call (errno, the environment, `dlsym`, the vDSO
//! clock) or is emulated there (`faccessat`'s `AT_EACCESS`): see `libc_calls`.

use core::ffi::{c_char, c_int, c_long, c_void};

use crate::libc_calls::{set_errno, IoVec, PollFd, SockLen, TimeSpec, AT_FDCWD, ENOSYS};

#[cfg(not(all(target_pointer_width = "64", any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))))]
compile_error!("the shim's system calls are written for 64-bit x86_64, aarch64 and riscv64 (sys.rs)");

/// A system call's number: x86_64's, or the generic table's (aarch64, riscv64).
const fn nr(x86_64: c_long, generic: c_long) -> c_long {
    if cfg!(target_arch = "x86_64") {
        x86_64
    } else {
        generic
    }
}

const READ: c_long = nr(0, 63);
const WRITE: c_long = nr(1, 64);
const CLOSE: c_long = nr(3, 57);
const OPENAT: c_long = nr(257, 56);
const PREAD64: c_long = nr(17, 67);
const MMAP: c_long = nr(9, 222);
const MUNMAP: c_long = nr(11, 215);
const GETPID: c_long = nr(39, 172);
const GETUID: c_long = nr(102, 174);
const GETTID: c_long = nr(186, 178);
const SOCKET: c_long = nr(41, 198);
const CONNECT: c_long = nr(42, 203);
const SENDTO: c_long = nr(44, 206);
const RECVFROM: c_long = nr(45, 207);
const BIND: c_long = nr(49, 200);
const LISTEN: c_long = nr(50, 201);
const GETSOCKNAME: c_long = nr(51, 204);
const SETSOCKOPT: c_long = nr(54, 208);
const GETSOCKOPT: c_long = nr(55, 209);
const FCNTL: c_long = nr(72, 25);
const GETDENTS64: c_long = nr(217, 61);
const STATX: c_long = nr(332, 291);
const PPOLL: c_long = nr(271, 73);
const SCHED_YIELD: c_long = nr(24, 124);
const SCHED_GETSCHEDULER: c_long = nr(145, 120);
const PRCTL: c_long = nr(157, 167);
const PROCESS_VM_READV: c_long = nr(310, 270);
const READLINKAT: c_long = nr(267, 78);

/// System call `n` with six arguments: the kernel's result (−errno on failure).
///
/// # Safety
/// What call `n` reads and writes through its arguments must be valid for it.
#[cfg(target_arch = "x86_64")]
unsafe fn raw(n: c_long, a: [usize; 6]) -> isize {
    let r: isize;
    // SAFETY: the caller's contract; `syscall` clobbers rcx and r11, nothing else of ours.
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") n as isize => r, in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5], lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    r
}

/// As above, for aarch64.
#[cfg(target_arch = "aarch64")]
unsafe fn raw(n: c_long, a: [usize; 6]) -> isize {
    let r: isize;
    // SAFETY: the caller's contract; `svc 0` returns in x0 and clobbers nothing else.
    unsafe {
        core::arch::asm!("svc 0", in("x8") n, inlateout("x0") a[0] => r, in("x1") a[1], in("x2") a[2], in("x3") a[3],
            in("x4") a[4], in("x5") a[5], options(nostack));
    }
    r
}

/// As above, for riscv64.
#[cfg(target_arch = "riscv64")]
unsafe fn raw(n: c_long, a: [usize; 6]) -> isize {
    let r: isize;
    // SAFETY: the caller's contract; `ecall` returns in a0 and clobbers nothing else.
    unsafe {
        core::arch::asm!("ecall", in("a7") n, inlateout("a0") a[0] => r, in("a1") a[1], in("a2") a[2], in("a3") a[3],
            in("a4") a[4], in("a5") a[5], options(nostack));
    }
    r
}

/// Call `n` as libc would make it: its result, or −1 with errno set.
///
/// # Safety
/// As [`raw`].
unsafe fn call(n: c_long, a: [usize; 6]) -> isize {
    // SAFETY: the caller's contract.
    call_result(unsafe { raw(n, a) })
}

/// The kernel's answer `r` as libc gives it: itself, or −1 with errno set.
fn call_result(r: isize) -> isize {
    if (-4095..0).contains(&r) {
        set_errno(-r as c_int);
        -1
    } else {
        r
    }
}

/// An argument register holding `v`: an fd or flag, sign-extended as C passes it.
const fn i(v: c_int) -> usize {
    v as isize as usize
}

/// A pointer argument.
fn p<T>(v: *const T) -> usize {
    v as usize
}

/// `open(2)` (as `openat(AT_FDCWD, …)`); a file it creates is `0600`.
///
/// # Safety
/// `path` is NUL-terminated.
pub(crate) unsafe fn open(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { call(OPENAT, [i(AT_FDCWD), p(path), i(flags), 0o600, 0, 0]) as c_int }
}

/// `readlink(2)` (as `readlinkat(AT_FDCWD, …)`): the target's length (not NUL-terminated).
///
/// # Safety
/// `path` is NUL-terminated; `buf` holds `n` writable bytes.
pub(crate) unsafe fn readlink(path: *const c_char, buf: *mut u8, n: usize) -> isize {
    // SAFETY: the caller's contract.
    unsafe { call(READLINKAT, [i(AT_FDCWD), p(path), p(buf), n, 0, 0]) }
}

/// `close(2)`.
///
/// # Safety
/// `fd` is ours to close.
pub(crate) unsafe fn close(fd: c_int) -> c_int {
    // SAFETY: no memory is passed.
    unsafe { call(CLOSE, [i(fd), 0, 0, 0, 0, 0]) as c_int }
}

/// `read(2)`.
///
/// # Safety
/// `buf` holds `n` writable bytes.
pub(crate) unsafe fn read(fd: c_int, buf: *mut c_void, n: usize) -> isize {
    // SAFETY: the caller's contract.
    unsafe { call(READ, [i(fd), p(buf), n, 0, 0, 0]) }
}

/// `write(2)`.
///
/// # Safety
/// `buf` holds `n` readable bytes.
pub(crate) unsafe fn write(fd: c_int, buf: *const c_void, n: usize) -> isize {
    // SAFETY: the caller's contract.
    unsafe { call(WRITE, [i(fd), p(buf), n, 0, 0, 0]) }
}

/// `pread(2)`.
///
/// # Safety
/// `buf` holds `n` writable bytes.
pub(crate) unsafe fn pread(fd: c_int, buf: *mut c_void, n: usize, off: i64) -> isize {
    // SAFETY: the caller's contract.
    unsafe { call(PREAD64, [i(fd), p(buf), n, off as usize, 0, 0]) }
}

/// `getdents64(2)`.
///
/// # Safety
/// `buf` holds `n` writable bytes.
pub(crate) unsafe fn getdents64(fd: c_int, buf: *mut c_void, n: usize) -> isize {
    // SAFETY: the caller's contract.
    unsafe { call(GETDENTS64, [i(fd), p(buf), n, 0, 0, 0]) }
}

/// `statx(2)`; where the kernel has none (before Linux 4.11), libc's, which answers it
/// with `fstatat`.
///
/// # Safety
/// `path` is NUL-terminated; `buf` holds a `struct statx` (256 bytes).
pub(crate) unsafe fn statx(dirfd: c_int, path: *const c_char, flags: c_int, mask: u32, buf: *mut u8) -> c_int {
    // SAFETY: the caller's contract.
    match unsafe { raw(STATX, [i(dirfd), p(path), i(flags), mask as usize, p(buf), 0]) } {
        // SAFETY: the caller's contract, to libc's function.
        r if r == -(ENOSYS as isize) => unsafe { crate::libc_calls::statx(dirfd, path, flags, mask, buf) },
        r => call_result(r) as c_int,
    }
}

/// `mmap(2)`: the mapping, or `usize::MAX` as a pointer (`MAP_FAILED`).
///
/// # Safety
/// As mmap(2): a mapping the kernel places (`addr` null) replaces nothing.
pub(crate) unsafe fn mmap(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: i64) -> *mut c_void {
    // SAFETY: the caller's contract.
    unsafe { call(MMAP, [p(addr), len, i(prot), i(flags), i(fd), off as usize]) as *mut c_void }
}

/// `munmap(2)`.
///
/// # Safety
/// `addr` and `len` are a mapping of ours that nothing uses any more.
pub(crate) unsafe fn munmap(addr: *mut c_void, len: usize) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { call(MUNMAP, [p(addr), len, 0, 0, 0, 0]) as c_int }
}

/// `getpid(2)`.
pub(crate) fn getpid() -> c_int {
    // SAFETY: no memory is passed; it cannot fail.
    unsafe { raw(GETPID, [0; 6]) as c_int }
}

/// `getuid(2)`.
pub(crate) fn getuid() -> u32 {
    // SAFETY: no memory is passed; it cannot fail.
    unsafe { raw(GETUID, [0; 6]) as u32 }
}

/// `gettid(2)`.
pub(crate) fn gettid() -> c_int {
    // SAFETY: no memory is passed; it cannot fail.
    unsafe { raw(GETTID, [0; 6]) as c_int }
}

/// `socket(2)`.
///
/// # Safety
/// The fd it returns is the caller's to close.
pub(crate) unsafe fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int {
    // SAFETY: no memory is passed.
    unsafe { call(SOCKET, [i(domain), i(ty), i(protocol), 0, 0, 0]) as c_int }
}

/// `connect(2)` of a socket of ours (never the program's: that is libc's, [`crate::connect`]).
///
/// # Safety
/// `addr` holds `len` readable bytes.
pub(crate) unsafe fn connect(fd: c_int, addr: *const c_void, len: SockLen) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { call(CONNECT, [i(fd), p(addr), len as usize, 0, 0, 0]) as c_int }
}

/// `bind(2)`: what libc's `bind` is (the program's call, when libc is next,
/// [`crate::linkmap`]).
///
/// # Safety
/// `addr` holds `len` readable bytes.
pub(crate) unsafe extern "C" fn bind(fd: c_int, addr: *const c_void, len: SockLen) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { call(BIND, [i(fd), p(addr), len as usize, 0, 0, 0]) as c_int }
}

/// `listen(2)`: what libc's `listen` is (as [`bind`]).
pub(crate) extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: no memory is passed.
    unsafe { call(LISTEN, [i(fd), i(backlog), 0, 0, 0, 0]) as c_int }
}

/// `getsockname(2)`: what libc's `getsockname` is (as [`bind`]).
///
/// # Safety
/// `addr` holds `*len` writable bytes.
pub(crate) unsafe extern "C" fn getsockname(fd: c_int, addr: *mut c_void, len: *mut SockLen) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { call(GETSOCKNAME, [i(fd), p(addr), p(len), 0, 0, 0]) as c_int }
}

/// `sendto(2)`; a null `to` is `send(2)`.
///
/// # Safety
/// `buf` holds `n` readable bytes; `to`, when not null, `len`.
pub(crate) unsafe fn sendto(fd: c_int, buf: *const c_void, n: usize, flags: c_int, to: *const c_void, len: SockLen) -> isize {
    // SAFETY: the caller's contract.
    unsafe { call(SENDTO, [i(fd), p(buf), n, i(flags), p(to), len as usize]) }
}

/// `send(2)`.
///
/// # Safety
/// `buf` holds `n` readable bytes.
pub(crate) unsafe fn send(fd: c_int, buf: *const c_void, n: usize, flags: c_int) -> isize {
    // SAFETY: the caller's contract.
    unsafe { sendto(fd, buf, n, flags, core::ptr::null(), 0) }
}

/// `recv(2)`.
///
/// # Safety
/// `buf` holds `n` writable bytes.
pub(crate) unsafe fn recv(fd: c_int, buf: *mut c_void, n: usize, flags: c_int) -> isize {
    // SAFETY: the caller's contract.
    unsafe { call(RECVFROM, [i(fd), p(buf), n, i(flags), 0, 0]) }
}

/// `setsockopt(2)`.
///
/// # Safety
/// `val` holds `len` readable bytes.
pub(crate) unsafe fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: SockLen) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { call(SETSOCKOPT, [i(fd), i(level), i(name), p(val), len as usize, 0]) as c_int }
}

/// `getsockopt(2)`.
///
/// # Safety
/// `val` holds `*len` writable bytes.
pub(crate) unsafe fn getsockopt(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut SockLen) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { call(GETSOCKOPT, [i(fd), i(level), i(name), p(val), p(len), 0]) as c_int }
}

/// `fcntl(2)` with an integer argument.
///
/// # Safety
/// As fcntl(2) for `cmd`: none of ours passes memory.
pub(crate) unsafe fn fcntl(fd: c_int, cmd: c_int, arg: c_int) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { call(FCNTL, [i(fd), i(cmd), i(arg), 0, 0, 0]) as c_int }
}

/// `poll(2)` (as `ppoll`, which every architecture has), `timeout` in ms, −1 for none.
///
/// # Safety
/// `fds` holds `n` entries.
pub(crate) unsafe fn poll(fds: *mut PollFd, n: u64, timeout: c_int) -> c_int {
    let mut ts = TimeSpec { sec: i64::from(timeout / 1000), nsec: i64::from(timeout % 1000) * 1_000_000 };
    let at = if timeout < 0 { core::ptr::null_mut() } else { &mut ts as *mut TimeSpec };
    // SAFETY: the caller's contract; the kernel reads `ts` and writes back what is left of
    // it (or there is no timeout); no signal mask.
    unsafe { call(PPOLL, [p(fds), n as usize, p(at), 0, 0, 0]) as c_int }
}

/// `sched_yield(2)`.
pub(crate) fn sched_yield() {
    // SAFETY: no memory is passed.
    unsafe { raw(SCHED_YIELD, [0; 6]) };
}

/// `sched_getscheduler(2)` of process `pid` (0: this thread).
pub(crate) fn sched_getscheduler(pid: c_int) -> c_int {
    // SAFETY: no memory is passed.
    unsafe { call(SCHED_GETSCHEDULER, [i(pid), 0, 0, 0, 0, 0]) as c_int }
}

/// `prctl(2)` with one argument.
///
/// # Safety
/// What `option` writes at `arg` (`PR_GET_NAME`: 16 bytes) is writable.
pub(crate) unsafe fn prctl(option: c_int, arg: usize) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { call(PRCTL, [i(option), arg, 0, 0, 0, 0]) as c_int }
}

/// `process_vm_readv(2)`.
///
/// # Safety
/// `local` holds `nl` vectors of writable memory; `remote`, `nr` vectors.
pub(crate) unsafe fn process_vm_readv(pid: c_int, local: *const IoVec, nl: usize, remote: *const IoVec, nr: usize, flags: usize) -> isize {
    // SAFETY: the caller's contract.
    unsafe { call(PROCESS_VM_READV, [i(pid), p(local), nl, p(remote), nr, flags]) }
}
