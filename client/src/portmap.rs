//! The shared port map: the built-in daemon's view of who holds which port and which
//! session remapped what, in a file every hooked process maps read-only. It lets
//! `connect()` follow a remap and refuse another session's port with two memory
//! reads, no round trip — also in processes started before the remap.
//!
//! Layout (native endianness): a 64-byte header, then `held[65536]: u32` (the session
//! tag holding each actual port, 0 for none or a process outside any session), then
//! an open-addressing table `remap[65536]: u64` of `tag << 32 | requested << 16 |
//! actual` (0 = never used, actual 0 = deleted). One writer (the daemon, under its
//! lock); readers load whole words, so they never see a torn entry.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const MAGIC: u32 = 0x5350_4d31; // "SPM1"
const SLOTS: usize = 65536;
const HEADER: usize = 64;
const HELD_OFF: usize = HEADER;
const REMAP_OFF: usize = HELD_OFF + SLOTS * 4;
pub const SIZE: usize = REMAP_OFF + SLOTS * 8;

pub struct PortMap {
    base: *mut u8,
}

// SAFETY: all access goes through atomics on a mapping that lives as long as the value.
unsafe impl Send for PortMap {}
unsafe impl Sync for PortMap {}

impl Drop for PortMap {
    fn drop(&mut self) {
        // SAFETY: base was returned by mmap with SIZE.
        unsafe { libc::munmap(self.base.cast(), SIZE) };
    }
}

fn slot(tag: u32, requested: u16) -> usize {
    (tag ^ u32::from(requested).wrapping_mul(0x9e37_79b1)).wrapping_mul(0x85eb_ca6b) as usize >> 16 & (SLOTS - 1)
}

fn pack(tag: u32, requested: u16, actual: u16) -> u64 {
    u64::from(tag) << 32 | u64::from(requested) << 16 | u64::from(actual)
}

impl PortMap {
    /// Maps an existing map read-only (the hooks). Fails if it is missing, of the
    /// wrong size or magic, a symlink, or not ours alone (file and directory: another
    /// user could otherwise steer this session's connects).
    pub fn open_readonly(path: &Path) -> io::Result<PortMap> {
        let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)?;
        crate::paths::owned_by_us(&f.metadata()?, path)?;
        crate::paths::owned_by_us(&std::fs::symlink_metadata(path.parent().unwrap_or(path))?, path)?;
        let map = Self::map(&f, libc::PROT_READ)?;
        if map.header().load(Ordering::Acquire) != MAGIC {
            return Err(io::Error::other("port map not initialised"));
        }
        Ok(map)
    }

    /// Opens or creates the map for writing (the daemon) and clears it. The file is
    /// reused in place, never replaced, so mappings held by running processes stay valid.
    pub fn create(path: &Path) -> io::Result<PortMap> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        f.set_len(SIZE as u64)?;
        let map = Self::map(&f, libc::PROT_READ | libc::PROT_WRITE)?;
        map.clear();
        map.header().store(MAGIC, Ordering::Release);
        Ok(map)
    }

    fn map(f: &std::fs::File, prot: libc::c_int) -> io::Result<PortMap> {
        if f.metadata()?.len() < SIZE as u64 {
            return Err(io::Error::other("port map too small"));
        }
        // SAFETY: mapping a regular file we just opened, SIZE bytes, checked above.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), SIZE, prot, libc::MAP_SHARED, f.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(PortMap { base: p.cast() })
    }

    fn header(&self) -> &AtomicU32 {
        // SAFETY: in bounds and 4-aligned (mmap is page-aligned).
        unsafe { &*(self.base.cast::<AtomicU32>()) }
    }

    fn held_word(&self, port: u16) -> &AtomicU32 {
        // SAFETY: in bounds, aligned.
        unsafe { &*(self.base.add(HELD_OFF + usize::from(port) * 4).cast::<AtomicU32>()) }
    }

    fn remap_word(&self, i: usize) -> &AtomicU64 {
        // SAFETY: i < SLOTS, in bounds, 8-aligned.
        unsafe { &*(self.base.add(REMAP_OFF + i * 8).cast::<AtomicU64>()) }
    }

    /// The tag of the session that holds `port`, 0 if none does.
    pub fn held(&self, port: u16) -> u32 {
        self.held_word(port).load(Ordering::Acquire)
    }

    /// The actual port session `tag` got for `requested`, if it holds one.
    pub fn lookup(&self, tag: u32, requested: u16) -> Option<u16> {
        let mut i = slot(tag, requested);
        for _ in 0..SLOTS {
            let w = self.remap_word(i).load(Ordering::Acquire);
            if w == 0 {
                return None;
            }
            if (w >> 32) as u32 == tag && (w >> 16) as u16 == requested {
                let actual = w as u16;
                return (actual != 0).then_some(actual);
            }
            i = (i + 1) & (SLOTS - 1);
        }
        None
    }

    pub fn set_held(&self, port: u16, tag: u32) {
        self.held_word(port).store(tag, Ordering::Release);
    }

    /// Records (or replaces) `requested → actual` for session `tag`.
    pub fn insert(&self, tag: u32, requested: u16, actual: u16) {
        let mut i = slot(tag, requested);
        let mut free = None;
        for _ in 0..SLOTS {
            let w = self.remap_word(i).load(Ordering::Acquire);
            let same = w != 0 && (w >> 32) as u32 == tag && (w >> 16) as u16 == requested;
            if same {
                self.remap_word(i).store(pack(tag, requested, actual), Ordering::Release);
                return;
            }
            if w == 0 || w as u16 == 0 {
                free.get_or_insert(i);
                if w == 0 {
                    break;
                }
            }
            i = (i + 1) & (SLOTS - 1);
        }
        if let Some(i) = free {
            self.remap_word(i).store(pack(tag, requested, actual), Ordering::Release);
        }
    }

    /// Forgets session `tag`'s remap of `requested` (leaves a deleted marker).
    pub fn remove(&self, tag: u32, requested: u16) {
        let mut i = slot(tag, requested);
        for _ in 0..SLOTS {
            let w = self.remap_word(i).load(Ordering::Acquire);
            if w == 0 {
                return;
            }
            if (w >> 32) as u32 == tag && (w >> 16) as u16 == requested {
                self.remap_word(i).store(pack(tag, requested, 0), Ordering::Release);
                return;
            }
            i = (i + 1) & (SLOTS - 1);
        }
    }

    pub fn clear(&self) {
        for p in 0..=u16::MAX {
            self.set_held(p, 0);
        }
        for i in 0..SLOTS {
            self.remap_word(i).store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_through_another_mapping() {
        let dir = std::env::temp_dir().join(format!("styxy-portmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ports.map");
        assert!(PortMap::open_readonly(&path).is_err());
        let w = PortMap::create(&path).unwrap();
        let r = PortMap::open_readonly(&path).unwrap();
        w.set_held(3007, 42);
        w.insert(42, 3000, 3007);
        assert_eq!(r.held(3007), 42);
        assert_eq!(r.held(3000), 0);
        assert_eq!(r.lookup(42, 3000), Some(3007));
        assert_eq!(r.lookup(43, 3000), None);
        // many colliding entries, then delete and reinsert
        for t in 1..2000u32 {
            w.insert(t, 3000, 3001);
        }
        for t in 1..2000u32 {
            assert_eq!(r.lookup(t, 3000), Some(3001), "{t}");
        }
        w.remove(42, 3000);
        assert_eq!(r.lookup(42, 3000), None);
        assert_eq!(r.lookup(1999, 3000), Some(3001));
        w.insert(42, 3000, 3009);
        assert_eq!(r.lookup(42, 3000), Some(3009));
        // a second writer (daemon restart) clears it in place; old readers see that
        let w2 = PortMap::create(&path).unwrap();
        assert_eq!(r.lookup(42, 3000), None);
        drop(w2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
