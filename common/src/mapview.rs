//! Reading the shared port map (its layout and writer: `portmap.rs`). `no_std`: the
//! always-loaded shim includes this file too, so `connect()` follows a remap and refuses
//! another session's port without loading the hooks' logic — one reader for both.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const MAGIC: u32 = 0x5350_4d32; // "SPM2"
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

    /// The daemon beat within [`BEAT_STALE_MS`] of `now` (`CLOCK_MONOTONIC` ms): it is
    /// alive, however busy, and worth waiting for.
    pub fn alive(self, now: u64) -> bool {
        self.valid() && now.saturating_sub(self.beat().load(Ordering::Acquire)) <= BEAT_STALE_MS
    }

    pub fn valid(self) -> bool {
        self.magic().load(Ordering::Acquire) == MAGIC
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

    /// The tag of the session that holds `port`, 0 if none does.
    pub fn held(self, port: u16) -> u32 {
        if !self.valid() {
            return 0;
        }
        self.held_word(port).load(Ordering::Acquire)
    }

    /// Looks `requested` of session `tag` up in `table`: the entry's actual port (None
    /// when absent or deleted) and the number of slots read.
    pub fn probe(self, table: u32, tag: u32, requested: u16) -> (Option<u16>, usize) {
        let mut i = slot(tag, requested);
        for n in 1..=SLOTS {
            let w = self.remap_word(table, i).load(Ordering::Acquire);
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
    pub fn lookup(self, tag: u32, requested: u16) -> Option<u16> {
        let mut found = None;
        for _ in 0..RETRIES {
            if !self.valid() {
                return None;
            }
            let g = self.generation().load(Ordering::Acquire);
            found = self.probe(g, tag, requested).0;
            // the probe's loads are acquires: this load cannot move before them
            if self.generation().load(Ordering::Acquire) == g {
                return found;
            }
        }
        found
    }
}

/// The 32-bit tag of a session in the map (FNV-1a of its id as the client sends it —
/// other characters than `[A-Za-z0-9_-]` each become one `_`, at most 100 —, never 0:
/// 0 means "no session").
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
    if h == 0 {
        1
    } else {
        h
    }
}
