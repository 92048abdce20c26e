//! A function of another library (libc's `bind`, the core's `styxy_core_bind`…), looked up
//! by name once and kept as its typed pointer: the one place where what `dlsym` answers
//! becomes a function the shim calls.

use core::ffi::{c_void, CStr};
use core::marker::PhantomData;
use core::sync::atomic::{AtomicPtr, Ordering};

use crate::libc_calls::{dlsym, RTLD_NEXT};

/// The C function `name` in another library, as an `F`; kept for the process's life once
/// found (racing threads store the same pointer).
pub struct Slot<F> {
    name: &'static CStr,
    /// Null, or what `dlsym` answered for `name`: only [`Slot::resolve`] stores here.
    ptr: AtomicPtr<c_void>,
    f: PhantomData<F>,
}

impl<F: Copy> Slot<F> {
    /// A slot for the C function `name`, not looked up yet.
    ///
    /// # Safety
    /// `F` is the function pointer type (`unsafe extern "C" fn(..) -> ..`) of the C function
    /// `name` as every library that may define it declares it: whatever `dlsym` finds for
    /// `name` is called as an `F`.
    pub const unsafe fn new(name: &'static CStr) -> Slot<F> {
        const { assert!(core::mem::size_of::<F>() == core::mem::size_of::<*mut c_void>()) };
        Slot { name, ptr: AtomicPtr::new(core::ptr::null_mut()), f: PhantomData }
    }

    /// The function, once found.
    pub fn get(&self) -> Option<F> {
        // SAFETY: only `resolve` stores in `ptr`, what `dlsym` answered for `name`.
        unsafe { Self::typed(self.ptr.load(Ordering::Acquire)) }
    }

    /// The next definition of `name` after this library's (libc's), looked up once.
    pub fn next(&self) -> Option<F> {
        // SAFETY: `RTLD_NEXT` is a pseudo-handle `dlsym` always accepts.
        self.get().or_else(|| unsafe { self.resolve(RTLD_NEXT) })
    }

    /// Looks `name` up in `handle` and keeps the answer (null when not found).
    ///
    /// # Safety
    /// `handle` is `RTLD_NEXT` or a handle `dlopen` returned and nobody closed.
    pub unsafe fn resolve(&self, handle: *mut c_void) -> Option<F> {
        // SAFETY: `name` is NUL-terminated; `handle` is valid (this function's contract).
        let p = unsafe { dlsym(handle, self.name.as_ptr()) };
        self.ptr.store(p, Ordering::Release);
        // SAFETY: `dlsym`'s answer for `name`.
        unsafe { Self::typed(p) }
    }

    /// `p` as the function it points to, `None` for null: the only transmute of the shim.
    ///
    /// # Safety
    /// `p` is null or what `dlsym` answered for `name`.
    unsafe fn typed(p: *mut c_void) -> Option<F> {
        if p.is_null() {
            return None;
        }
        // SAFETY: `p` is the address of the C function `name` (this function's contract),
        // whose type is `F` (the contract of `new`); `F` is a function pointer, as wide as
        // `p` (asserted in `new`).
        Some(unsafe { core::mem::transmute_copy::<*mut c_void, F>(&p) })
    }
}
