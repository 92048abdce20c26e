//! Reading the shared port map (its layout and writer: `portmap.rs`). `no_std`: the
//! always-loaded shim includes this file too, so `connect()` follows a remap and refuses
//! another session's port without loading the hooks' logic — one reader for both.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const MAGIC: u32 = 0x5350_4d33; // "SPM3"
/// The high bit of a `held` word: some session maps this port, as the one it asked for,
/// in the remap table. A word of 0 says at once that a connect to the port is nobody's
/// business (no holder, no remap): one read, no lookup. Tags never carry it ([`tag`]).
pub const MAPPED: u32 = 1 << 31;
pub const PORTS: usize = 65536;
/// Slots of each remap table: the daemon holds at most 4096 allocations, one entry each.
pub const SLOTS: usize = 32768;
pub const HEADER: usize = 64;
/// The daemon's liveness beat in the header: `CLOCK_MONOTONIC` milliseconds (one clock for
/// every process of the machine), stored every [`BEAT_EVERY_MS`] by the thread that answers
/// the hooks, so a daemon that is busy still beats and one that is stopped or hung does not.
pub const BEAT_OFF: usize = 8;
pub const BEAT_EVERY_MS: u64 = 100;
/// A beat older than this: the daemon is stopped or hung, and a hook goes as asked.
pub const BEAT_STALE_MS: u64 = 600;
/// However alive the daemon looks, a hook waits at most this long for its answer.
pub const PATIENCE_MS: u64 = 10_000;
/// The daemon's pid in the header (`u32`), for a look at its process when its beat is late.
pub const PID_OFF: usize = 16;
/// A beat later than [`BEAT_STALE_MS`] but within this: a daemon starved of CPU (its
/// process runs or waits to) is still alive; one that is stopped or gone is not.
pub const BEAT_GRACE_MS: u64 = 5_000;

/// What a hook makes of the daemon's beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// It beat within [`BEAT_STALE_MS`]: alive, however busy.
    Alive,
    /// Its beat is late: alive if its process (this pid) is neither stopped nor gone.
    Late(u32),
    /// No beat for [`BEAT_GRACE_MS`], or no daemon: stopped, hung or gone.
    Gone,
}

/// Whether `/proc/<pid>/stat`'s text names a process that runs or waits to: not stopped
/// (`T`, `t`), a zombie or dead.
pub fn runs(stat: &[u8]) -> bool {
    let Some(close) = stat.iter().rposition(|c| *c == b')') else { return false };
    let state = stat.get(close + 2).copied().unwrap_or(b'?');
    !matches!(state, b'T' | b't' | b'Z' | b'X' | b'x' | b'?')
}
pub const HELD_OFF: usize = HEADER;
pub const REMAP_OFF: usize = HELD_OFF + PORTS * 4;
pub const SIZE: usize = REMAP_OFF + 2 * SLOTS * 8;
/// Lookups that overlap this many rebuilds answer from their last look.
pub const RETRIES: usize = 4;
pub fn slot(tag: u32, requested: u16) -> usize {
    (tag ^ u32::from(requested).wrapping_mul(0x9e37_79b1)).wrapping_mul(0x85eb_ca6b) as usize >> 16 & (SLOTS - 1)
}

pub fn pack(tag: u32, requested: u16, actual: u16) -> u64 {
    u64::from(tag) << 32 | u64::from(requested) << 16 | u64::from(actual)
}

pub fn is(w: u64, tag: u32, requested: u16) -> bool {
    w != 0 && (w >> 32) as u32 == tag && (w >> 16) as u16 == requested
}

pub fn deleted(w: u64) -> bool {
    w != 0 && w as u16 == 0
}

pub fn next(i: usize) -> usize {
    (i + 1) & (SLOTS - 1)
}

pub fn prev(i: usize) -> usize {
    i.wrapping_sub(1) & (SLOTS - 1)
}

/// A mapping of the port map, read with whole-word atomic loads.
#[derive(Clone, Copy)]
pub struct View<'a> {
    base: *const u8,
    _map: PhantomData<&'a u8>,
}

impl<'a> View<'a> {
    /// # Safety
    /// `base` is a mapping of at least [`SIZE`] bytes, page-aligned, that outlives `'a`.
    pub unsafe fn new(base: *const u8) -> View<'a> {
        View { base, _map: PhantomData }
    }

    pub fn magic(self) -> &'a AtomicU32 {
        // SAFETY: in bounds and 4-aligned (the mapping is page-aligned, `new`'s contract).
        unsafe { &*(self.base.cast::<AtomicU32>()) }
    }

    pub fn generation(self) -> &'a AtomicU32 {
        // SAFETY: in bounds and 4-aligned.
        unsafe { &*(self.base.add(4).cast::<AtomicU32>()) }
    }

    /// The daemon's liveness beat ([`BEAT_OFF`]).
    pub fn beat(self) -> &'a AtomicU64 {
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned, `new`'s contract).
        unsafe { &*(self.base.add(BEAT_OFF).cast::<AtomicU64>()) }
    }

    /// The daemon's pid ([`PID_OFF`]), 0 when not written.
    pub fn daemon_pid(self) -> &'a AtomicU32 {
        // SAFETY: in bounds and 4-aligned.
        unsafe { &*(self.base.add(PID_OFF).cast::<AtomicU32>()) }
    }

    pub fn held_word(self, port: u16) -> &'a AtomicU32 {
        // SAFETY: port < PORTS: in bounds, 4-aligned.
        unsafe { &*(self.base.add(HELD_OFF + port as usize * 4).cast::<AtomicU32>()) }
    }

    pub fn remap_word(self, table: u32, i: usize) -> &'a AtomicU64 {
        let off = REMAP_OFF + (table as usize & 1) * SLOTS * 8 + (i & (SLOTS - 1)) * 8;
        // SAFETY: table < 2, i < SLOTS: in bounds, 8-aligned.
        unsafe { &*(self.base.add(off).cast::<AtomicU64>()) }
    }
}

impl Words for View<'_> {
    fn u32_at(&self, off: usize) -> u32 {
        if off + 4 > SIZE {
            return 0;
        }
        // SAFETY: in bounds (checked) of the mapping of SIZE bytes (`new`'s contract);
        // every offset the readers ask is 4-aligned, and the mapping page-aligned.
        unsafe { &*(self.base.add(off).cast::<AtomicU32>()) }.load(Ordering::Acquire)
    }

    fn u64_at(&self, off: usize) -> u64 {
        if off + 8 > SIZE {
            return 0;
        }
        // SAFETY: as `u32_at`; the offsets asked are 8-aligned.
        unsafe { &*(self.base.add(off).cast::<AtomicU64>()) }.load(Ordering::Acquire)
    }
}

/// The port map's words, wherever they are read from: a mapping ([`View`]), or the file
/// itself (the shim's first looks, which a page fault would cost more than a `pread`).
/// Every reading of the map is written once, here, over these two loads; a word that
/// cannot be read is 0 (no magic: no map).
pub trait Words {
    /// The `u32` at byte `off` (4-aligned), loaded whole with acquire ordering.
    fn u32_at(&self, off: usize) -> u32;
    /// The `u64` at byte `off` (8-aligned), loaded whole with acquire ordering.
    fn u64_at(&self, off: usize) -> u64;
    /// As [`Words::u32_at`], for a word whose 0 is a snapshot however it was read (one
    /// store at a time changes it, from or to 0 or by one bit): a reader that copies
    /// bytes may take a 0 at its first look.
    fn u32_or_zero_at(&self, off: usize) -> u32 {
        self.u32_at(off)
    }

    fn valid(&self) -> bool {
        self.u32_at(0) == MAGIC
    }

    /// The daemon beat within [`BEAT_STALE_MS`] of `now` (`CLOCK_MONOTONIC` ms): it is
    /// alive, however busy, and worth waiting for.
    fn alive(&self, now: u64) -> bool {
        self.liveness(now) == Liveness::Alive
    }

    /// What the beat says of the daemon at `now` (`CLOCK_MONOTONIC` ms).
    fn liveness(&self, now: u64) -> Liveness {
        if !self.valid() {
            return Liveness::Gone;
        }
        liveness(now, self.u64_at(BEAT_OFF), self.u32_at(PID_OFF))
    }

    /// The tag of the session that holds `port`, 0 if none does.
    fn held(&self, port: u16) -> u32 {
        self.seen(port) & !MAPPED
    }

    /// `port`'s `held` word whole: its holder's tag, and [`MAPPED`] when some session
    /// maps it (0: neither, or no map).
    fn seen(&self, port: u16) -> u32 {
        if !self.valid() {
            return 0;
        }
        self.u32_or_zero_at(HELD_OFF + port as usize * 4)
    }

    /// What a process of session `tag` finds for `port`: the actual port the session got
    /// for it (looked up only when some session maps it), and the tag of its holder.
    fn found(&self, tag: u32, port: u16) -> (Option<u16>, u32) {
        let seen = self.seen(port);
        let remapped = if seen & MAPPED != 0 { self.lookup(tag, port) } else { None };
        (remapped, seen & !MAPPED)
    }

    /// Looks `requested` of session `tag` up in `table`: the entry's actual port (None
    /// when absent or deleted) and the number of slots read.
    fn probe(&self, table: u32, tag: u32, requested: u16) -> (Option<u16>, usize) {
        let mut i = slot(tag, requested);
        for n in 1..=SLOTS {
            let w = self.u64_at(REMAP_OFF + (table as usize & 1) * SLOTS * 8 + i * 8);
            if w == 0 {
                return (None, n);
            }
            if is(w, tag, requested) {
                let actual = w as u16;
                return (if actual != 0 { Some(actual) } else { None }, n);
            }
            i = next(i);
        }
        (None, SLOTS)
    }

    /// The actual port session `tag` got for `requested`, if it holds one.
    fn lookup(&self, tag: u32, requested: u16) -> Option<u16> {
        let mut found = None;
        for _ in 0..RETRIES {
            if !self.valid() {
                return None;
            }
            let g = self.u32_at(4);
            found = self.probe(g, tag, requested).0;
            // the probe's loads are acquires: this load cannot move before them
            if self.u32_at(4) == g {
                return found;
            }
        }
        found
    }
}

/// What a beat at `beat` of the daemon `pid` says at `now`.
pub fn liveness(now: u64, beat: u64, pid: u32) -> Liveness {
    match now.saturating_sub(beat) {
        age if age <= BEAT_STALE_MS => Liveness::Alive,
        age if age <= BEAT_GRACE_MS && pid != 0 => Liveness::Late(pid),
        _ => Liveness::Gone,
    }
}

/// The 31-bit tag of a session in the map (FNV-1a of its id as the client sends it —
/// other characters than `[A-Za-z0-9_-]` each become one `_`, at most 100 —, without
/// [`MAPPED`]'s bit, never 0: 0 means "no session").
pub fn tag(session: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut chars = 0;
    for &b in session {
        if b & 0xc0 == 0x80 {
            continue; // the rest of a character already counted
        }
        if chars == 100 {
            break;
        }
        chars += 1;
        let c = if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' { b } else { b'_' };
        h ^= c as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    match h & !MAPPED {
        0 => 1,
        t => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_beat_is_judged_by_the_daemons_process() {
        assert_eq!(liveness(10_000, 9_500, 42), Liveness::Alive);
        assert_eq!(liveness(10_000, 9_000, 42), Liveness::Late(42));
        assert_eq!(liveness(10_000, 9_000, 0), Liveness::Gone, "no pid written: only the beat counts");
        assert_eq!(liveness(10_000, 4_000, 42), Liveness::Gone);
        assert_eq!(liveness(10_000, 0, 42), Liveness::Gone, "never beat");
    }

    #[test]
    fn a_stopped_dead_or_unreadable_process_does_not_run() {
        let stat = |state: &str| format!("42 (a (b) c) {state} 1 42 42 0 -1");
        for s in ["R", "S", "D", "I"] {
            assert!(runs(stat(s).as_bytes()), "{s}");
        }
        for s in ["T", "t", "Z", "X"] {
            assert!(!runs(stat(s).as_bytes()), "{s}");
        }
        assert!(!runs(b""));
        assert!(!runs(b"42 (cut"));
    }
}
