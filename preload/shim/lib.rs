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
//!
//! The fence (docs/ARCHITECTURE.md "The hooks inside foreign processes"): every `unsafe`
//! block says why it holds (`// SAFETY:`), every `unsafe fn` what its caller must hold
//! (`# Safety`), and `.ci/run` runs clippy on this crate with the lints below. A function
//! that reads through a pointer the program passed is `unsafe`; what it read goes on as
//! slices. A `dlsym` answer becomes a typed function in one place ([`slot::Slot`]).
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

use core::ffi::{c_char, c_int, c_void, CStr};
use core::sync::atomic::{AtomicPtr, AtomicU8, Ordering};

type SockLen = u32;
type AddrFn = unsafe extern "C" fn(c_int, *const c_void, SockLen) -> c_int;
type ListenFn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type NameFn = unsafe extern "C" fn(c_int, *mut c_void, *mut SockLen) -> c_int;
type CoreNameFn = unsafe extern "C" fn(c_int, *mut c_void, *const SockLen);
type CoreAddrFn = unsafe extern "C" fn(c_int, *const c_void, SockLen, AddrFn) -> c_int;
type CoreListenFn = unsafe extern "C" fn(c_int, c_int, ListenFn) -> c_int;

#[repr(C)]
struct DlInfo {
    fname: *const c_char,
    fbase: *mut c_void,
    sname: *const c_char,
    saddr: *mut c_void,
}

/// The port map's reader, shared with the client crate (one reader for both).
#[allow(dead_code)]
#[path = "../../client/src/mapview.rs"]
mod mapview;

/// The fixed-layout exchange with the daemon for a coordinated bind (one layout for both ends).
#[allow(dead_code)]
#[path = "../../client/src/hookproto.rs"]
mod hookproto;

mod slot;
use slot::Slot;

#[repr(C)]
struct PollFd {
    fd: c_int,
    events: i16,
    revents: i16,
}

#[repr(C)]
struct UCred {
    pid: c_int,
    uid: u32,
    gid: u32,
}

#[link(name = "c")]
extern "C" {
    fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int;
    fn poll(fds: *mut PollFd, n: u64, timeout: c_int) -> c_int;
    fn send(fd: c_int, buf: *const c_void, n: usize, flags: c_int) -> isize;
    fn recv(fd: c_int, buf: *mut c_void, n: usize, flags: c_int) -> isize;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void;
    fn dladdr(addr: *const c_void, info: *mut DlInfo) -> c_int;
    fn getenv(name: *const c_char) -> *const c_char;
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
    fn mmap(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: i64) -> *mut c_void;
    fn munmap(addr: *mut c_void, len: usize) -> c_int;
    fn statx(dirfd: c_int, path: *const c_char, flags: c_int, mask: u32, buf: *mut u8) -> c_int;
    fn getuid() -> u32;
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
const O_RDONLY: c_int = 0;
const O_NOFOLLOW: c_int = 0o400000;
const PROT_READ: c_int = 1;
const MAP_SHARED: c_int = 1;
const AT_EMPTY_PATH: c_int = 0x1000;
const STATX_MODE_UID_SIZE: u32 = 0x2 | 0x8 | 0x200;
const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;
const EADDRINUSE: c_int = 98;
const SO_REUSEPORT: c_int = 15;
const SO_PEERCRED: c_int = 17;
const AF_UNIX: c_int = 1;
const SOCK_SEQPACKET: c_int = 5;
const SOCK_CLOEXEC: c_int = 0o2000000;
const POLLIN: i16 = 1;
const MSG_DONTWAIT: c_int = 0x40;
const MSG_NOSIGNAL: c_int = 0x4000;
const COORDINATED_PORT: u8 = 1;
/// How long a bind waits for the daemon's answer on the shim's socket: the hooks' own
/// allocate budget (`Timeouts::HOOK`). Then the bind goes as asked, as theirs would.
const HOOK_ANSWER_MS: c_int = 200;
/// The daemon's policy map (client/src/policymap.rs): magic, header, a class per port.
const POLICY_MAGIC: u32 = 0x5350_5031;
const POLICY_HEADER: usize = 64;
const POLICY_SIZE: usize = POLICY_HEADER + 65536;
const UNTOUCHED_PORT: u8 = 0;
const ON_CONFLICT_PORT: u8 = 2;
const SOCK_STREAM: c_int = 1;
const ECONNREFUSED: c_int = 111;

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
// SAFETY: the core's exports (preload/src/lib.rs) have these types: AddrFn's arguments
// and libc's function, and `styxy_core_getsockname(int, struct sockaddr *, const socklen_t *)`.
static CORE_BIND: Slot<CoreAddrFn> = unsafe { Slot::new(c"styxy_core_bind") };
// SAFETY: as CORE_BIND.
static CORE_LISTEN: Slot<CoreListenFn> = unsafe { Slot::new(c"styxy_core_listen") };
// SAFETY: as CORE_BIND.
static CORE_CONNECT: Slot<CoreAddrFn> = unsafe { Slot::new(c"styxy_core_connect") };
// SAFETY: as CORE_BIND.
static CORE_GETSOCKNAME: Slot<CoreNameFn> = unsafe { Slot::new(c"styxy_core_getsockname") };
// SAFETY: as CORE_BIND.
static CORE_UNANSWERED: Slot<CoreAddrFn> = unsafe { Slot::new(c"styxy_core_unanswered") };

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;
static ENABLED: AtomicU8 = AtomicU8::new(UNKNOWN);
static IN_SESSION: AtomicU8 = AtomicU8::new(UNKNOWN);
static CORE: AtomicU8 = AtomicU8::new(UNKNOWN);
static CORE_FAILURES: AtomicU8 = AtomicU8::new(0);
static POLICY: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());
static PORTS: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());
/// This process's session tag in the port map (0: not computed yet).
static TAG: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);
static ISOLATE: AtomicU8 = AtomicU8::new(UNKNOWN);
static OWN_RULES: AtomicU8 = AtomicU8::new(UNKNOWN);

/// The calling thread's `errno`.
fn errno() -> c_int {
    // SAFETY: `__errno_location` returns the calling thread's errno, valid while it lives.
    unsafe { *__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *__errno_location() = e }
}

/// The bytes of the C string at `s` (without its NUL), `None` for null.
///
/// # Safety
/// `s` is null or a NUL-terminated string that stays as it is for `'a`.
unsafe fn cstr<'a>(s: *const c_char) -> Option<&'a [u8]> {
    // SAFETY: a NUL-terminated string that stays as it is (this function's contract).
    (!s.is_null()).then(|| unsafe { CStr::from_ptr(s) }.to_bytes())
}

/// The value of `name` in the environment (without its NUL), `None` when unset.
///
/// # Safety
/// The bytes are used before the hook returns to the program, which may change its
/// environment afterwards (and does not meanwhile: `getenv`'s own condition).
unsafe fn env<'a>(name: &CStr) -> Option<&'a [u8]> {
    // SAFETY: `getenv` takes a NUL-terminated name and answers null or such a string,
    // unchanged while it is used (this function's contract).
    unsafe { cstr(getenv(name.as_ptr())) }
}

/// Set and not empty.
fn set(v: Option<&[u8]>) -> bool {
    v.is_some_and(|v| !v.is_empty())
}

fn env_flag(cache: &AtomicU8, name: &CStr, test: fn(Option<&[u8]>) -> bool) -> bool {
    match cache.load(Ordering::Relaxed) {
        YES => true,
        NO => false,
        _ => {
            // SAFETY: the value is tested here and not kept.
            let yes = test(unsafe { env(name) });
            cache.store(if yes { YES } else { NO }, Ordering::Relaxed);
            yes
        }
    }
}

/// `STYXY_PRELOAD_DISABLE` unset, empty or `0`.
fn enabled() -> bool {
    env_flag(&ENABLED, c"STYXY_PRELOAD_DISABLE", |v| matches!(v, None | Some(b"" | b"0")))
}

fn in_session() -> bool {
    env_flag(&IN_SESSION, c"STYXY_PRELOAD_SESSION", set)
}

/// Loads the core next to this library (or at `STYXY_PRELOAD_CORE`) once. Never
/// unloaded. A failure is tried again on later calls (it may be transient: EMFILE at the
/// fd limit), [`CORE_TRIES`] times in all; after the last, the hooks stay plain
/// pass-through for the process's life, and say so once on stderr.
fn core_loaded() -> bool {
    match CORE.load(Ordering::Acquire) {
        YES => return true,
        NO => return false,
        _ => {}
    }
    let saved = errno();
    let ok = load_core();
    if ok {
        CORE.store(YES, Ordering::Release);
    } else if CORE_FAILURES.fetch_add(1, Ordering::AcqRel) + 1 >= CORE_TRIES && CORE.swap(NO, Ordering::AcqRel) != NO {
        // SAFETY: `dlerror` answers null or this thread's last message, read here at once.
        let why = unsafe { cstr(dlerror()) };
        say(b"styxy-preload: cannot load libstyxy_preload_core.so (", why, b"): this process's ports are not coordinated\n");
    }
    set_errno(saved);
    ok
}

/// The core's function in `slot`, loading the core first if need be; `None` when it
/// cannot be loaded.
fn core_fn<F: Copy>(slot: &Slot<F>) -> Option<F> {
    if core_loaded() {
        slot.get()
    } else {
        None
    }
}

/// The core's function in `slot` if the core is loaded already (never loads it).
fn core_fn_if_loaded<F: Copy>(slot: &Slot<F>) -> Option<F> {
    if CORE.load(Ordering::Acquire) == YES {
        slot.get()
    } else {
        None
    }
}

/// One line on stderr, only when fd 2 is a terminal or a pipe (not a socket, not a
/// file the program may have reopened there), through a non-blocking description of our
/// own: a full pipe drops the line rather than wait.
fn say(head: &[u8], middle: Option<&[u8]>, tail: &[u8]) {
    let mut ty: c_int = 0;
    let mut len: SockLen = 4;
    // SAFETY: getsockopt writes at most `len` (4) bytes into `ty`.
    if unsafe { getsockopt(2, SOL_SOCKET, SO_TYPE, (&mut ty as *mut c_int).cast(), &mut len) } == 0 {
        return;
    }
    // SAFETY: moves nothing (SEEK_CUR by 0): only asks whether fd 2 seeks.
    if unsafe { lseek(2, 0, SEEK_CUR) } != -1 || errno() != ESPIPE {
        return;
    }
    // SAFETY: a NUL-terminated path; the description is ours (closed below).
    let fd = unsafe { open(c"/proc/self/fd/2".as_ptr(), O_WRONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC) };
    if fd < 0 {
        return;
    }
    let mut line = [0u8; 512];
    let mut n = append(&mut line, 0, head) + 1;
    if let Some(middle) = middle {
        n = put(&mut line[..400], n, middle).max(n);
    }
    n = append(&mut line, n, tail) + 1;
    // SAFETY: at most `line.len()` bytes of `line`, to our own `fd`, which nothing else uses.
    unsafe {
        write(fd, line.as_ptr().cast(), n.min(line.len()));
        close(fd);
    }
}

fn load_core() -> bool {
    let mut path = [0u8; 4096];
    // SAFETY: copied into `path` here.
    let len = if let Some(over) = unsafe { env(c"STYXY_PRELOAD_CORE") }.filter(|v| !v.is_empty()) {
        put(&mut path, 0, over)
    } else {
        let mut info =
            DlInfo { fname: core::ptr::null(), fbase: core::ptr::null_mut(), sname: core::ptr::null(), saddr: core::ptr::null_mut() };
        // SAFETY: `bind` is code of this library; dladdr fills `info`, whose `fname` is
        // then null or the NUL-terminated path of this library, loaded while we run.
        let file = unsafe {
            if dladdr(bind as *const c_void, &mut info) == 0 {
                None
            } else {
                cstr(info.fname)
            }
        };
        let Some(file) = file else {
            return false;
        };
        let n = put(&mut path, 0, file);
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
    // SAFETY: `path` is NUL-terminated (`len` > 0: it fit); the core is our own library,
    // which does nothing at load time.
    let h = unsafe { dlopen(path.as_ptr().cast(), RTLD_NOW | RTLD_NODELETE) };
    if h.is_null() {
        return false;
    }
    // all five, or the core is not loaded (a slot found meanwhile is never called)
    // SAFETY: `h` is dlopen's handle, never closed (RTLD_NODELETE, and no dlclose).
    unsafe {
        CORE_BIND.resolve(h).is_some()
            && CORE_LISTEN.resolve(h).is_some()
            && CORE_CONNECT.resolve(h).is_some()
            && CORE_GETSOCKNAME.resolve(h).is_some()
            && CORE_UNANSWERED.resolve(h).is_some()
    }
}

/// Copies `s` into `buf` at `at`, NUL-terminated; returns the new length, 0 if it does not fit.
fn put(buf: &mut [u8], at: usize, s: &[u8]) -> usize {
    for (i, c) in s.iter().chain(&[0]).enumerate() {
        match buf.get_mut(at + i) {
            Some(slot) => *slot = *c,
            None => return 0,
        }
    }
    at + s.len()
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

/// The process sets its own policy (`STYXY_PRELOAD_PORTS` rules, a mode) or may be under
/// `exec`'s seccomp supervisor: the daemon's maps are not the whole story, the hooks'
/// logic decides every call.
fn own_rules() -> bool {
    match OWN_RULES.load(Ordering::Relaxed) {
        YES => true,
        NO => false,
        _ => {
            let own = [c"STYXY_PRELOAD_PORTS", c"STYXY_PRELOAD_MODE", c"STYXY_DISABLE_REASSIGN", c"STYXY_PRELOAD_SUPERVISED"]
                .iter()
                // SAFETY: each value is tested here and not kept.
                .any(|n| set(unsafe { env(n) }));
            OWN_RULES.store(if own { YES } else { NO }, Ordering::Relaxed);
            own
        }
    }
}

/// The class of `port` in the daemon's policy map, `None` when there is no map this
/// process may trust (or it sets its own rules). Mapped once; a missing map is looked
/// for again next time (the daemon may start later).
fn port_class(port: u16) -> Option<u8> {
    if own_rules() {
        return None;
    }
    let mut map = POLICY.load(Ordering::Acquire);
    if map.is_null() {
        map = map_policy()?;
    }
    // SAFETY: `map` is a mapping of POLICY_SIZE bytes (`map_file`), never unmapped once
    // published; POLICY_HEADER + port < POLICY_SIZE.
    Some(unsafe { *map.add(POLICY_HEADER + port as usize) })
}

fn map_policy() -> Option<*mut u8> {
    let saved = errno();
    let mut path = [0u8; 4096];
    let mapped = match runtime_file(&mut path, b"/policy.map\0") {
        0 => None,
        n => map_file(&path, n, POLICY_SIZE, POLICY_MAGIC),
    };
    set_errno(saved);
    let map = mapped?;
    match POLICY.compare_exchange(core::ptr::null_mut(), map, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(map),
        Err(winner) => {
            // SAFETY: our own mapping of POLICY_SIZE bytes, which nobody else has seen.
            unsafe { munmap(map.cast(), POLICY_SIZE) };
            Some(winner)
        }
    }
}

/// A file beside the daemon's socket (`name` as `b"/policy.map\0"`): the directory of `STYXY_URL`'s `unix:` path,
/// else `$XDG_RUNTIME_DIR/styxy-preload`, else `/tmp/styxy-preload-<uid>` (as
/// client/src/paths.rs). Its length, 0 when it does not fit.
fn runtime_file(buf: &mut [u8], name: &[u8]) -> usize {
    // SAFETY: both are copied into `buf` here.
    let (url, rt) = unsafe { (env(c"STYXY_URL"), env(c"XDG_RUNTIME_DIR")) };
    let n = if let Some(path) = url.and_then(|u| u.strip_prefix(b"unix:")).filter(|p| p.starts_with(b"/")) {
        let n = put(buf, 0, path);
        match buf.get(..n).and_then(|b| b.iter().rposition(|c| *c == b'/')) {
            Some(slash) => slash,
            None => return 0,
        }
    } else if let Some(rt) = rt.filter(|r| r.starts_with(b"/")) {
        let n = put(buf, 0, rt);
        append(buf, n, b"/styxy-preload\0")
    } else {
        let n = append(buf, 0, b"/tmp/styxy-preload-\0");
        // SAFETY: getuid cannot fail.
        let n = decimal(buf, n, unsafe { getuid() });
        if n == 0 {
            return 0;
        }
        n
    };
    if n == 0 {
        return 0;
    }
    append(buf, n, name)
}

/// Writes `v` in decimal at `at`, NUL-terminated; the new length, 0 when it does not fit.
fn decimal(buf: &mut [u8], at: usize, mut v: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        if let Some(d) = digits.get_mut(i) {
            *d = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    let mut n = at;
    for d in digits.get(i..).unwrap_or(&[]) {
        match buf.get_mut(n) {
            Some(slot) => *slot = *d,
            None => return 0,
        }
        n += 1;
    }
    match buf.get_mut(n) {
        Some(slot) => *slot = 0,
        None => return 0,
    }
    n
}

/// Maps `size` bytes of the file at `path[..n]` if it is ours alone (checked on the opened
/// file: a file swapped in by someone else is not ours) and its first word is `magic`.
fn map_file(path: &[u8], n: usize, size: usize, magic: u32) -> Option<*mut u8> {
    if path.get(n) != Some(&0) {
        return None;
    }
    // SAFETY: `path` is NUL-terminated (checked above); the fd is ours (closed below).
    let fd = unsafe { open(path.as_ptr().cast(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let trusted = ours(fd, c"", AT_EMPTY_PATH, S_IFREG, size as u64);
    // SAFETY: a new read-only mapping of our own fd, placed by the kernel (it replaces
    // nothing); the mapping outlives the fd.
    let map = if trusted { unsafe { mmap(core::ptr::null_mut(), size, PROT_READ, MAP_SHARED, fd, 0) } } else { usize::MAX as *mut c_void };
    // SAFETY: our own fd, opened above.
    unsafe { close(fd) };
    if map as usize == usize::MAX {
        return None;
    }
    // SAFETY: `map` holds `size` bytes of a file at least that long (`ours`), page-aligned;
    // `size` is more than a word.
    if unsafe { core::ptr::read_unaligned(map.cast::<u32>()) } != magic {
        // SAFETY: our own mapping of `size` bytes, which nobody else has seen.
        unsafe { munmap(map, size) };
        return None;
    }
    Some(map.cast())
}

/// The file is of `kind`, at least `size` bytes, ours, and nobody else may write it (a
/// shorter file would fault when mapped).
fn ours(dirfd: c_int, path: &CStr, flags: c_int, kind: u16, size: u64) -> bool {
    let mut st = [0u8; 256];
    // SAFETY: `path` is NUL-terminated; statx writes a `struct statx` (256 bytes) into `st`.
    if unsafe { statx(dirfd, path.as_ptr(), flags, STATX_MODE_UID_SIZE, st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: stx_uid, stx_mode and stx_size, within `st`, read unaligned.
    let (uid, mode, len) = unsafe {
        (
            core::ptr::read_unaligned(st.as_ptr().add(20).cast::<u32>()),
            core::ptr::read_unaligned(st.as_ptr().add(28).cast::<u16>()),
            core::ptr::read_unaligned(st.as_ptr().add(40).cast::<u64>()),
        )
    };
    // SAFETY: getuid cannot fail.
    uid == unsafe { getuid() } && mode & S_IFMT == kind && mode & 0o022 == 0 && len >= size
}

/// `SO_REUSEPORT` is set: the socket may share its port, so `EADDRINUSE` never comes.
fn shares_port(fd: c_int) -> bool {
    let mut v: c_int = 0;
    let mut len: SockLen = 4;
    // SAFETY: getsockopt writes at most `len` (4) bytes into `v`; any fd may be asked.
    unsafe { getsockopt(fd, SOL_SOCKET, SO_REUSEPORT, (&mut v as *mut c_int).cast(), &mut len) == 0 && v != 0 }
}

/// Whether the `len` bytes at `addr` (the caller's sockaddr, at most a
/// `sockaddr_storage`) can be read without a fault: the kernel returns `EFAULT` for a
/// bad pointer, and so must we, never `SIGSEGV`. Caller memory just above our own stack
/// frame is the caller's frames (where nearly every program keeps its sockaddr): no
/// syscall; anything else is read once by the kernel on our behalf.
fn readable(addr: *const c_void, len: SockLen) -> bool {
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
    let saved = errno();
    let mut buf = [0u8; 128];
    let local = IoVec { base: buf.as_mut_ptr().cast(), len };
    let remote = IoVec { base: addr as *mut c_void, len };
    // SAFETY: the kernel writes at most `len` (≤ 128) bytes into `buf`, and reads `addr`
    // itself: memory it cannot read is an error, not a fault.
    let n = unsafe { process_vm_readv(getpid(), &local, 1, &remote, 1, 0) };
    // where the call itself is refused (a seccomp sandbox), trust the pointer as before
    let ok = n == len as isize || (n < 0 && matches!(errno(), ENOSYS | EPERM));
    set_errno(saved);
    ok
}

/// An IPv4 or IPv6 socket address: its bytes (at most a `sockaddr_storage`), family
/// and port.
struct Inet<'a> {
    bytes: &'a [u8],
    family: u16,
    port: u16,
}

impl Inet<'_> {
    /// The address a program passed to bind or connect, `None` when it is not IPv4/IPv6
    /// or cannot be read (the kernel says `EFAULT`).
    ///
    /// # Safety
    /// `addr` and `len` are the program's arguments to the call being hooked, and the
    /// result is used during that call.
    unsafe fn of_call<'a>(addr: *const c_void, len: SockLen) -> Option<Inet<'a>> {
        if addr.is_null() || len < 4 || !readable(addr, len) {
            return None;
        }
        // SAFETY: `readable` saw these bytes readable (or a seccomp sandbox refused it the
        // check, and the program's word is taken for them, as it always was); the program
        // does not change them during its own call (this function's contract).
        Inet::parse(unsafe { core::slice::from_raw_parts(addr.cast::<u8>(), (len as usize).min(128)) })
    }

    /// The family and port of an IPv4/IPv6 address; `None` for anything else.
    fn parse(bytes: &[u8]) -> Option<Inet<'_>> {
        let family = u16::from_ne_bytes([*bytes.first()?, *bytes.get(1)?]);
        let need = match family {
            AF_INET => 16,
            AF_INET6 => 28,
            _ => return None,
        };
        if bytes.len() < need {
            return None;
        }
        Some(Inet { bytes, family, port: u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]) })
    }

    fn is_loopback(&self) -> bool {
        if self.family == AF_INET {
            return self.bytes.get(4) == Some(&127);
        }
        let Some(a) = self.bytes.get(8..24) else {
            return false;
        };
        let v4mapped = a.get(..12) == Some(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]) && a.get(12) == Some(&127);
        let one = a.get(..15) == Some(&[0u8; 15]) && a.get(15) == Some(&1);
        v4mapped || one
    }
}

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

/// A bind: as asked for a port nobody coordinates (or one that binds, when only
/// `EADDRINUSE` needs asking), kept in one round trip with the daemon ([`keep`]), else
/// the hooks' logic decides.
///
/// # Safety
/// `fd`, `addr` and `len` are the program's call to bind(2); `real` is libc's bind.
unsafe fn shim_bind(real: AddrFn, fd: c_int, addr: *const c_void, len: SockLen) -> c_int {
    // SAFETY: the program's own call, to libc's function (this function's contract).
    let plain = || unsafe { real(fd, addr, len) };
    // SAFETY: the program's address, read during its call.
    let Some(inet) = unsafe { Inet::of_call(addr, len) }.filter(|a| a.port >= 1024 && enabled()) else {
        return plain();
    };
    let port = inet.port;
    let saved = errno();
    match port_class(port) {
        Some(UNTOUCHED_PORT) => return plain(),
        // bound as asked; only EADDRINUSE (or a port that may be shared) needs asking
        Some(ON_CONFLICT_PORT) if !shares_port(fd) => {
            let rc = plain();
            if rc == 0 || errno() != EADDRINUSE {
                return rc;
            }
        }
        _ => {}
    }
    if port_class(port) == Some(COORDINATED_PORT) {
        // the daemon keeps this very port for us in one round trip, or the hooks' logic decides
        // SAFETY: the program's call, `inet` read from its address, libc's function.
        if let Some(rc) = unsafe { keep(fd, addr, len, &inet, real) } {
            if rc == 0 {
                set_errno(saved);
            }
            return rc;
        }
    }
    set_errno(saved);
    match core_fn(&CORE_BIND) {
        // SAFETY: the program's call and libc's function, as the core's bind takes them.
        Some(hook) => unsafe { hook(fd, addr, len, real) },
        None => plain(),
    }
}

/// A listen: as asked when its port is one nobody coordinates or this process kept,
/// else the hooks' logic confirms (or observes) it.
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
    // a bound port nobody coordinates: nothing to confirm or observe
    let plain_port =
        matches!(port, Some(p) if p != 0 && (matches!(port_class(p), Some(UNTOUCHED_PORT | ON_CONFLICT_PORT)) || kept_here(p)));
    set_errno(saved);
    if port.is_some() && !plain_port {
        if let Some(hook) = core_fn(&CORE_LISTEN) {
            // SAFETY: the program's call and libc's function, as the core's listen takes them.
            return unsafe { hook(fd, backlog, real) };
        }
    }
    plain()
}

/// A getsockname: the kernel's answer. Only a process whose hooks moved a bind (the
/// core is loaded then) may see another port: docs/ARCHITECTURE.md "What a program sees".
///
/// # Safety
/// `fd`, `addr` and `len` are the program's call to getsockname(2); `real` is libc's.
unsafe fn shim_getsockname(real: NameFn, fd: c_int, addr: *mut c_void, len: *mut SockLen) -> c_int {
    // SAFETY: the program's own call, to libc's function (this function's contract).
    let rc = unsafe { real(fd, addr, len) };
    if rc == 0 {
        if let Some(hook) = core_fn_if_loaded(&CORE_GETSOCKNAME) {
            // SAFETY: the program's buffer, which the kernel just filled: `*len` bytes at
            // `addr` are the socket's address, as the core's getsockname takes them.
            unsafe { hook(fd, addr, len) };
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
    let Some(inet) = unsafe { Inet::of_call(addr, len) }.filter(|a| a.port >= 1024 && in_session() && a.is_loopback() && enabled()) else {
        return plain();
    };
    match route(inet.port) {
        Some(Route::AsAsked) => plain(),
        Some(Route::To(actual)) if stream(fd) && (len as usize) <= 128 => {
            // a copy of the caller's address with the session's actual port (sin_port and
            // sin6_port are both at offset 2)
            let mut copy = [0u8; 128];
            let n = len as usize; // all of them: `inet.bytes` is `len` (≤ 128) long
            if let (Some(to), Some(from)) = (copy.get_mut(..n), inet.bytes.get(..n)) {
                to.copy_from_slice(from);
            }
            copy[2..4].copy_from_slice(&actual.to_be_bytes());
            // SAFETY: `len` bytes of `copy`, a sockaddr like the program's.
            unsafe { real(fd, copy.as_ptr().cast(), len) }
        }
        Some(Route::Refused) if stream(fd) => {
            set_errno(ECONNREFUSED);
            -1
        }
        Some(_) => plain(),
        None => match core_fn(&CORE_CONNECT) {
            // SAFETY: the program's call and libc's function, as the core's connect takes them.
            Some(hook) => unsafe { hook(fd, addr, len, real) },
            None => plain(),
        },
    }
}

/// Where a session's loopback connect goes (docs/ARCHITECTURE.md "A call's way").
enum Route {
    AsAsked,
    /// The session remapped this port: connect here instead.
    To(u16),
    /// Another session's server: as if nothing listened (isolation).
    Refused,
}

/// The shim's own answer for a loopback connect in a session, from the port map and the
/// policy map; `None` when the hooks' logic must decide (the process has rules of its
/// own, or the session id needs more than the map's tag).
fn route(port: u16) -> Option<Route> {
    if own_rules() {
        return None;
    }
    let tag = session_tag()?;
    let Some(view) = port_map() else {
        return Some(Route::AsAsked); // no daemon yet: nothing to follow
    };
    if let Some(actual) = view.lookup(tag, port).filter(|a| *a != port) {
        return Some(Route::To(actual));
    }
    let holder = view.held(port);
    if holder != 0 && holder != tag && isolate() && port_class(port).is_some_and(|c| c != UNTOUCHED_PORT) {
        return Some(Route::Refused);
    }
    Some(Route::AsAsked)
}

fn stream(fd: c_int) -> bool {
    let saved = errno();
    let mut ty: c_int = 0;
    let mut len: SockLen = 4;
    // SAFETY: getsockopt writes at most `len` (4) bytes into `ty`; any fd may be asked.
    let ok = unsafe { getsockopt(fd, SOL_SOCKET, SO_TYPE, (&mut ty as *mut c_int).cast(), &mut len) } == 0 && ty == SOCK_STREAM;
    set_errno(saved);
    ok
}

/// `STYXY_PRELOAD_ISOLATE` not turned off.
fn isolate() -> bool {
    env_flag(&ISOLATE, c"STYXY_PRELOAD_ISOLATE", |v| !matches!(v, Some(b"0" | b"off" | b"false" | b"no")))
}

/// The session's tag (`mapview::tag` of `STYXY_PRELOAD_SESSION`), computed once.
fn session_tag() -> Option<u32> {
    let t = TAG.load(Ordering::Relaxed);
    if t != 0 {
        return Some(t);
    }
    // SAFETY: hashed here and not kept.
    let t = mapview::tag(unsafe { env(c"STYXY_PRELOAD_SESSION") }?);
    TAG.store(t, Ordering::Relaxed);
    Some(t)
}

/// The daemon's port map, mapped once it exists and is ours alone.
fn port_map() -> Option<mapview::View<'static>> {
    let mut map = PORTS.load(Ordering::Acquire);
    if map.is_null() {
        map = map_ports()?;
    }
    // SAFETY: a mapping of mapview::SIZE bytes (`map_file`), page-aligned, never unmapped
    // once published.
    Some(unsafe { mapview::View::new(map) })
}

fn map_ports() -> Option<*mut u8> {
    let saved = errno();
    let mut path = [0u8; 4096];
    let mapped = match runtime_file(&mut path, b"/ports.map\0") {
        0 => None,
        n => map_file(&path, n, mapview::SIZE, mapview::MAGIC),
    };
    set_errno(saved);
    let map = mapped?;
    match PORTS.compare_exchange(core::ptr::null_mut(), map, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(map),
        Err(winner) => {
            // SAFETY: our own mapping of mapview::SIZE bytes, which nobody else has seen.
            unsafe { munmap(map.cast(), mapview::SIZE) };
            Some(winner)
        }
    }
}

/// Ports this process bound through [`keep`] (pid and port; a forked child's pid differs,
/// so its `listen()` still confirms with the daemon, becoming an owner).
static KEPT: [core::sync::atomic::AtomicU64; 4] = [const { core::sync::atomic::AtomicU64::new(0) }; 4];

fn kept_key(port: u16) -> u64 {
    // SAFETY: getpid cannot fail.
    (u64::from(unsafe { getpid() } as u32) << 16) | u64::from(port)
}

/// The daemon granted `port` to this process through [`keep`]: it owns the allocation
/// already, its `listen()` has nothing to confirm.
fn kept_here(port: u16) -> bool {
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
unsafe fn keep(fd: c_int, addr: *const c_void, len: SockLen, inet: &Inet, real: AddrFn) -> Option<c_int> {
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
