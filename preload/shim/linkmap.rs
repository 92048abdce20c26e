//! Whether libc comes right after this library in the dynamic linker's list of loaded
//! objects: then libc's definition of every function is what `dlsym(RTLD_NEXT, name)`
//! answers in this library, and the shim need not look it up ([`crate::slot`]).
//!
//! Why: finding a function costs a fresh process ~0.7 µs (`dlsym`, or libc's hash tables
//! read by hand: pages of libc no other work of the process touched), half of what the
//! library adds to a port-0 bind with its two hooks.
//!
//! The answer is yes only when it is plain:
//! - one namespace, no audit module: the loader's `r_debug` says version 1 (glibc 2.35+
//!   says 2 once `LD_AUDIT` or `dlmopen` made a second one; an audit module's
//!   `la_symbind` sees, and may change, what `dlsym` answers), and `LD_AUDIT` is not set
//!   (glibc 2.34 says 1 even with one);
//! - this library is in the list (preloaded, not `dlopen`ed), found by its own dynamic
//!   section, and the entry right after it is libc: named `…/libc.so.6`, and where the
//!   loader found this library's import `__connect`.
//!
//! The list is in the order `RTLD_NEXT` searches the objects loaded with the program;
//! another preload library after this one, or a library of the program between the two,
//! is a "no", and the shim asks `dlsym`. Only the list's entries are read, up to libc and
//! no further (what `dlopen` adds comes after libc, and may be unloaded meanwhile):
//! nothing of any object's own memory. The answer is kept for the process's life (what
//! lies before libc never changes).

use core::ffi::{c_char, c_int};
use core::sync::atomic::{AtomicU8, Ordering};

use crate::cstring::cstr;
use crate::elf::{program_headers, u32_at, u64_at, PHDR, PT_DYNAMIC};
use crate::settings::env;
use crate::{NO, UNKNOWN, YES};

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
/// glibc's file name on every 64-bit machine the shim builds for.
const LIBC: &[u8] = b"/libc.so.6";
/// The most entries of the program's dynamic section, or of the list, read (real ones:
/// about 40 and 15).
const MAX_WALK: usize = 4096;

extern "C" {
    /// This library's own dynamic section (the linker defines the symbol).
    static _DYNAMIC: [u8; 0];
}

/// The answer for this process: UNKNOWN, then YES or NO.
static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether libc comes right after this library (module doc).
pub(crate) fn libc_next() -> bool {
    match STATE.load(Ordering::Relaxed) {
        YES => true,
        NO => false,
        _ => {
            let yes = find();
            STATE.store(if yes { YES } else { NO }, Ordering::Relaxed);
            yes
        }
    }
}

/// The walk: the loader's list from its head to this library's entry, and the next one.
fn find() -> bool {
    // SAFETY: the value is tested here and not kept.
    if unsafe { env(c"LD_AUDIT") }.is_some_and(|v| !v.is_empty()) {
        return false;
    }
    let ours = core::ptr::addr_of!(_DYNAMIC).cast::<Dyn>();
    let Some(list) = loaders_list() else {
        return false;
    };
    // SAFETY: the loader's list: the entries of objects loaded with the program stay as
    // they are for the process's life, and the walk ends at libc or this library, before
    // anything `dlopen` adds.
    unsafe {
        if (*list).version != 1 {
            return false;
        }
        let mut map = (*list).map;
        for _ in 0..MAX_WALK {
            if map.is_null() || is_libc(map) {
                return false; // libc before this library, or this library not in the list
            }
            if (*map).ld == ours {
                let next = (*map).next;
                return !next.is_null() && is_libc(next) && holds_connect(next);
            }
            map = (*map).next;
        }
    }
    false
}

/// Whether the code the loader found for this library's import `__connect` lies in the
/// object of entry `map`, between its start (its load bias, where its ELF header is) and
/// its dynamic section, in its data above its code: libc's own, not another object's
/// (one loaded before this library that defines it, or one called `libc.so.6` that is
/// not). The loader reserves an object's whole span, so no other object lies there.
///
/// # Safety
/// `map` is an entry of the loader's list.
unsafe fn holds_connect(map: *const LinkMap) -> bool {
    let f = crate::libc_calls::__connect as *const () as usize;
    // SAFETY: the entry (this function's contract).
    let (start, dynamic) = unsafe { ((*map).addr, (*map).ld as usize) };
    start <= f && f < dynamic
}

/// Whether the list's entry `map` is libc's.
///
/// # Safety
/// `map` is an entry of the loader's list.
unsafe fn is_libc(map: *const LinkMap) -> bool {
    // SAFETY: the entry's name, a C string the loader keeps (this function's contract).
    unsafe { cstr((*map).name) }.is_some_and(|n| n.ends_with(LIBC))
}

/// The loader's `r_debug`, from the program's `DT_DEBUG` entry (the loader fills it in).
fn loaders_list() -> Option<*const RDebug> {
    let (table, bias) = program_headers()?;
    let ph = table.chunks_exact(PHDR).find(|ph| u32_at(ph, 0) == Some(PT_DYNAMIC))?;
    let mut d = bias.wrapping_add(u64_at(ph, 16)?) as *const Dyn;
    for _ in 0..MAX_WALK {
        // SAFETY: the program's dynamic section, which PT_DYNAMIC locates in a loaded
        // segment, read up to its DT_NULL.
        let (tag, val) = unsafe { ((*d).tag, (*d).val) };
        match tag {
            DT_NULL => return None,
            DT_DEBUG => return Some(val as *const RDebug).filter(|r| !r.is_null()),
            // SAFETY: the next entry of the same section (this one was not its DT_NULL).
            _ => d = unsafe { d.add(1) },
        }
    }
    None
}
