//! C strings without allocation: read as slices, written NUL-terminated into fixed
//! buffers.

use core::ffi::{c_char, CStr};

/// The bytes of the C string at `s` (without its NUL), `None` for null.
///
/// # Safety
/// `s` is null or a NUL-terminated string that stays as it is for `'a`.
pub(crate) unsafe fn cstr<'a>(s: *const c_char) -> Option<&'a [u8]> {
    // SAFETY: a NUL-terminated string that stays as it is (this function's contract).
    (!s.is_null()).then(|| unsafe { CStr::from_ptr(s) }.to_bytes())
}

/// Copies `s` into `buf` at `at`, NUL-terminated; returns the new length, 0 if it does not fit.
pub(crate) fn put(buf: &mut [u8], at: usize, s: &[u8]) -> usize {
    for (i, c) in s.iter().chain(&[0]).enumerate() {
        match buf.get_mut(at + i) {
            Some(slot) => *slot = *c,
            None => return 0,
        }
    }
    at + s.len()
}

/// Copies `tail` into `buf` at `at` (its NUL too, when it ends with one); returns the
/// index of its last byte, 0 if it does not fit.
pub(crate) fn append(buf: &mut [u8], at: usize, tail: &[u8]) -> usize {
    for (i, c) in tail.iter().enumerate() {
        match buf.get_mut(at + i) {
            Some(slot) => *slot = *c,
            None => return 0,
        }
    }
    at + tail.len() - 1
}

/// Writes `v` in decimal at `at`, NUL-terminated; the new length, 0 when it does not fit.
pub(crate) fn decimal(buf: &mut [u8], at: usize, v: u32) -> usize {
    decimal64(buf, at, u64::from(v))
}

/// [`decimal`] of a `u64`.
pub(crate) fn decimal64(buf: &mut [u8], at: usize, mut v: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        if let Some(d) = digits.get_mut(i) {
            *d = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    let mut n = at;
    for d in digits.get(i..).unwrap_or(&[]) {
        match buf.get_mut(n) {
            Some(slot) => *slot = *d,
            None => return 0,
        }
        n += 1;
    }
    match buf.get_mut(n) {
        Some(slot) => *slot = 0,
        None => return 0,
    }
    n
}
