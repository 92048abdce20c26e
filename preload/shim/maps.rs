//! The daemon's two maps, read once they exist and are ours alone: `policy.map`, a class
//! per port (common/src/policymap.rs, read with `pread`: no page fault), and `ports.map`,
//! who holds which port (common/src/portmap.rs, mapped, read through [`crate::mapview`]).

use core::ffi::{c_int, CStr};
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use crate::cstring::{append, decimal, put};
use crate::libc_calls::{
    close, errno, getdents64, getuid, mmap, munmap, open, pread, read, set_errno, statx, AT_EMPTY_PATH, AT_FDCWD, AT_SYMLINK_NOFOLLOW,
    MAP_SHARED, O_CLOEXEC, O_DIRECTORY, O_NOCTTY, O_NOFOLLOW, O_NONBLOCK, O_RDONLY, PROT_READ, STATX_MODE_UID_SIZE, S_IFDIR, S_IFMT,
    S_IFREG,
};
use crate::mapview;
use crate::settings::{env, own_rules};

/// The daemon's policy map (common/src/policymap.rs): magic, header, a class per port.
const POLICY_MAGIC: u32 = 0x5350_5031;
const POLICY_HEADER: usize = 64;
const POLICY_SIZE: usize = POLICY_HEADER + 65536;

/// A port's class in the policy map (as common/src/policymap.rs writes them).
pub(crate) const UNTOUCHED_PORT: u8 = 0;
pub(crate) const COORDINATED_PORT: u8 = 1;
pub(crate) const ON_CONFLICT_PORT: u8 = 2;

static PORTS: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());

/// The class of `port` in the daemon's policy map, `None` when there is no map this
/// process may trust (or it sets its own rules). Read with `pread` each time, never
/// mapped: a cold process's first touch of a mapped page costs ~10 us (a page fault),
/// opening and reading the file ~3 us, and a bind asks this once.
pub(crate) fn port_class(port: u16) -> Option<u8> {
    if own_rules() {
        return None;
    }
    let saved = errno();
    let mut path = [0u8; 4096];
    let class = match runtime_file(&mut path, b"/policy.map\0") {
        0 => None,
        n => with_file(&path, n, POLICY_SIZE, |fd| {
            let (mut magic, mut class) = ([0u8; 4], 0u8);
            // SAFETY: pread writes at most 4 bytes into `magic`, 1 into `class`; `fd` is
            // open (`with_file`).
            let read = unsafe {
                pread(fd, magic.as_mut_ptr().cast(), 4, 0) == 4
                    && pread(fd, (&mut class as *mut u8).cast(), 1, (POLICY_HEADER + usize::from(port)) as i64) == 1
            };
            (read && u32::from_ne_bytes(magic) == POLICY_MAGIC).then_some(class)
        })
        .flatten(),
    };
    set_errno(saved);
    class
}

/// A file beside the daemon's socket (`name` as `b"/policy.map\0"`): the directory of `STYXY_URL`'s `unix:` path,
/// else `$XDG_RUNTIME_DIR/styxy-preload`, else the private `/tmp` fallback ([`tmp_fallback`],
/// as common/src/paths.rs). Its length, 0 when it does not fit or there is none.
pub(crate) fn runtime_file(buf: &mut [u8], name: &[u8]) -> usize {
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
        tmp_fallback(buf)
    };
    if n == 0 {
        return 0;
    }
    append(buf, n, name)
}

/// The `/tmp` fallback directory, as common/src/paths.rs `tmp_fallback` chooses it (which
/// creates it; this only finds it): `/tmp/styxy-preload-<uid>` unless someone else made
/// it, then the first (by name) of ours among `/tmp/styxy-preload-<uid>.XXXXXX`. Written
/// NUL-terminated into `buf`; its length, 0 when there is none of ours (or our uid is the
/// overflow uid: nothing is provably ours).
fn tmp_fallback(buf: &mut [u8]) -> usize {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { getuid() };
    if !own_uid(uid) {
        return 0;
    }
    let n = append(buf, 0, b"/tmp/styxy-preload-\0");
    let n = decimal(buf, n, uid);
    let Some(base) = buf.get(..=n) else { return 0 };
    match kind_of(AT_FDCWD, base) {
        None => return n, // not there (yet): the CLI creates it
        Some(own) if own == (S_IFDIR, true) => return n,
        Some(_) => {}
    }
    let mut best = [0u8; 64];
    let found = own_sibling(buf.get(5..n).unwrap_or(&[]), &mut best);
    if found == 0 {
        return 0;
    }
    let n = append(buf, 0, b"/tmp/\0");
    put(buf, n, best.get(..found).unwrap_or(&[]))
}

/// The first (by name) entry of `/tmp` named `<prefix>.XXXXXX` that is a directory ours
/// alone, copied into `best` (with its NUL); its length, 0 when there is none.
fn own_sibling(prefix: &[u8], best: &mut [u8; 64]) -> usize {
    // SAFETY: a NUL-terminated path; the fd is ours (closed below), never waited on.
    let dir = unsafe { open(c"/tmp".as_ptr(), O_RDONLY | O_DIRECTORY | O_NONBLOCK | O_CLOEXEC) };
    if dir < 0 {
        return 0;
    }
    let mut found = 0;
    each_entry(dir, |bytes| {
        let ours = bytes.len() == prefix.len() + 8 && bytes.starts_with(prefix) && bytes.get(prefix.len()) == Some(&b'.');
        if ours && (found == 0 || bytes < best.get(..found).unwrap_or(&[])) && kind_of(dir, bytes) == Some((S_IFDIR, true)) {
            if let Some(to) = best.get_mut(..bytes.len()) {
                to.copy_from_slice(bytes);
                found = bytes.len() - 1;
            }
        }
    });
    // SAFETY: our own fd, opened above.
    unsafe { close(dir) };
    found
}

/// Calls `f` with the name (NUL-terminated) of every entry of the directory open at `dir`.
pub(crate) fn each_entry(dir: c_int, mut f: impl FnMut(&[u8])) {
    let mut ents = [0u8; 2048];
    loop {
        // SAFETY: the kernel writes at most `ents.len()` bytes of whole records into `ents`.
        let got = unsafe { getdents64(dir, ents.as_mut_ptr().cast(), ents.len()) };
        let Some(got) = usize::try_from(got).ok().filter(|g| *g > 0) else { break };
        let mut at = 0;
        while let Some(rec) = ents.get(at..got) {
            // struct linux_dirent64: d_ino (8), d_off (8), d_reclen (2), d_type (1), d_name
            let len = rec.get(16..18).and_then(|l| <[u8; 2]>::try_from(l).ok()).map_or(0, |l| usize::from(u16::from_ne_bytes(l)));
            let Some(name) = rec.get(19..len).and_then(|n| n.get(..=n.iter().position(|c| *c == 0)?)) else { break };
            at += len;
            f(name);
        }
    }
}

/// The kind of `path` (NUL-terminated; not followed) and whether it is ours alone (ours,
/// nobody else may write it); `None` when it cannot be looked at.
fn kind_of(dirfd: c_int, path: &[u8]) -> Option<(u16, bool)> {
    if path.last() != Some(&0) {
        return None;
    }
    // SAFETY: NUL-terminated (checked above), and unchanged while statx reads it.
    let (uid, mode, _) = stat(dirfd, unsafe { CStr::from_ptr(path.as_ptr().cast()) }, AT_SYMLINK_NOFOLLOW)?;
    Some((mode & S_IFMT, own_uid(uid) && mode & 0o022 == 0))
}

/// `uid` is this user's: ours, and not the overflow uid, which stands for every user this
/// user namespace does not map (inside `unshare -U`, ours too). The overflow uid is read
/// (an ~11 us `/proc` read) only when ours is the kernel's default one, 65534: a system
/// that sets `kernel.overflowuid` to the uid of a real user is not told apart.
pub(crate) fn own_uid(uid: u32) -> bool {
    // SAFETY: getuid cannot fail.
    uid == unsafe { getuid() } && (uid != DEFAULT_OVERFLOW_UID || uid != overflow_uid())
}

/// `kernel.overflowuid` unless a system sets another.
const DEFAULT_OVERFLOW_UID: u32 = 65534;

/// `/proc/sys/kernel/overflowuid` (65534 when it cannot be read), read once.
fn overflow_uid() -> u32 {
    static UID: AtomicU32 = AtomicU32::new(u32::MAX);
    let known = UID.load(Ordering::Relaxed);
    if known != u32::MAX {
        return known;
    }
    let mut text = [0u8; 16];
    // SAFETY: a NUL-terminated path; the fd is ours, closed here; read writes at most
    // `text.len()` bytes into `text`.
    let got = unsafe {
        let fd = open(c"/proc/sys/kernel/overflowuid".as_ptr(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if fd < 0 {
            -1
        } else {
            let got = read(fd, text.as_mut_ptr().cast(), text.len());
            close(fd);
            got
        }
    };
    let digits = usize::try_from(got).ok().and_then(|g| text.get(..g)).unwrap_or(&[]);
    let mut digits = digits.iter().take_while(|c| c.is_ascii_digit());
    let parsed = digits.try_fold(0u32, |v, c| v.checked_mul(10)?.checked_add(u32::from(c - b'0')));
    let uid = parsed.filter(|u| *u != u32::MAX && got > 1).unwrap_or(65534);
    UID.store(uid, Ordering::Relaxed);
    uid
}

/// Calls `f` with the file at `path[..n]` open read-only if it is ours alone (checked on
/// the opened file: a file swapped in by someone else is not ours) and at least `size`
/// bytes long; `None` when it is not.
fn with_file<T>(path: &[u8], n: usize, size: usize, f: impl FnOnce(c_int) -> T) -> Option<T> {
    if path.get(n) != Some(&0) {
        return None;
    }
    // SAFETY: `path` is NUL-terminated (checked above); the fd is ours (closed below).
    // never waits: a FIFO someone planted there opens at once, and is then refused
    let fd = unsafe { open(path.as_ptr().cast(), O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_NOCTTY | O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let got = ours(fd, c"", AT_EMPTY_PATH, S_IFREG, size as u64).then(|| f(fd));
    // SAFETY: our own fd, opened above.
    unsafe { close(fd) };
    got
}

/// Maps `size` bytes of the file at `path[..n]` if it is ours alone ([`with_file`]) and
/// its first word is `magic`.
fn map_file(path: &[u8], n: usize, size: usize, magic: u32) -> Option<*mut u8> {
    // SAFETY: a new read-only mapping of our own open fd, placed by the kernel (it replaces
    // nothing); the mapping outlives the fd.
    let map = with_file(path, n, size, |fd| unsafe { mmap(core::ptr::null_mut(), size, PROT_READ, MAP_SHARED, fd, 0) })?;
    if map as usize == usize::MAX {
        return None;
    }
    // SAFETY: `map` holds `size` bytes of a file at least that long (`with_file`),
    // page-aligned; `size` is more than a word.
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
    stat(dirfd, path, flags).is_some_and(|(uid, mode, len)| own_uid(uid) && mode & S_IFMT == kind && mode & 0o022 == 0 && len >= size)
}

/// The owner, mode and size of `path` (statx).
fn stat(dirfd: c_int, path: &CStr, flags: c_int) -> Option<(u32, u16, u64)> {
    let mut st = [0u8; 256];
    // SAFETY: `path` is NUL-terminated; statx writes a `struct statx` (256 bytes) into `st`.
    if unsafe { statx(dirfd, path.as_ptr(), flags, STATX_MODE_UID_SIZE, st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: stx_uid, stx_mode and stx_size, within `st`, read unaligned.
    Some(unsafe {
        (
            core::ptr::read_unaligned(st.as_ptr().add(20).cast::<u32>()),
            core::ptr::read_unaligned(st.as_ptr().add(28).cast::<u16>()),
            core::ptr::read_unaligned(st.as_ptr().add(40).cast::<u64>()),
        )
    })
}

/// The daemon's port map, mapped once it exists and is ours alone.
pub(crate) fn port_map() -> Option<mapview::View<'static>> {
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
