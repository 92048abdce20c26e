//! The daemon's two maps: `policy.map`, a class per port (common/src/policymap.rs), and
//! `ports.map`, who holds which port (common/src/portmap.rs), each read once it exists
//! and is ours alone, and mapped in a warm process (read through [`crate::mapview`]); and
//! its block links (common/src/blocklink.rs), which a fresh process reads first: one
//! `readlink` says a port's class, and whether anyone holds or asked for a port of its
//! block (a session's connect to a port of a vacant block reads no map).

use core::ffi::{c_int, CStr};
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use crate::blocklink;
use crate::cstring::{append, decimal, put};
use crate::libc_calls::{
    above_stdio, errno, set_errno, AT_EMPTY_PATH, AT_FDCWD, AT_SYMLINK_NOFOLLOW, MAP_SHARED, O_CLOEXEC, O_DIRECTORY, O_NOCTTY, O_NOFOLLOW,
    O_NONBLOCK, O_RDONLY, PROT_READ, STATX_MODE_UID_SIZE, S_IFDIR, S_IFMT, S_IFREG,
};
use crate::mapview::{self, Words};
use crate::settings::env;
use crate::sys::{close, getdents64, getuid, mmap, munmap, open, pread, read, readlink, statx};

/// The daemon's policy map (common/src/policymap.rs): magic, header, a class per port.
const POLICY_MAGIC: u32 = 0x5350_5031;
const POLICY_HEADER: usize = 64;
const POLICY_SIZE: usize = POLICY_HEADER + 65536;

/// One of the daemon's maps as this process reads it: its cold way ([`Cold`]) for its
/// first [`READS_BEFORE_MAPPING`] looks — a cold process's first touch of a mapped page is
/// a page fault, ~10 us in a VM — then mapped once, for a warm process's looks to cost no
/// syscall.
struct MapFile {
    /// Its name beside the daemon's socket.
    name: &'static str,
    size: usize,
    magic: u32,
    cold: Cold,
    /// Null, or the mapping, published once and never unmapped.
    map: AtomicPtr<u8>,
    reads: AtomicU32,
}

const READS_BEFORE_MAPPING: u32 = 8;

/// How a map is read before it is mapped.
#[derive(PartialEq, Eq)]
enum Cold {
    /// Its file, opened, checked and read with `pread` (~5 us).
    File,
    /// The block links, one `readlink` (~2.5 us; the policy's, [`linked_class`]).
    Links,
}

static POLICY: MapFile = MapFile {
    name: "policy.map",
    size: POLICY_SIZE,
    magic: POLICY_MAGIC,
    cold: Cold::Links,
    map: AtomicPtr::new(core::ptr::null_mut()),
    reads: AtomicU32::new(0),
};
static PORTS: MapFile = MapFile {
    name: "ports.map",
    size: mapview::SIZE,
    magic: mapview::MAGIC,
    cold: Cold::File,
    map: AtomicPtr::new(core::ptr::null_mut()),
    reads: AtomicU32::new(0),
};

/// How a look at a map reads it this time.
enum Look {
    /// Its mapping, of `size` bytes, page-aligned, never unmapped once published.
    Mapped(*const u8),
    /// Its file, open (ours alone, at least `size` bytes) for the look's length.
    File(c_int),
    /// Its links, for the caller to read ([`Cold::Links`]).
    Links,
}

impl MapFile {
    /// `f` over this map, read the way this look reads it ([`Look`]); `None` when there is
    /// no map this process may trust. errno is left as it was.
    fn look<T>(&self, f: impl FnOnce(Look) -> Option<T>) -> Option<T> {
        let map = self.map.load(Ordering::Acquire);
        if !map.is_null() {
            return f(Look::Mapped(map));
        }
        let saved = errno();
        let cold = self.reads.fetch_add(1, Ordering::Relaxed) < READS_BEFORE_MAPPING;
        let got = if cold && self.cold == Cold::Links {
            f(Look::Links)
        } else {
            let mut path = [0u8; RUNTIME_PATH_MAX];
            match runtime_file(&mut path, self.name) {
                0 => None,
                n if cold => with_file(&path, n, self.size, |fd| f(Look::File(fd))).flatten(),
                n => self.map_once(&path, n).and_then(|map| f(Look::Mapped(map))),
            }
        };
        set_errno(saved);
        got
    }

    /// Maps the file at `path[..n]` ([`map_file`]) and publishes the mapping (a racing
    /// thread's is kept, ours undone).
    fn map_once(&self, path: &[u8], n: usize) -> Option<*mut u8> {
        let map = map_file(path, n, self.size, self.magic)?;
        match self.map.compare_exchange(core::ptr::null_mut(), map, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Some(map),
            Err(winner) => {
                // SAFETY: our own mapping of `size` bytes, which nobody else has seen.
                unsafe { munmap(map.cast(), self.size) };
                Some(winner)
            }
        }
    }
}

/// The class of `port` in the daemon's policy: its link's ([`linked_class`]) in a fresh
/// process, the mapped map's in a warm one; `None` when there is none this process may
/// read.
pub(crate) fn port_class(port: u16) -> Option<u8> {
    let at = POLICY_HEADER + usize::from(port);
    POLICY.look(|look| match look {
        // SAFETY: a mapping of POLICY_SIZE bytes ([`Look`]); `at` < POLICY_SIZE.
        Look::Mapped(map) => Some(unsafe { *map.add(at) }),
        // a directory without the links (being written, a file system without links):
        // the map's file
        Look::Links => linked_class(port).or_else(|| {
            let mut path = [0u8; RUNTIME_PATH_MAX];
            match runtime_file(&mut path, POLICY.name) {
                0 => None,
                n => with_file(&path, n, POLICY_SIZE, |fd| read_class(fd, at)).flatten(),
            }
        }),
        Look::File(fd) => read_class(fd, at),
    })
}

/// The class at `at` in the policy map's file, open as `fd`, when its magic is the map's.
fn read_class(fd: c_int, at: usize) -> Option<u8> {
    let (mut magic, mut class) = ([0u8; 4], 0u8);
    // SAFETY: pread writes at most 4 bytes into `magic`, 1 into `class`; `fd` is open (the
    // caller's).
    let read = unsafe { pread(fd, magic.as_mut_ptr().cast(), 4, 0) == 4 && pread(fd, (&mut class as *mut u8).cast(), 1, at as i64) == 1 };
    (read && u32::from_ne_bytes(magic) == POLICY_MAGIC).then_some(class)
}

/// `port`'s class as the link of its block says ([`block_link`]).
fn linked_class(port: u16) -> Option<u8> {
    block_link(port, |target| blocklink::class(target, port)).flatten()
}

/// In a process that has not mapped the port map yet, no port of `port`'s block is held
/// or asked for, as its link says ([`block_link`]): a connect there goes as asked without
/// a look at the port map. `false` when the link says otherwise or cannot be read.
pub(crate) fn vacant_block(port: u16) -> bool {
    let cold = PORTS.map.load(Ordering::Acquire).is_null() && PORTS.reads.load(Ordering::Relaxed) < READS_BEFORE_MAPPING;
    let vacant = cold && block_link(port, blocklink::vacant) == Some(true);
    if vacant {
        PORTS.reads.fetch_add(1, Ordering::Relaxed);
    }
    vacant
}

/// `f` over the target of the link of `port`'s block (`blocks/<block>`, common/src/blocklink.rs):
/// one `readlink`. Not checked for its owner: a link planted by someone who may write the
/// daemon's directory can only make a bind or a connect go as asked, or be asked of the
/// daemon, whose own uid is checked (docs/SECURITY.md). errno is left as it was.
fn block_link<T>(port: u16, f: impl FnOnce(&[u8]) -> T) -> Option<T> {
    let mut path = [0u8; RUNTIME_PATH_MAX];
    let n = match runtime_file(&mut path, blocklink::DIR) {
        0 => return None, // no runtime directory: nothing is ours to read
        n => append(&mut path, n, b"/\0"),
    };
    let n = if n == 0 { 0 } else { decimal(&mut path, n, u32::from(blocklink::link_of(port))) };
    if n == 0 {
        return None;
    }
    let saved = errno();
    let mut target = [0u8; 64];
    // SAFETY: `path` is NUL-terminated (decimal); readlink writes at most 64 bytes into `target`.
    let got = unsafe { readlink(path.as_ptr().cast(), target.as_mut_ptr(), target.len()) };
    set_errno(saved);
    Some(f(target.get(..usize::try_from(got).ok()?)?))
}

/// The longest path of a file beside the daemon's socket: that socket's own path fits a
/// `sockaddr_un` (108 bytes), or there is no daemon. Small, as every buffer of a hook: a
/// cold process's first touch of a deeper stack page is a page fault (~2-10 us in a VM).
pub(crate) const RUNTIME_PATH_MAX: usize = 256;

/// The file `name` beside the daemon's socket, NUL-terminated in `buf`: in the directory
/// of `STYXY_URL`'s `unix:` path, else `$XDG_RUNTIME_DIR/styxy-preload`, else the private
/// `/tmp` fallback ([`tmp_fallback`], as common/src/paths.rs). Its length, 0 when it does
/// not fit or there is none.
pub(crate) fn runtime_file(buf: &mut [u8], name: &str) -> usize {
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
    match append(buf, n, b"/\0") {
        0 => 0,
        n => put(buf, n, name.as_bytes()),
    }
}

/// The `/tmp` fallback directory, as common/src/paths.rs `tmp_fallback` chooses it (which
/// creates it; this only finds it): `/tmp/styxy-preload-<uid>` unless someone else made
/// it, then the first (by name) of ours among `/tmp/styxy-preload-<uid>.XXXXXX`. Written
/// NUL-terminated into `buf`; its length, 0 when there is none of ours (or our uid is the
/// overflow uid: nothing is provably ours).
fn tmp_fallback(buf: &mut [u8]) -> usize {
    let uid = getuid();
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
    let dir = above_stdio(unsafe { open(c"/tmp".as_ptr(), O_RDONLY | O_DIRECTORY | O_NONBLOCK | O_CLOEXEC) });
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
    uid == getuid() && (uid != DEFAULT_OVERFLOW_UID || uid != overflow_uid())
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
    let fd = above_stdio(unsafe { open(path.as_ptr().cast(), O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_NOCTTY | O_CLOEXEC) });
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

/// `f` over the daemon's port map ([`MapFile`]); `None` when there is no map this process
/// may trust.
pub(crate) fn with_port_map<T>(f: impl FnOnce(&dyn Words) -> T) -> Option<T> {
    PORTS.look(|look| match look {
        // SAFETY: a mapping of mapview::SIZE bytes, page-aligned, never unmapped ([`Look`]).
        Look::Mapped(map) => Some(f(&unsafe { mapview::View::new(map) })),
        Look::File(fd) => FileWords::new(fd).filter(|w| w.valid()).map(|w| f(&w)),
        Look::Links => None,
    })
}

/// The port map's words read from its open file: its magic once (it never changes), every
/// other word when asked — the generation too, so a lookup that overlaps a rebuild is
/// retried as over a mapping. A word is read until two reads agree: a `pread` copies
/// bytes, and a word the daemon writes meanwhile could come out torn.
struct FileWords {
    fd: c_int,
    magic: [u8; 4],
}

impl FileWords {
    fn new(fd: c_int) -> Option<FileWords> {
        let magic = Self::pread_at::<4>(fd, 0)?;
        Some(FileWords { fd, magic })
    }

    fn pread_at<const N: usize>(fd: c_int, off: usize) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        // SAFETY: pread writes at most N bytes into `b`; `fd` is open (the caller's).
        (unsafe { pread(fd, b.as_mut_ptr().cast(), N, off as i64) } == N as isize).then_some(b)
    }

    /// The word at `off`, two reads agreeing (at most 4 reads); zeros when it cannot be read.
    fn read<const N: usize>(&self, off: usize) -> [u8; N] {
        if off == 0 && N == 4 {
            let mut b = [0u8; N];
            b.copy_from_slice(self.magic.get(..N).unwrap_or(&[0; N]));
            return b;
        }
        let mut last = Self::pread_at::<N>(self.fd, off);
        for _ in 0..3 {
            let again = Self::pread_at::<N>(self.fd, off);
            if again == last {
                return again.unwrap_or([0u8; N]);
            }
            last = again;
        }
        [0u8; N]
    }
}

impl Words for FileWords {
    fn u32_at(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.read(off))
    }

    fn u64_at(&self, off: usize) -> u64 {
        u64::from_ne_bytes(self.read(off))
    }

    fn u32_or_zero_at(&self, off: usize) -> u32 {
        match Self::pread_at::<4>(self.fd, off).map(u32::from_ne_bytes) {
            Some(0) => 0,
            _ => self.u32_at(off),
        }
    }
}
