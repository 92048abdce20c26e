//! Whether the next definition of a C function after this library — what
//! `dlsym(RTLD_NEXT, name)` would answer — is libc's, told from the dynamic linker's list
//! of loaded objects without looking the name up in libc.
//!
//! Why: for `bind`, `listen` and `getsockname`, libc's function is the system call and
//! nothing else (no cancellation point, no state), so when libc is next the shim makes
//! the call itself ([`crate::sys`]). Looking the function up — `dlsym`, or libc's hash
//! tables read by hand — touches pages of libc no other work of a fresh process touched:
//! ~0.7 µs for each of a bind's two hooks, half of what the library adds to a port-0
//! bind.
//!
//! The answer is `true` only when it is plain:
//! - this library is in the list (preloaded, not `dlopen`ed), found by its own dynamic
//!   section;
//! - libc (`libc.so.6`) comes after it, and every object between the two says in its GNU
//!   hash table's bloom filter that it does not define `name` (another preload library
//!   after this one, or a library of the program that defines `name`, makes it `false`,
//!   and so does a bloom filter that only may say no).
//!
//! The list is in load order, and what `dlopen` adds comes after libc: every object
//! walked was loaded with the program. Anything not as expected — no `DT_DEBUG` in the
//! program, an object without a GNU hash table — is `false`, and the caller asks `dlsym`.

use core::ffi::{c_char, c_int, CStr};
use core::sync::atomic::{AtomicU8, Ordering};

use crate::cstring::cstr;
use crate::elf::{program_headers, u32_at, u64_at, PHDR, PT_DYNAMIC};
use crate::{NO, UNKNOWN, YES};

/// Whether libc comes right after this library in the list (then it is next for every
/// name, and the list is walked once a process).
static LIBC_RIGHT_AFTER: AtomicU8 = AtomicU8::new(UNKNOWN);

/// `struct link_map`'s public head (`<link.h>`).
#[repr(C)]
struct LinkMap {
    /// The load bias.
    addr: usize,
    /// The object's path, as the loader found it.
    name: *const c_char,
    /// The object's dynamic section.
    ld: *const Dyn,
    next: *const LinkMap,
}

/// `struct r_debug`'s head (`<link.h>`).
#[repr(C)]
struct RDebug {
    version: c_int,
    map: *const LinkMap,
}

/// `Elf64_Dyn`.
#[repr(C)]
struct Dyn {
    tag: i64,
    val: u64,
}

const DT_NULL: i64 = 0;
const DT_DEBUG: i64 = 21;
const DT_GNU_HASH: i64 = 0x6fff_fef5;
/// glibc's file name on every 64-bit machine the shim builds for.
const LIBC: &[u8] = b"/libc.so.6";
/// The most entries of a dynamic section, or objects of the list, read (real ones:
/// about 40 and 15).
const MAX_WALK: usize = 4096;

extern "C" {
    /// This library's own dynamic section (the linker defines the symbol).
    static _DYNAMIC: [u8; 0];
}

/// Whether libc's `name` is what `dlsym(RTLD_NEXT, name)` answers in this library
/// (module doc); `false` when unsure.
pub(crate) fn next_is_libc(name: &CStr) -> bool {
    match LIBC_RIGHT_AFTER.load(Ordering::Relaxed) {
        YES => true,
        NO => walk(name),
        _ => {
            let right_after = walk(c"");
            LIBC_RIGHT_AFTER.store(if right_after { YES } else { NO }, Ordering::Relaxed);
            right_after || walk(name)
        }
    }
}

/// The walk down the list for `name`: libc is reached and nothing between defines it
/// (an empty `name`: nothing lies between).
fn walk(name: &CStr) -> bool {
    let ours = core::ptr::addr_of!(_DYNAMIC).cast::<Dyn>();
    let hash = gnu_hash(name.to_bytes());
    let Some(list) = loaders_list() else {
        return false;
    };
    // SAFETY: the loader's list, whose objects loaded with the program stay mapped and
    // unchanged for the process's life; the walk stops at libc, before what `dlopen` adds.
    unsafe {
        let mut map = (*list).map;
        let mut after_ours = false;
        for _ in 0..MAX_WALK {
            if map.is_null() {
                return false;
            }
            if after_ours && cstr((*map).name).is_some_and(|n| n.ends_with(LIBC)) {
                return true;
            }
            if after_ours && (name.is_empty() || !surely_lacks((*map).addr, (*map).ld, hash)) {
                return false;
            }
            after_ours |= (*map).ld == ours;
            map = (*map).next;
        }
    }
    false
}

/// The GNU hash of a symbol's name (the ELF GNU hash section's function).
fn gnu_hash(name: &[u8]) -> u32 {
    name.iter().fold(5381u32, |h, c| h.wrapping_mul(33).wrapping_add(u32::from(*c)))
}

/// The loader's `r_debug`, from the program's `DT_DEBUG` entry (the loader fills it in).
fn loaders_list() -> Option<*const RDebug> {
    let (table, bias) = program_headers()?;
    let ph = table.chunks_exact(PHDR).find(|ph| u32_at(ph, 0) == Some(PT_DYNAMIC))?;
    // SAFETY: the program's dynamic section, which PT_DYNAMIC locates in a loaded segment.
    let r = unsafe { entry(bias.wrapping_add(u64_at(ph, 16)?) as *const Dyn, DT_DEBUG) }? as *const RDebug;
    // SAFETY: the loader's `r_debug`, once it has set the version.
    (!r.is_null() && unsafe { (*r).version } >= 1).then_some(r)
}

/// The value of the dynamic section's first `tag` entry.
///
/// # Safety
/// `d` is null or a loaded object's dynamic section, which ends with `DT_NULL`.
unsafe fn entry(mut d: *const Dyn, tag: i64) -> Option<u64> {
    for _ in 0..MAX_WALK {
        if d.is_null() {
            return None;
        }
        // SAFETY: an entry of the section (this function's contract), not past its DT_NULL.
        let (t, val) = unsafe { ((*d).tag, (*d).val) };
        match t {
            DT_NULL => return None,
            t if t == tag => return Some(val),
            // SAFETY: the next entry of the same section (this one was not its DT_NULL).
            _ => d = unsafe { d.add(1) },
        }
    }
    None
}

/// Whether the object loaded at `bias`, with dynamic section `ld`, surely defines no
/// symbol whose GNU hash is `hash`: its bloom filter says so (the loader's first test).
///
/// # Safety
/// `ld` is null or the dynamic section of an object that stays loaded.
unsafe fn surely_lacks(bias: usize, ld: *const Dyn, hash: u32) -> bool {
    // SAFETY: the object's dynamic section (this function's contract).
    let Some(at) = (unsafe { entry(ld, DT_GNU_HASH) }) else {
        return false;
    };
    // glibc relocates the address in place on most machines; musl, and glibc where the
    // section is read-only, leave it relative to the bias
    let h = if (at as usize) < bias { bias.wrapping_add(at as usize) } else { at as usize } as *const u32;
    // SAFETY: the object's GNU hash table: its header, then its bloom words, the index
    // masked by their number (a power of two, checked).
    unsafe {
        let (words, shift) = (*h.add(2), *h.add(3));
        if !words.is_power_of_two() {
            return false;
        }
        let word = *h.add(4).cast::<u64>().add(((hash / 64) & (words - 1)) as usize);
        let mask = (1u64 << (hash % 64)) | (1u64 << (hash.checked_shr(shift).unwrap_or(0) % 64));
        word & mask != mask
    }
}
