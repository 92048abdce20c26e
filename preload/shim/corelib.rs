//! The hooks' logic, `libstyxy_preload_core.so`: loaded on a first call the shim cannot
//! answer (never at load time), its functions kept in typed slots; the one stderr line
//! when it cannot be loaded.

use core::ffi::c_void;
use core::sync::atomic::{AtomicU8, Ordering};

use crate::cstring::{append, cstr, put};
use crate::libc_calls::{dladdr, dlerror, dlopen, errno, set_errno, DlInfo, RTLD_NODELETE, RTLD_NOW};
use crate::settings::env;
use crate::slot::Slot;
use crate::tell::notice;
use crate::{CoreAddrFn, CoreListenFn, NO, UNKNOWN, YES};

/// A core that fails to load (EMFILE at the fd limit…) is tried again on later calls,
/// this many times in all.
const CORE_TRIES: u8 = 8;
const CORE_NAME: &[u8] = b"libstyxy_preload_core.so\0";

// SAFETY: the core's exports (preload/src/lib.rs) have these types: AddrFn's arguments
// and libc's function.
pub(crate) static CORE_BIND: Slot<CoreAddrFn> = unsafe { Slot::new(c"styxy_core_bind") };
// SAFETY: as CORE_BIND.
pub(crate) static CORE_LISTEN: Slot<CoreListenFn> = unsafe { Slot::new(c"styxy_core_listen") };
// SAFETY: as CORE_BIND.
pub(crate) static CORE_CONNECT: Slot<CoreAddrFn> = unsafe { Slot::new(c"styxy_core_connect") };
// SAFETY: as CORE_BIND.
pub(crate) static CORE_UNANSWERED: Slot<CoreAddrFn> = unsafe { Slot::new(c"styxy_core_unanswered") };

static CORE: AtomicU8 = AtomicU8::new(UNKNOWN);
static CORE_FAILURES: AtomicU8 = AtomicU8::new(0);

/// Loads the core next to this library (or at `STYXY_PRELOAD_CORE`) once. Never
/// unloaded. A failure is tried again on later calls (it may be transient: EMFILE at the
/// fd limit), [`CORE_TRIES`] times in all; after the last, the hooks stay plain
/// pass-through for the process's life, and say so once on stderr.
fn core_loaded() -> bool {
    match CORE.load(Ordering::Acquire) {
        YES => return true,
        NO => return false,
        _ => {}
    }
    let saved = errno();
    let ok = load_core();
    if ok {
        CORE.store(YES, Ordering::Release);
    } else if CORE_FAILURES.fetch_add(1, Ordering::AcqRel) + 1 >= CORE_TRIES && CORE.swap(NO, Ordering::AcqRel) != NO {
        // SAFETY: `dlerror` answers null or this thread's last message, read here at once.
        let why = unsafe { cstr(dlerror()) };
        notice(&[b"cannot load libstyxy_preload_core.so (", why.unwrap_or(b"?"), b"): this process's ports are not coordinated"]);
    }
    set_errno(saved);
    ok
}

/// The core is loaded already (a call of this process went its way): it decides the rest.
pub(crate) fn core_present() -> bool {
    CORE.load(Ordering::Acquire) == YES
}

/// The core's function in `slot`, loading the core first if need be; `None` when it
/// cannot be loaded.
pub(crate) fn core_fn<F: Copy>(slot: &Slot<F>) -> Option<F> {
    if core_loaded() {
        slot.get()
    } else {
        None
    }
}

fn load_core() -> bool {
    let mut path = [0u8; 4096];
    // SAFETY: copied into `path` here.
    let len = if let Some(over) = unsafe { env(c"STYXY_PRELOAD_CORE") }.filter(|v| !v.is_empty()) {
        put(&mut path, 0, over)
    } else {
        let mut info =
            DlInfo { fname: core::ptr::null(), fbase: core::ptr::null_mut(), sname: core::ptr::null(), saddr: core::ptr::null_mut() };
        // SAFETY: `bind` is code of this library; dladdr fills `info`, whose `fname` is
        // then null or the NUL-terminated path of this library, loaded while we run.
        let file = unsafe {
            if dladdr(crate::bind as *const c_void, &mut info) == 0 {
                None
            } else {
                cstr(info.fname)
            }
        };
        let Some(file) = file else {
            return false;
        };
        let n = put(&mut path, 0, file);
        // cut after the last '/', then append the core's name
        let mut dir = 0;
        let mut i = 0;
        while i < n {
            if path.get(i) == Some(&b'/') {
                dir = i + 1;
            }
            i += 1;
        }
        append(&mut path, dir, CORE_NAME)
    };
    if len == 0 {
        return false;
    }
    // SAFETY: `path` is NUL-terminated (`len` > 0: it fit); the core is our own library,
    // which does nothing at load time.
    let h = unsafe { dlopen(path.as_ptr().cast(), RTLD_NOW | RTLD_NODELETE) };
    if h.is_null() {
        return false;
    }
    // all four, or the core is not loaded (a slot found meanwhile is never called)
    // SAFETY: `h` is dlopen's handle, never closed (RTLD_NODELETE, and no dlclose).
    unsafe {
        CORE_BIND.resolve(h).is_some()
            && CORE_LISTEN.resolve(h).is_some()
            && CORE_CONNECT.resolve(h).is_some()
            && CORE_UNANSWERED.resolve(h).is_some()
    }
}
