//! Where a line of ours may go on the program's stderr — the one rule for every line the
//! shim and the hooks' logic write (`styxy-preload: …`): only where a person reads it, and
//! never with a wait. `no_std` and libc only: the shim includes this file.
//!
//! Where fd 2 is:
//! - a terminal: written through a non-blocking description of our own (another character
//!   device, `/dev/null`: nothing);
//! - a pipe: written when the line fits in it now (≤ `PIPE_BUF` bytes: all or nothing);
//! - a Unix socket (Node's `child_process` gives children a socketpair): sent without a wait;
//! - a regular file: only `exec`'s own `2>file` (`STYXY_PRELOAD_STDERR`, `<dev>:<ino>`) or
//!   a log a shell made of both stdout and stderr (`> log 2>&1`: fds 1 and 2 are one
//!   description, `kcmp`), through the program's description so that its next line
//!   follows ours;
//! - anything else (a network socket, a data file the program reopened at fd 2): nothing.
//!
//! errno is the caller's to keep.

use core::ffi::{c_char, c_int, c_void};

/// Writes of at most this many bytes to a pipe are atomic.
const PIPE_BUF: usize = 4096;

extern "C" {
    fn statx(dirfd: c_int, path: *const c_char, flags: c_int, mask: u32, buf: *mut u8) -> c_int;
    fn open(path: *const c_char, flags: c_int, ...) -> c_int;
    fn fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
    fn close(fd: c_int) -> c_int;
    fn write(fd: c_int, buf: *const c_void, n: usize) -> isize;
    fn read(fd: c_int, buf: *mut c_void, n: usize) -> isize;
    fn ioctl(fd: c_int, request: u64, ...) -> c_int;
    fn getsockopt(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut u32) -> c_int;
    fn send(fd: c_int, buf: *const c_void, n: usize, flags: c_int) -> isize;
    fn getpid() -> c_int;
    fn syscall(number: i64, ...) -> i64;
}

const AT_EMPTY_PATH: c_int = 0x1000;
const STATX_TYPE: u32 = 0x1;
const STATX_INO: u32 = 0x100;
const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;
const S_IFCHR: u16 = 0o020000;
const S_IFIFO: u16 = 0o010000;
const S_IFSOCK: u16 = 0o140000;
const O_RDONLY: c_int = 0;
const O_WRONLY: c_int = 1;
const O_NOCTTY: c_int = 0o400;
const O_NONBLOCK: c_int = 0o4000;
const O_CLOEXEC: c_int = 0o2000000;
const F_DUPFD_CLOEXEC: c_int = 1030;
const F_GETPIPE_SZ: c_int = 1032;
const FIONREAD: u64 = 0x541b;
const TCGETS: u64 = 0x5401;
const SOL_SOCKET: c_int = 1;
const SO_DOMAIN: c_int = 39;
const AF_UNIX: c_int = 1;
const MSG_DONTWAIT: c_int = 0x40;
const MSG_NOSIGNAL: c_int = 0x4000;
#[cfg(target_arch = "x86_64")]
const SYS_KCMP: i64 = 312;
#[cfg(target_arch = "aarch64")]
const SYS_KCMP: i64 = 272;

/// Writes `line` (with its newline) to fd 2 under the rule above; `stderr_file` is the
/// process's `STYXY_PRELOAD_STDERR`.
pub fn write_line(line: &[u8], stderr_file: Option<&[u8]>) {
    let mut st = [0u8; 256];
    // SAFETY: statx of fd 2 itself (AT_EMPTY_PATH) writes a `struct statx` (256 bytes) into `st`.
    if unsafe { statx(2, c"".as_ptr(), AT_EMPTY_PATH, STATX_TYPE | STATX_INO, st.as_mut_ptr()) } != 0 {
        return;
    }
    let kind = st.get(28..30).and_then(|b| <[u8; 2]>::try_from(b).ok()).map_or(0, u16::from_ne_bytes) & S_IFMT;
    match kind {
        S_IFCHR if is_terminal() => to_terminal(line),
        S_IFIFO if line.len() <= PIPE_BUF && pipe_room().is_some_and(|room| room >= line.len()) => {
            // SAFETY: `line.len()` bytes of `line` to fd 2: all at once or nothing (≤ PIPE_BUF).
            unsafe { write(2, line.as_ptr().cast(), line.len()) };
        }
        S_IFSOCK if sockopt(SO_DOMAIN) == Some(AF_UNIX) => {
            // SAFETY: `line.len()` bytes of `line`, never a wait, never SIGPIPE.
            unsafe { send(2, line.as_ptr().cast(), line.len(), MSG_DONTWAIT | MSG_NOSIGNAL) };
        }
        S_IFREG if stderr_file.is_some_and(|f| execs_file(&st, f)) || stdout_is_stderr() => {
            // SAFETY: `line.len()` bytes of `line` to fd 2 (a regular file never makes a write wait).
            unsafe { write(2, line.as_ptr().cast(), line.len()) };
        }
        _ => {}
    }
}

/// A terminal at fd 2: through a non-blocking description of our own (≥ 3, close-on-exec),
/// the program's own description left as it is.
fn to_terminal(line: &[u8]) {
    // SAFETY: a NUL-terminated path; the description is ours (closed below).
    let fd = unsafe { open(c"/proc/self/fd/2".as_ptr(), O_WRONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC) };
    if fd < 0 {
        return;
    }
    let fd = if fd <= 2 {
        // SAFETY: our own fd; a copy ≥ 3 (stdio was closed), the original closed.
        unsafe {
            let high = fcntl(fd, F_DUPFD_CLOEXEC, 3 as c_int);
            close(fd);
            high
        }
    } else {
        fd
    };
    if fd >= 0 {
        // SAFETY: `line.len()` bytes of `line` to our own fd, closed at once.
        unsafe {
            write(fd, line.as_ptr().cast(), line.len());
            close(fd);
        }
    }
}

/// Whether the character device at fd 2 is a terminal (`TCGETS`): `/dev/null` is not, and
/// a line written there is lost for nothing (an open of `/proc/self/fd/2`, ~10 us cold).
fn is_terminal() -> bool {
    let mut termios = [0u8; 64]; // a `struct termios` is 60 bytes
                                 // SAFETY: TCGETS writes one `struct termios` into `termios`, which is larger.
    unsafe { ioctl(2, TCGETS, termios.as_mut_ptr()) == 0 }
}

/// Free bytes in the pipe at fd 2.
fn pipe_room() -> Option<usize> {
    let mut queued: c_int = 0;
    // SAFETY: fcntl of fd 2, no memory.
    let size = unsafe { fcntl(2, F_GETPIPE_SZ) };
    // SAFETY: FIONREAD writes one int into `queued`.
    if size < 0 || unsafe { ioctl(2, FIONREAD, &mut queued as *mut c_int) } != 0 {
        return None;
    }
    usize::try_from(size - queued).ok()
}

fn sockopt(name: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len: u32 = 4;
    // SAFETY: getsockopt writes at most `len` (4) bytes into `v`.
    (unsafe { getsockopt(2, SOL_SOCKET, name, (&mut v as *mut c_int).cast(), &mut len) } == 0).then_some(v)
}

/// The regular file at fd 2 (its `statx` in `st`) is the one `exec` was started with:
/// `want`, its `STYXY_PRELOAD_STDERR`, is `<dev>:<ino>`, `dev` as glibc's `makedev` makes it.
fn execs_file(st: &[u8; 256], want: &[u8]) -> bool {
    let bytes = |at: usize| st.get(at..at + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_ne_bytes);
    let (ino, dev_words) = (bytes(32), bytes(136));
    // stx_dev_major and stx_dev_minor, two u32 words
    let (major, minor) = if cfg!(target_endian = "little") {
        (dev_words & 0xffff_ffff, dev_words >> 32)
    } else {
        (dev_words >> 32, dev_words & 0xffff_ffff)
    };
    let dev = ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12);
    let mut text = [0u8; 48];
    let n = decimal(&mut text, 0, dev);
    let n = match text.get_mut(n) {
        Some(colon) => {
            *colon = b':';
            decimal(&mut text, n + 1, ino)
        }
        None => 0,
    };
    n != 0 && text.get(..n) == Some(want)
}

/// `v` in decimal into `buf` at `at`; the new length, 0 when it does not fit.
fn decimal(buf: &mut [u8], at: usize, v: u64) -> usize {
    let mut digits = [0u8; 20];
    let (mut i, mut v) = (digits.len(), v);
    while let Some(d) = i.checked_sub(1).and_then(|j| digits.get_mut(j)) {
        *d = b'0' + (v % 10) as u8;
        i -= 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let number = digits.get(i..).unwrap_or(&[]);
    match buf.get_mut(at..at + number.len()) {
        Some(to) => {
            to.copy_from_slice(number);
            at + number.len()
        }
        None => 0,
    }
}

/// fds 1 and 2 are one open file description (`> log 2>&1`): a log a shell made of the
/// program's output, not a data file the program opened at fd 2 (`kcmp`; where a seccomp
/// profile refuses it, as Docker's does: the same file at the same offset with the same
/// flags, from `/proc/self/fdinfo`).
fn stdout_is_stderr() -> bool {
    // SAFETY: getpid cannot fail; kcmp compares two of this process's fds, no memory.
    let same = unsafe {
        let me = getpid() as i64;
        syscall(SYS_KCMP, me, me, 0 /* KCMP_FILE */, 1i64, 2i64)
    };
    match same {
        0 => true,
        1..=3 => false,
        _ => same_file(1, 2) && fdinfo(1).is_some_and(|one| fdinfo(2) == Some(one)),
    }
}

/// fds `a` and `b` are the same file (device and inode).
fn same_file(a: c_int, b: c_int) -> bool {
    let id = |fd: c_int| {
        let mut st = [0u8; 256];
        // SAFETY: statx of the fd itself (AT_EMPTY_PATH) writes a `struct statx` into `st`.
        let ok = unsafe { statx(fd, c"".as_ptr(), AT_EMPTY_PATH, STATX_INO, st.as_mut_ptr()) } == 0;
        let word = |at: usize| st.get(at..at + 8).and_then(|b| <[u8; 8]>::try_from(b).ok());
        ok.then(|| (word(32), word(136)))
    };
    matches!((id(a), id(b)), (Some(x), Some(y)) if x == y)
}

/// `/proc/self/fdinfo/<fd>` (offset, flags, mount, inode): up to 256 bytes of it.
fn fdinfo(fd: u8) -> Option<([u8; 256], usize)> {
    let mut path = *b"/proc/self/fdinfo/0\0";
    if let Some(digit) = path.get_mut(18) {
        *digit = b'0' + fd % 10;
    }
    // SAFETY: a NUL-terminated path; the fd is ours, closed below.
    let f = unsafe { open(path.as_ptr().cast(), O_RDONLY | O_CLOEXEC | O_NONBLOCK) };
    if f < 0 {
        return None;
    }
    let mut buf = [0u8; 256];
    // SAFETY: read writes at most `buf.len()` bytes into `buf`; then our fd is closed.
    let n = unsafe {
        let n = read(f, buf.as_mut_ptr().cast(), buf.len());
        close(f);
        n
    };
    usize::try_from(n).ok().map(|n| (buf, n))
}
