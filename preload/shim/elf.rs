//! ELF's fields as the shim reads them: little-endian values at offsets of a header
//! (a file's first bytes, or the program's headers in memory), the program header types,
//! and where the kernel put this process's program headers.

use crate::libc_calls::{getauxval, AT_PHDR, AT_PHNUM};

pub(crate) fn u16_at(b: &[u8], o: usize) -> Option<usize> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?) as usize)
}

pub(crate) fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

pub(crate) fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

pub(crate) const PT_LOAD: u32 = 1;
pub(crate) const PT_DYNAMIC: u32 = 2;
pub(crate) const PT_INTERP: u32 = 3;
pub(crate) const PT_NOTE: u32 = 4;
pub(crate) const PT_PHDR: u32 = 6;
/// A 64-bit program header's size.
pub(crate) const PHDR: usize = 56;
/// At most this many program headers are read (real programs have about 15).
pub(crate) const MAX_PHDRS: usize = 64;

/// This process's program headers as the kernel mapped them (from the auxiliary vector),
/// and the program's load bias: where `PT_PHDR` says the table is, against where it is.
/// `None` without a `PT_PHDR`.
pub(crate) fn program_headers() -> Option<(&'static [u8], u64)> {
    // SAFETY: getauxval reads the auxiliary vector.
    let (phdr, phnum) = unsafe { (getauxval(AT_PHDR), getauxval(AT_PHNUM)) };
    if phdr == 0 || phnum == 0 || phnum > MAX_PHDRS as u64 {
        return None;
    }
    // SAFETY: the kernel maps the program headers at AT_PHDR, AT_PHNUM entries of PHDR
    // bytes, for the process's life.
    let table = unsafe { core::slice::from_raw_parts(phdr as *const u8, phnum as usize * PHDR) };
    let vaddr = table.chunks_exact(PHDR).find(|ph| u32_at(ph, 0) == Some(PT_PHDR)).and_then(|ph| u64_at(ph, 16))?;
    Some((table, phdr.wrapping_sub(vaddr)))
}
