//! A function of libc (`bind`, `execve`…), found once and kept as its typed pointer: the
//! one place where what `dlsym` answers becomes a function the shim calls. A slot may
//! name what it takes instead when libc comes next ([`crate::linkmap`]): the system call
//! libc's function is, made by the shim, or libc's function under another name the
//! library imports ([`Direct`]); then nothing is looked up.

use core::ffi::{c_void, CStr};
use core::marker::PhantomData;
use core::sync::atomic::{AtomicPtr, Ordering};

use crate::libc_calls::{dlsym, RTLD_NEXT};

/// What a slot takes, without a lookup, when libc comes next.
#[derive(Clone, Copy)]
pub enum Direct<F> {
    /// The system call libc's function is (nothing else: no cancellation point).
    Kernel(F),
    /// libc's function under another name, which the library imports (libc is next only
    /// where the loader found it: [`crate::linkmap`]).
    Import(F),
}

/// The C function `name` in another library, as an `F`; kept for the process's life once
/// found (racing threads store the same pointer).
pub struct Slot<F> {
    name: &'static CStr,
    /// Null, or what `dlsym` answers for `name` (or `direct`, which does the same): only
    /// [`Slot::next`] and [`Slot::resolve`] store here.
    ptr: AtomicPtr<c_void>,
    /// What to take when libc is next.
    direct: Option<Direct<F>>,
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
        Slot { name, ptr: AtomicPtr::new(core::ptr::null_mut()), direct: None, f: PhantomData }
    }

    /// A slot for the C function `name`, which takes `direct` when libc is next.
    ///
    /// # Safety
    /// As [`Slot::new`]; and `direct` does what libc's `name` does: its system call and
    /// nothing else, or libc's `name` itself under another name.
    pub const unsafe fn direct(name: &'static CStr, direct: Direct<F>) -> Slot<F> {
        // SAFETY: the caller's contract.
        Slot { direct: Some(direct), ..unsafe { Slot::new(name) } }
    }

    /// The function, once found.
    pub fn get(&self) -> Option<F> {
        // SAFETY: only `next` and `resolve` store in `ptr`: what `dlsym` answers for `name`,
        // or `direct`, a function of type `F`.
        unsafe { Self::typed(self.ptr.load(Ordering::Acquire)) }
    }

    /// The next definition of `name` after this library's (libc's), found once: `direct`
    /// when libc is next, else `dlsym`'s answer.
    pub fn next(&self) -> Option<F> {
        self.get().or_else(|| match self.without_lookup() {
            Some(f) => {
                self.ptr.store(Self::untyped(f), Ordering::Release);
                Some(f)
            }
            // SAFETY: `RTLD_NEXT` is a pseudo-handle `dlsym` always accepts.
            None => unsafe { self.resolve(RTLD_NEXT) },
        })
    }

    /// `direct`, when libc comes next.
    fn without_lookup(&self) -> Option<F> {
        match self.direct? {
            Direct::Kernel(f) | Direct::Import(f) => crate::linkmap::libc_next().then_some(f),
        }
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

    /// `f`'s address.
    fn untyped(f: F) -> *mut c_void {
        // SAFETY: `F` is a function pointer, as wide as a data pointer (asserted in `new`).
        unsafe { core::mem::transmute_copy::<F, *mut c_void>(&f) }
    }

    /// `p` as the function it points to, `None` for null: with [`Slot::untyped`], the only
    /// transmutes of the shim.
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
