//! `libstyxy_preload.so`: the interposer that `LD_PRELOAD` puts into every process.
//!
//! It is `no_std` and links nothing but libc, so loading it costs what any preload
//! library costs (a Rust `std` library would pull in `libgcc_s` and cost every process
//! an extra ~16%). It does no work at load time. Each hook filters with a few
//! comparisons (address family, port, loopback, session) and otherwise calls the real
//! function; only an interesting call loads `libstyxy_preload_core.so` (once, with
//! `dlopen`) and hands it the call together with the real function.
//!
//! Built by `build.rs` with `-C panic=abort` (Cargo cannot set panic per package);
//! nothing here can panic: no indexing, no unwrap.
#![no_std]

use core::ffi::{c_char, c_int, c_void};
use core::sync::atomic::{AtomicPtr, AtomicU8, Ordering};

type SockLen = u32;
type AddrFn = unsafe extern "C" fn(c_int, *const c_void, SockLen) -> c_int;
type ListenFn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type CoreAddrFn = unsafe extern "C" fn(c_int, *const c_void, SockLen, AddrFn) -> c_int;
type CoreListenFn = unsafe extern "C" fn(c_int, c_int, ListenFn) -> c_int;

#[repr(C)]
struct DlInfo {
    fname: *const c_char,
    fbase: *mut c_void,
    sname: *const c_char,
    saddr: *mut c_void,
}

#[link(name = "c")]
extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void;
    fn dladdr(addr: *const c_void, info: *mut DlInfo) -> c_int;
    fn getenv(name: *const c_char) -> *const c_char;
    fn getsockname(fd: c_int, addr: *mut c_void, len: *mut SockLen) -> c_int;
    fn __errno_location() -> *mut c_int;
    fn abort() -> !;
    fn getpid() -> c_int;
    fn process_vm_readv(pid: c_int, local: *const IoVec, nl: usize, remote: *const IoVec, nr: usize, flags: usize) -> isize;
    fn dlerror() -> *const c_char;
    fn getsockopt(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut SockLen) -> c_int;
    fn lseek(fd: c_int, off: i64, whence: c_int) -> i64;
    fn open(path: *const c_char, flags: c_int, ...) -> c_int;
    fn write(fd: c_int, buf: *const c_void, n: usize) -> isize;
    fn close(fd: c_int) -> c_int;
}

#[repr(C)]
struct IoVec {
    base: *mut c_void,
    len: usize,
}

const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;
const RTLD_NOW: c_int = 2;
const RTLD_NODELETE: c_int = 0x1000;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const ENOSYS: c_int = 38;
const EPERM: c_int = 1;
const ESPIPE: c_int = 29;
const SOL_SOCKET: c_int = 1;
const SO_TYPE: c_int = 3;
const SEEK_CUR: c_int = 1;
const O_WRONLY: c_int = 1;
const O_NOCTTY: c_int = 0o400;
const O_NONBLOCK: c_int = 0o4000;
const O_CLOEXEC: c_int = 0o2000000;
/// Caller memory this close above our own stack frame is the caller's frames: mapped.
const STACK_WINDOW: usize = 64 * 1024;
/// A core that fails to load (EMFILE at the fd limit…) is tried again on later calls,
/// this many times in all.
const CORE_TRIES: u8 = 8;
const CORE_NAME: &[u8] = b"libstyxy_preload_core.so\0";

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: unreachable in practice (nothing here panics); abort is always safe.
    unsafe { abort() }
}

static REAL_BIND: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_LISTEN: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static REAL_CONNECT: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static CORE_BIND: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static CORE_LISTEN: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static CORE_CONNECT: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;
static ENABLED: AtomicU8 = AtomicU8::new(UNKNOWN);
static IN_SESSION: AtomicU8 = AtomicU8::new(UNKNOWN);
static CORE: AtomicU8 = AtomicU8::new(UNKNOWN);
static CORE_FAILURES: AtomicU8 = AtomicU8::new(0);

/// The next definition of `name` (libc's), looked up once. Racing threads store the
/// same pointer.
unsafe fn next(slot: &AtomicPtr<c_void>, name: &[u8]) -> *mut c_void {
    let p = slot.load(Ordering::Acquire);
    if !p.is_null() {
        return p;
    }
    let p = dlsym(RTLD_NEXT, name.as_ptr().cast());
    slot.store(p, Ordering::Release);
    p
}

unsafe fn env_flag(cache: &AtomicU8, name: &[u8], test: fn(*const c_char) -> bool) -> bool {
    match cache.load(Ordering::Relaxed) {
        YES => true,
        NO => false,
        _ => {
            let yes = test(getenv(name.as_ptr().cast()));
            cache.store(if yes { YES } else { NO }, Ordering::Relaxed);
            yes
        }
    }
}

/// `STYXY_PRELOAD_DISABLE` unset, empty or `0`.
unsafe fn enabled() -> bool {
    env_flag(&ENABLED, b"STYXY_PRELOAD_DISABLE\0", |v| v.is_null() || *v == 0 || (*v == b'0' as c_char && *v.add(1) == 0))
}

unsafe fn in_session() -> bool {
    env_flag(&IN_SESSION, b"STYXY_PRELOAD_SESSION\0", |v| !v.is_null() && *v != 0)
}

/// Loads the core next to this library (or at `STYXY_PRELOAD_CORE`) once. Never
/// unloaded. A failure is tried again on later calls (it may be transient: EMFILE at the
/// fd limit), [`CORE_TRIES`] times in all; after the last, the hooks stay plain
/// pass-through for the process's life, and say so once on stderr.
unsafe fn core_loaded() -> bool {
    match CORE.load(Ordering::Acquire) {
        YES => return true,
        NO => return false,
        _ => {}
    }
    let errno = *__errno_location();
    let ok = load_core();
    if ok {
        CORE.store(YES, Ordering::Release);
    } else if CORE_FAILURES.fetch_add(1, Ordering::AcqRel) + 1 >= CORE_TRIES && CORE.swap(NO, Ordering::AcqRel) != NO {
        say(b"styxy-preload: cannot load libstyxy_preload_core.so (", dlerror(), b"): this process's ports are not coordinated\n");
    }
    *__errno_location() = errno;
    ok
}

/// One line on stderr, only when fd 2 is a terminal or a pipe (not a socket, not a
/// file the program may have reopened there), through a non-blocking description of our
/// own: a full pipe drops the line rather than wait.
unsafe fn say(head: &[u8], middle: *const c_char, tail: &[u8]) {
    let mut ty: c_int = 0;
    let mut len: SockLen = 4;
    let socket = getsockopt(2, SOL_SOCKET, SO_TYPE, (&mut ty as *mut c_int).cast(), &mut len) == 0;
    if socket || lseek(2, 0, SEEK_CUR) != -1 || *__errno_location() != ESPIPE {
        return;
    }
    let fd = open(b"/proc/self/fd/2\0".as_ptr().cast(), O_WRONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if fd < 0 {
        return;
    }
    let mut line = [0u8; 512];
    let mut n = append(&mut line, 0, head) + 1;
    if !middle.is_null() {
        n = copy_cstr(&mut line[..400], n, middle).max(n);
    }
    n = append(&mut line, n, tail) + 1;
    write(fd, line.as_ptr().cast(), n.min(line.len()));
    close(fd);
}

unsafe fn load_core() -> bool {
    let mut path = [0u8; 4096];
    let over = getenv(b"STYXY_PRELOAD_CORE\0".as_ptr().cast());
    let len = if !over.is_null() && *over != 0 {
        copy_cstr(&mut path, 0, over)
    } else {
        let mut info =
            DlInfo { fname: core::ptr::null(), fbase: core::ptr::null_mut(), sname: core::ptr::null(), saddr: core::ptr::null_mut() };
        if dladdr(bind as *const c_void, &mut info) == 0 || info.fname.is_null() {
            return false;
        }
        let n = copy_cstr(&mut path, 0, info.fname);
        // cut after the last '/', then append the core's name
        let mut dir = 0;
        let mut i = 0;
        while i < n {
            if path.get(i) == Some(&b'/') {
                dir = i + 1;
            }
            i += 1;
        }
        append(&mut path, dir, CORE_NAME)
    };
    if len == 0 {
        return false;
    }
    let h = dlopen(path.as_ptr().cast(), RTLD_NOW | RTLD_NODELETE);
    if h.is_null() {
        return false;
    }
    let b = dlsym(h, b"styxy_core_bind\0".as_ptr().cast());
    let l = dlsym(h, b"styxy_core_listen\0".as_ptr().cast());
    let c = dlsym(h, b"styxy_core_connect\0".as_ptr().cast());
    if b.is_null() || l.is_null() || c.is_null() {
        return false;
    }
    CORE_BIND.store(b, Ordering::Release);
    CORE_LISTEN.store(l, Ordering::Release);
    CORE_CONNECT.store(c, Ordering::Release);
    true
}

/// Copies a C string into `buf` at `at`, NUL-terminated; returns the new length, 0 if it does not fit.
unsafe fn copy_cstr(buf: &mut [u8], at: usize, s: *const c_char) -> usize {
    let mut i = 0;
    loop {
        let c = *s.add(i) as u8;
        match buf.get_mut(at + i) {
            Some(slot) => *slot = c,
            None => return 0,
        }
        if c == 0 {
            return at + i;
        }
        i += 1;
    }
}

fn append(buf: &mut [u8], at: usize, tail: &[u8]) -> usize {
    for (i, c) in tail.iter().enumerate() {
        match buf.get_mut(at + i) {
            Some(slot) => *slot = *c,
            None => return 0,
        }
    }
    at + tail.len() - 1
}

/// Whether the `len` bytes at `addr` (the caller's sockaddr, at most a
/// `sockaddr_storage`) can be read without a fault: the kernel returns `EFAULT` for a
/// bad pointer, and so must we, never `SIGSEGV`. Caller memory just above our own stack
/// frame is the caller's frames (where nearly every program keeps its sockaddr): no
/// syscall; anything else is read once by the kernel on our behalf.
unsafe fn readable(addr: *const c_void, len: SockLen) -> bool {
    let p = addr as usize;
    let len = (len as usize).min(128);
    if p < 4096 || p.checked_add(len).is_none() {
        return false;
    }
    let here = 0u8;
    let sp = &here as *const u8 as usize;
    if p >= sp && p + len <= sp + STACK_WINDOW {
        return true;
    }
    let errno = *__errno_location();
    let mut buf = [0u8; 128];
    let local = IoVec { base: buf.as_mut_ptr().cast(), len };
    let remote = IoVec { base: addr as *mut c_void, len };
    let n = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
    // where the call itself is refused (a seccomp sandbox), trust the pointer as before
    let ok = n == len as isize || (n < 0 && matches!(*__errno_location(), ENOSYS | EPERM));
    *__errno_location() = errno;
    ok
}

/// The family and port of an IPv4/IPv6 address, read without assuming alignment; `None`
/// for anything else, and for memory that cannot be read (the kernel says `EFAULT`).
unsafe fn inet_port(addr: *const c_void, len: SockLen) -> Option<(u16, u16)> {
    if addr.is_null() || len < 4 || !readable(addr, len) {
        return None;
    }
    let p = addr.cast::<u8>();
    let family = core::ptr::read_unaligned(p.cast::<u16>());
    let need = match family {
        AF_INET => 16,
        AF_INET6 => 28,
        _ => return None,
    };
    if len < need {
        return None;
    }
    Some((family, u16::from_be(core::ptr::read_unaligned(p.add(2).cast::<u16>()))))
}

unsafe fn is_loopback(addr: *const c_void, family: u16) -> bool {
    let p = addr.cast::<u8>();
    if family == AF_INET {
        return *p.add(4) == 127;
    }
    let a = core::slice::from_raw_parts(p.add(8), 16);
    let v4mapped = a.get(..12) == Some(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]) && a.get(12) == Some(&127);
    let one = a.get(..15) == Some(&[0u8; 15]) && a.get(15) == Some(&1);
    v4mapped || one
}

unsafe fn missing() -> c_int {
    *__errno_location() = ENOSYS;
    -1
}

/// # Safety
/// Called by the program as `bind(2)`.
#[no_mangle]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const c_void, len: SockLen) -> c_int {
    let real = next(&REAL_BIND, b"bind\0");
    if real.is_null() {
        return missing();
    }
    let real: AddrFn = core::mem::transmute(real);
    match inet_port(addr, len) {
        Some((_, port)) if port >= 1024 && enabled() && core_loaded() => {
            let hook: CoreAddrFn = core::mem::transmute(CORE_BIND.load(Ordering::Acquire));
            hook(fd, addr, len, real)
        }
        _ => real(fd, addr, len),
    }
}

/// # Safety
/// Called by the program as `listen(2)`.
#[no_mangle]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    let real = next(&REAL_LISTEN, b"listen\0");
    if real.is_null() {
        return missing();
    }
    let real: ListenFn = core::mem::transmute(real);
    if !enabled() {
        return real(fd, backlog);
    }
    let errno = *__errno_location();
    let mut ss = [0u64; 16];
    let mut sl: SockLen = 128;
    let inet = getsockname(fd, ss.as_mut_ptr().cast(), &mut sl) == 0 && inet_port(ss.as_ptr().cast(), sl).is_some();
    *__errno_location() = errno;
    if inet && core_loaded() {
        let hook: CoreListenFn = core::mem::transmute(CORE_LISTEN.load(Ordering::Acquire));
        return hook(fd, backlog, real);
    }
    real(fd, backlog)
}

/// # Safety
/// Called by the program as `connect(2)`.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const c_void, len: SockLen) -> c_int {
    let real = next(&REAL_CONNECT, b"connect\0");
    if real.is_null() {
        return missing();
    }
    let real: AddrFn = core::mem::transmute(real);
    match inet_port(addr, len) {
        Some((family, port)) if port >= 1024 && in_session() && is_loopback(addr, family) && enabled() && core_loaded() => {
            let hook: CoreAddrFn = core::mem::transmute(CORE_CONNECT.load(Ordering::Acquire));
            hook(fd, addr, len, real)
        }
        _ => real(fd, addr, len),
    }
}
