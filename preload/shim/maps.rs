//! The daemon's two maps, mapped read-only once they exist and are ours alone:
//! `policy.map`, a class per port (common/src/policymap.rs), and `ports.map`, who holds
//! which port (common/src/portmap.rs, read through [`crate::mapview`]).

use core::ffi::{c_int, c_void, CStr};
use core::sync::atomic::{AtomicPtr, Ordering};

use crate::env::{env, own_rules};
use crate::mapview;
use crate::sys::{
    close, errno, getuid, mmap, munmap, open, set_errno, statx, AT_EMPTY_PATH, MAP_SHARED, O_CLOEXEC, O_NOFOLLOW, O_RDONLY, PROT_READ,
    STATX_MODE_UID_SIZE, S_IFMT, S_IFREG,
};
use crate::text::{append, decimal, put};

/// The daemon's policy map (common/src/policymap.rs): magic, header, a class per port.
const POLICY_MAGIC: u32 = 0x5350_5031;
const POLICY_HEADER: usize = 64;
const POLICY_SIZE: usize = POLICY_HEADER + 65536;

/// A port's class in the policy map (as common/src/policymap.rs writes them).
pub(crate) const UNTOUCHED_PORT: u8 = 0;
pub(crate) const COORDINATED_PORT: u8 = 1;
pub(crate) const ON_CONFLICT_PORT: u8 = 2;

static POLICY: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());
static PORTS: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());

/// The class of `port` in the daemon's policy map, `None` when there is no map this
/// process may trust (or it sets its own rules). Mapped once; a missing map is looked
/// for again next time (the daemon may start later).
pub(crate) fn port_class(port: u16) -> Option<u8> {
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
/// common/src/paths.rs). Its length, 0 when it does not fit.
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
