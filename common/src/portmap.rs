//! The shared port map: the built-in daemon's view of who holds which port and which
//! session remapped what, in a file every hooked process maps read-only. It lets
//! `connect()` follow a remap and refuse another session's port with a few memory
//! reads, no round trip — also in processes started before the remap.
//!
//! Layout (version 3, magic "SPM3", native endianness; 64 + 256 KiB + 512 KiB, the size
//! of version 1, so a mapping made by either version stays inside the file):
//!
//! - a 64-byte header: `magic: u32`, `generation: u32` (the active remap table is
//!   `generation & 1`), `beat: u64` (the daemon's liveness, `CLOCK_MONOTONIC` ms: see
//!   [`crate::mapview::BEAT_STALE_MS`]);
//! - `held[65536]: u32`: the session tag holding each actual port, 0 for none or a
//!   process outside any session, with [`crate::mapview::MAPPED`] when some session's
//!   remap entry has the port as the one it asked for (a connect to a port whose word is
//!   0 reads nothing more);
//! - two open-addressing tables `remap[2][32768]: u64` of `tag << 32 | requested << 16 |
//!   actual` (0 = never used, actual 0 = deleted), linear probing.
//!
//! One writer (the daemon, under its lock); readers in other processes load whole
//! words, so they never see a torn entry. The writer tells its block links
//! ([`crate::blocklinks`]) of every `held` word that becomes used or unused: a fresh
//! process reads there whether a block has any.
//!
//! **Reclaiming deleted entries.** Deleted entries (tombstones) keep probe chains
//! intact but lengthen every lookup that crosses them; never reclaimed, they filled the
//! table until a lookup for an unmapped port scanned all of it. Two mechanisms keep
//! chains short without ever hiding a live entry from a concurrent reader:
//!
//! 1. *In place:* a tombstone followed by a never-used slot is turned back into a
//!    never-used slot, and so is each tombstone before it. No probe chain crosses such
//!    a tombstone (a chain is contiguous up to its entry, and the next slot ends every
//!    chain), so a reader never loses its way, whenever it reads.
//! 2. *Rebuild:* when tombstones still outnumber a threshold, the writer copies the live
//!    entries into the other (cleared) table and then flips `generation` (a release
//!    store). A reader loads `generation`, probes that table, and loads `generation`
//!    again: unchanged, no rebuild touched its table meanwhile (a table is cleared only
//!    while the other one is active), so its answer stands; changed, it looks again.
//!
//! Backward-shift deletion was the alternative: it moves live entries towards their home
//! slot, and a reader already past the destination but not yet at the source misses the
//! moving entry, so it would need the same generation check on every removal; the two
//! tables confine that window to the rare rebuild and keep removal a single store.
//!
//! A file written by another version carries another magic: `open_readonly` refuses it,
//! and a reader of this version that mapped the file before a daemon of another version
//! re-created it in place sees the magic change and finds nothing (no remap, no holder).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::blocklinks::BlockLinks;
pub use crate::mapview::SIZE;
use crate::mapview::{self, deleted, is, next, pack, prev, slot, Liveness, View, Words, MAGIC, MAPPED, SLOTS};

/// Tombstones that trigger a rebuild: at most 1/16 of the table, so the load (live +
/// deleted) stays under 1/4 with the daemon's 4096 allocations and lookups stay short.
const REBUILD_AT: usize = SLOTS / 16;

pub struct PortMap {
    base: *mut u8,
    /// The writer's counts for the active table (meaningless in a read-only mapping).
    live: AtomicUsize,
    dead: AtomicUsize,
    /// The writer's live remap entries per requested port: [`MAPPED`] is set while there
    /// is one (none in a read-only mapping).
    mapped: Box<[AtomicU32]>,
    /// The writer's block links, told of every word that becomes used or unused.
    links: Option<BlockLinks>,
}

// SAFETY: all access goes through atomics on a mapping that lives as long as the value.
unsafe impl Send for PortMap {}
// SAFETY: as for Send.
unsafe impl Sync for PortMap {}

impl Drop for PortMap {
    fn drop(&mut self) {
        // SAFETY: base was returned by mmap with SIZE.
        unsafe { libc::munmap(self.base.cast(), SIZE) };
    }
}

impl PortMap {
    /// Maps an existing map read-only (the hooks). Fails if it is missing, of the
    /// wrong size or version, a symlink, or not ours alone (file and directory: another
    /// user could otherwise steer this session's connects).
    pub fn open_readonly(path: &Path) -> io::Result<PortMap> {
        let f = crate::paths::open_regular(std::fs::OpenOptions::new().read(true), path)?;
        crate::paths::owned_by_us(&f.metadata()?, path)?;
        crate::paths::owned_by_us(&std::fs::symlink_metadata(path.parent().unwrap_or(path))?, path)?;
        let map = Self::map(&f, libc::PROT_READ)?;
        if !map.valid() {
            return Err(io::Error::other("port map not initialised, or of another version"));
        }
        Ok(map)
    }

    /// Opens or creates the map for writing (the daemon) and clears it. The file is
    /// reused in place, never replaced nor shrunk, so mappings held by running
    /// processes stay valid.
    pub fn create(path: &Path) -> io::Result<PortMap> {
        let f =
            crate::paths::open_regular(std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600), path)?;
        if f.metadata()?.len() < SIZE as u64 {
            f.set_len(SIZE as u64)?;
        }
        let map = Self::map(&f, libc::PROT_READ | libc::PROT_WRITE)?;
        map.magic().store(0, Ordering::Release);
        map.clear();
        map.generation().store(0, Ordering::Release);
        map.magic().store(MAGIC, Ordering::Release);
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
        let writer = prot & libc::PROT_WRITE != 0;
        let mapped = (0..if writer { mapview::PORTS } else { 0 }).map(|_| AtomicU32::new(0)).collect();
        Ok(PortMap { base: p.cast(), live: AtomicUsize::new(0), dead: AtomicUsize::new(0), mapped, links: None })
    }

    /// The writer's map, with its block links, told of the words in use now and of every
    /// word from now on.
    pub fn with_block_links(mut self, links: BlockLinks) -> PortMap {
        for port in (0..=u16::MAX).filter(|p| self.held_word(*p).load(Ordering::Relaxed) != 0) {
            links.use_port(port);
        }
        self.links = Some(links);
        self
    }

    pub fn block_links(&self) -> Option<&BlockLinks> {
        self.links.as_ref()
    }

    fn view(&self) -> View<'_> {
        // SAFETY: base is our mapping of SIZE bytes, alive as long as self.
        unsafe { View::new(self.base) }
    }

    fn magic(&self) -> &AtomicU32 {
        self.view().magic()
    }

    fn generation(&self) -> &AtomicU32 {
        self.view().generation()
    }

    fn valid(&self) -> bool {
        self.view().valid()
    }

    /// The daemon is alive now (the writer).
    pub fn beat(&self) {
        self.view().beat().store(monotonic_ms(), Ordering::Release);
    }

    /// The daemon that beats is this process (the writer, once).
    pub fn set_daemon_pid(&self, pid: u32) {
        self.view().daemon_pid().store(pid, Ordering::Release);
    }

    /// The daemon beat recently (a reader): it is alive, however busy.
    pub fn alive(&self) -> bool {
        self.view().alive(monotonic_ms())
    }

    fn held_word(&self, port: u16) -> &AtomicU32 {
        self.view().held_word(port)
    }

    fn remap_word(&self, table: u32, i: usize) -> &AtomicU64 {
        self.view().remap_word(table, i)
    }

    /// The tag of the session that holds `port`, 0 if none does.
    pub fn held(&self, port: u16) -> u32 {
        self.view().held(port)
    }

    /// The actual port session `tag` got for `requested`, if it holds one.
    pub fn lookup(&self, tag: u32, requested: u16) -> Option<u16> {
        self.view().lookup(tag, requested)
    }

    /// What a process of session `tag` finds for `port` ([`Words::found`]).
    pub fn found(&self, tag: u32, port: u16) -> (Option<u16>, u32) {
        self.view().found(tag, port)
    }

    /// How many slots `lookup(tag, requested)` reads in the active table (1 when its
    /// home slot is free): what a `connect()` in a session pays.
    pub fn lookup_probes(&self, tag: u32, requested: u16) -> usize {
        self.view().probe(self.generation().load(Ordering::Acquire), tag, requested).1
    }

    pub fn set_held(&self, port: u16, tag: u32) {
        let w = self.held_word(port).load(Ordering::Relaxed);
        self.store_held(port, w & MAPPED | tag & !MAPPED);
    }

    /// Stores `port`'s word: its block's link says the block is used before its first
    /// word is (a reader that finds the link vacant finds nothing here either), and is
    /// told after a word is unused again.
    fn store_held(&self, port: u16, new: u32) {
        let w = self.held_word(port);
        let old = w.load(Ordering::Relaxed);
        if let Some(links) = self.links.as_ref().filter(|_| old == 0 && new != 0) {
            links.use_port(port);
        }
        w.store(new, Ordering::Release);
        if let Some(links) = self.links.as_ref().filter(|_| old != 0 && new == 0) {
            links.unuse_port(port, monotonic_ms());
        }
    }

    /// One more (`+1`) or one less (`-1`) live remap entry for `requested`: [`MAPPED`]
    /// in its `held` word while there is any.
    fn count_mapped(&self, requested: u16, delta: i32) {
        let Some(c) = self.mapped.get(usize::from(requested)) else { return };
        let n = c.load(Ordering::Relaxed).saturating_add_signed(delta);
        c.store(n, Ordering::Relaxed);
        let w = self.held_word(requested).load(Ordering::Relaxed);
        self.store_held(requested, w & !MAPPED | if n > 0 { MAPPED } else { 0 });
    }

    /// Records (or replaces) `requested → actual` for session `tag`.
    pub fn insert(&self, tag: u32, requested: u16, actual: u16) {
        let t = self.generation().load(Ordering::Relaxed);
        let mut i = slot(tag, requested);
        let mut free = None;
        for _ in 0..SLOTS {
            let w = self.remap_word(t, i).load(Ordering::Relaxed);
            if is(w, tag, requested) {
                // marked before the entry is there: a reader never sees an entry unmarked
                if deleted(w) && actual != 0 {
                    self.count_mapped(requested, 1);
                }
                self.remap_word(t, i).store(pack(tag, requested, actual), Ordering::Release);
                if deleted(w) && actual != 0 {
                    self.dead.fetch_sub(1, Ordering::Relaxed);
                    self.live.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            if w == 0 || deleted(w) {
                free.get_or_insert((i, w));
                if w == 0 {
                    break;
                }
            }
            i = next(i);
        }
        match free {
            Some((i, w)) => {
                if actual != 0 {
                    self.count_mapped(requested, 1);
                }
                self.remap_word(t, i).store(pack(tag, requested, actual), Ordering::Release);
                if deleted(w) {
                    self.dead.fetch_sub(1, Ordering::Relaxed);
                }
                self.live.fetch_add(1, Ordering::Relaxed);
                let dead = self.dead.load(Ordering::Relaxed);
                if dead > 0 && self.live.load(Ordering::Relaxed) + dead > SLOTS / 2 {
                    self.rebuild();
                }
            }
            // full of tombstones: compact, then there is room
            None if self.dead.load(Ordering::Relaxed) > 0 => {
                self.rebuild();
                self.insert(tag, requested, actual);
            }
            None => {}
        }
    }

    /// Forgets session `tag`'s remap of `requested`; its slot is reclaimed at once when
    /// it ends a chain, else by a later rebuild.
    pub fn remove(&self, tag: u32, requested: u16) {
        let t = self.generation().load(Ordering::Relaxed);
        let mut i = slot(tag, requested);
        for _ in 0..SLOTS {
            let w = self.remap_word(t, i).load(Ordering::Relaxed);
            if w == 0 {
                return;
            }
            if is(w, tag, requested) {
                if deleted(w) {
                    return;
                }
                self.remap_word(t, i).store(pack(tag, requested, 0), Ordering::Release);
                self.count_mapped(requested, -1);
                self.live.fetch_sub(1, Ordering::Relaxed);
                self.dead.fetch_add(1, Ordering::Relaxed);
                self.reclaim_before(t, next(i));
                if self.dead.load(Ordering::Relaxed) > REBUILD_AT {
                    self.rebuild();
                }
                return;
            }
            i = next(i);
        }
    }

    /// When slot `end` of `table` is free, the tombstones right before it end no chain
    /// that leads anywhere: each becomes free, from the last one backwards.
    fn reclaim_before(&self, table: u32, end: usize) {
        if self.remap_word(table, end).load(Ordering::Relaxed) != 0 {
            return;
        }
        let mut i = prev(end);
        for _ in 0..SLOTS {
            if !deleted(self.remap_word(table, i).load(Ordering::Relaxed)) {
                return;
            }
            self.remap_word(table, i).store(0, Ordering::Release);
            self.dead.fetch_sub(1, Ordering::Relaxed);
            i = prev(i);
        }
    }

    /// Copies the live entries of the active table into the other one, cleared first,
    /// then makes that one active: no tombstone left. Readers of the old table finish
    /// there (it is only cleared by the next rebuild) or look again.
    pub fn rebuild(&self) {
        let from = self.generation().load(Ordering::Relaxed);
        let to = from ^ 1;
        for i in 0..SLOTS {
            self.remap_word(to, i).store(0, Ordering::Relaxed);
        }
        let mut live = 0;
        for i in 0..SLOTS {
            let w = self.remap_word(from, i).load(Ordering::Relaxed);
            if w == 0 || deleted(w) {
                continue;
            }
            let mut j = slot((w >> 32) as u32, (w >> 16) as u16);
            while self.remap_word(to, j).load(Ordering::Relaxed) != 0 {
                j = next(j);
            }
            self.remap_word(to, j).store(w, Ordering::Relaxed);
            live += 1;
        }
        // publishes the new table and everything written to it
        self.generation().store(from.wrapping_add(1), Ordering::Release);
        self.live.store(live, Ordering::Relaxed);
        self.dead.store(0, Ordering::Relaxed);
    }

    pub fn clear(&self) {
        for p in 0..=u16::MAX {
            if let Some(c) = self.mapped.get(usize::from(p)) {
                c.store(0, Ordering::Relaxed);
            }
            self.store_held(p, 0);
        }
        for t in 0..2 {
            for i in 0..SLOTS {
                self.remap_word(t, i).store(0, Ordering::Release);
            }
        }
        self.live.store(0, Ordering::Relaxed);
        self.dead.store(0, Ordering::Relaxed);
    }
}

/// Whether the daemon whose port map is at `path` beat recently: read from the header
/// alone (a non-blocking open of a regular file that is ours alone, one `pread`), for a
/// client deciding whether a slow answer is worth waiting for.
pub fn alive_at(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(f) = crate::paths::open_regular(std::fs::OpenOptions::new().read(true), path) else {
        return false;
    };
    let mut head = [0u8; 24];
    let ours = f.metadata().is_ok_and(|m| crate::paths::owned_by_us(&m, path).is_ok());
    if !ours || f.read_exact_at(&mut head, 0).is_err() {
        return false;
    }
    let word = |i: usize| head[i..i + 8].try_into().map(u64::from_ne_bytes).unwrap_or(0);
    let half = |i: usize| head[i..i + 4].try_into().map(u32::from_ne_bytes).unwrap_or(0);
    if half(0) != MAGIC {
        return false;
    }
    match crate::mapview::liveness(monotonic_ms(), word(crate::mapview::BEAT_OFF), half(crate::mapview::PID_OFF)) {
        Liveness::Alive => true,
        Liveness::Late(pid) => std::fs::read(format!("/proc/{pid}/stat")).is_ok_and(|s| crate::mapview::runs(&s)),
        Liveness::Gone => false,
    }
}

/// `CLOCK_MONOTONIC` in milliseconds: the beat's clock, the same in every process.
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_map(name: &str) -> (std::path::PathBuf, PortMap) {
        let dir = std::env::temp_dir().join(format!("styxy-portmap-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ports.map");
        let w = PortMap::create(&path).unwrap();
        (dir, w)
    }

    #[test]
    fn a_blocks_link_says_used_while_a_port_of_it_is_held_or_asked_for() {
        use crate::blocklink;
        use crate::blocklinks::VACANT_AFTER_MS;
        use std::os::unix::ffi::OsStrExt;
        let (dir, w) = temp_map("links");
        let links = dir.join("blocks");
        let _ = std::fs::remove_dir_all(&links);
        let classes = crate::policymap::classes(&crate::policy::Policy::default());
        let w = w.with_block_links(BlockLinks::new(links.clone()));
        w.block_links().unwrap().set_classes(&classes).unwrap();
        let vacant = |port: u16| {
            let t = std::fs::read_link(links.join(blocklink::link_of(port).to_string())).unwrap();
            blocklink::vacant(t.as_os_str().as_bytes())
        };
        assert!(vacant(3000) && vacant(4100));
        // a session's remap of 3000 (one block) to 4100 (another): the actual port is held,
        // the one asked for mapped, both blocks used
        w.set_held(4100, 7);
        w.insert(7, 3000, 4100);
        assert!(!vacant(3000) && !vacant(4100));
        // withdrawn: vacant a while after, not at once
        w.remove(7, 3000);
        w.set_held(4100, 0);
        let links_of = w.block_links().unwrap();
        links_of.tidy(monotonic_ms());
        assert!(!vacant(3000) && !vacant(4100));
        links_of.tidy(monotonic_ms() + VACANT_AFTER_MS);
        assert!(vacant(3000) && vacant(4100));
        // links attached to a map with a word in use: its block is said used at once
        w.set_held(5173, 9);
        drop(w);
        let f = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("ports.map")).unwrap();
        let again = PortMap::map(&f, libc::PROT_READ | libc::PROT_WRITE).unwrap();
        assert_eq!(again.held(5173), 9);
        let again = again.with_block_links(BlockLinks::new(links.clone()));
        again.block_links().unwrap().set_classes(&classes).unwrap();
        assert!(!vacant(5173) && vacant(3000));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_ports_word_says_at_once_whether_it_is_held_or_mapped() {
        let dir = std::env::temp_dir().join(format!("styxy-portmap-word-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = PortMap::create(&dir.join("ports.map")).unwrap();
        let seen = |p: u16| w.view().seen(p);
        w.set_held(3007, 42);
        w.insert(42, 3000, 3007);
        w.insert(43, 3000, 3008);
        assert_eq!((seen(3000), seen(3007), seen(3009)), (MAPPED, 42, 0));
        assert_eq!(w.view().found(42, 3000), (Some(3007), 0));
        // the holder comes and goes under the mark, and the mark goes with the last entry
        w.set_held(3000, 9);
        assert_eq!((seen(3000), w.held(3000)), (MAPPED | 9, 9));
        w.remove(42, 3000);
        w.insert(43, 3000, 3010); // replaced, not another entry
        assert_eq!(seen(3000), MAPPED | 9);
        w.remove(43, 3000);
        w.remove(43, 3000); // gone already: no count below zero
        assert_eq!(seen(3000), 9);
        w.insert(42, 3000, 3007); // a tombstone made live again
        assert_eq!(seen(3000), MAPPED | 9);
        w.clear();
        assert_eq!(seen(3000), 0);
        assert!((0..100_000u32).all(|i| mapview::tag(i.to_string().as_bytes()) & MAPPED == 0), "a tag never carries the mark");
        drop(w);
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
        // a daemon of another version re-creates it in place: this reader finds nothing,
        // and a new reader refuses it
        w2.insert(7, 3000, 3001);
        w2.set_held(3001, 7);
        w2.magic().store(0x5350_4d31, Ordering::Release);
        assert_eq!((r.lookup(7, 3000), r.held(3001)), (None, 0));
        assert!(PortMap::open_readonly(&path).is_err());
        drop(w2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tombstones_are_reclaimed_and_a_rebuild_keeps_every_live_entry() {
        let (dir, w) = temp_map("rebuild");
        let r = PortMap::open_readonly(&dir.join("ports.map")).unwrap();
        let unmapped = |m: &PortMap| (0..2000u32).map(|k| m.lookup_probes(1_000_000 + k, 3000)).sum::<usize>();
        // 1000 live entries, then 200k distinct keys inserted and removed in between
        for t in 1..=1000u32 {
            w.insert(t, 8000, 8001);
        }
        let fresh = unmapped(&r);
        let g0 = w.generation().load(Ordering::Relaxed);
        for k in 0..200_000u32 {
            let (tag, port) = (5000 + k / 50, 3000 + (k % 50) as u16);
            w.insert(tag, port, port + 1);
            if k >= 100 {
                let k = k - 100; // up to 100 more live at a time
                w.remove(5000 + k / 50, 3000 + (k % 50) as u16);
            }
        }
        assert!(w.dead.load(Ordering::Relaxed) <= REBUILD_AT);
        assert_ne!(w.generation().load(Ordering::Relaxed), g0, "rebuilt at least once");
        for t in 1..=1000u32 {
            assert_eq!(r.lookup(t, 8000), Some(8001), "{t}");
        }
        assert!(unmapped(&r) <= 2 * fresh, "{} probes vs {fresh} in a fresh map", unmapped(&r));
        // an explicit rebuild leaves no tombstone and loses nothing
        w.rebuild();
        assert_eq!(w.dead.load(Ordering::Relaxed), 0);
        assert_eq!(w.live.load(Ordering::Relaxed), 1100);
        for t in 1..=1000u32 {
            assert_eq!(r.lookup(t, 8000), Some(8001), "{t}");
        }
        assert_eq!(r.lookup(5000 + 199_999 / 50, 3000 + 49), Some(3050));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_concurrent_reader_never_misses_a_live_entry() {
        let (dir, w) = temp_map("concurrent");
        let r = PortMap::open_readonly(&dir.join("ports.map")).unwrap();
        for t in 1..=500u32 {
            w.insert(t, 8000, 8001);
        }
        let stop = AtomicU32::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                for k in 0..300_000u32 {
                    let (tag, port) = (5000 + k % 700, 3000 + (k % 50) as u16);
                    w.insert(tag, port, port + 1);
                    w.remove(tag, port);
                    if k % 1000 == 0 {
                        w.rebuild();
                    }
                }
                stop.store(1, Ordering::Relaxed);
            });
            let mut rounds = 0;
            while stop.load(Ordering::Relaxed) == 0 || rounds == 0 {
                for t in 1..=500u32 {
                    assert_eq!(r.lookup(t, 8000), Some(8001), "live entry {t} missed");
                }
                rounds += 1;
            }
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
