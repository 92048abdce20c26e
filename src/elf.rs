//! Tells whether a program will ignore `LD_PRELOAD`: statically linked (no
//! `PT_INTERP`) or built by Go (its `net` package makes raw syscalls). Reads the ELF
//! headers only (64-bit little-endian, the platforms we build for).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    Dynamic,
    Static,
    Go,
    /// A script, or not something we can read.
    Other,
}

/// Resolves `cmd` like the shell (PATH search when it has no `/`).
pub fn resolve(cmd: &str) -> Option<PathBuf> {
    if cmd.contains('/') {
        return Some(PathBuf::from(cmd));
    }
    std::env::var_os("PATH").and_then(|path| std::env::split_paths(&path).map(|d| d.join(cmd)).find(|p| p.is_file()))
}

fn u16_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?)))
}

fn u32_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?)))
}

fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

fn read_at(f: &mut std::fs::File, off: u64, len: u64) -> Option<Vec<u8>> {
    if len > 16 << 20 {
        return None;
    }
    f.seek(SeekFrom::Start(off)).ok()?;
    let mut buf = vec![0; len as usize];
    f.read_exact(&mut buf).ok()?;
    Some(buf)
}

pub fn kind(path: &Path) -> Kind {
    inspect(path).unwrap_or(Kind::Other)
}

fn inspect(path: &Path) -> Option<Kind> {
    let mut f = std::fs::File::open(path).ok()?;
    let h = read_at(&mut f, 0, 64)?;
    if h.get(..4) != Some(b"\x7fELF") || h.get(4) != Some(&2) || h.get(5) != Some(&1) {
        return Some(Kind::Other);
    }
    let (phoff, phentsize, phnum) = (u64_at(&h, 32)?, u16_at(&h, 54)?, u16_at(&h, 56)?);
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(&h, 40)?, u16_at(&h, 58)?, u16_at(&h, 60)?, u16_at(&h, 62)?);
    let ph = read_at(&mut f, phoff, phentsize * phnum)?;
    const PT_INTERP: u64 = 3;
    let dynamic = (0..phnum).any(|i| u32_at(&ph, (i * phentsize) as usize) == Some(PT_INTERP));
    // Go: a section named .go.buildinfo or .note.go.buildid
    if shnum > 0 && shstrndx < shnum {
        let sh = read_at(&mut f, shoff, shentsize * shnum)?;
        let strtab = (shstrndx * shentsize) as usize;
        let names = read_at(&mut f, u64_at(&sh, strtab + 24)?, u64_at(&sh, strtab + 32)?)?;
        for i in 0..shnum as usize {
            let name_off = u32_at(&sh, i * shentsize as usize)? as usize;
            let name = names.get(name_off..)?.split(|b| *b == 0).next()?;
            if name == b".go.buildinfo" || name == b".note.go.buildid" {
                return Some(Kind::Go);
            }
        }
    }
    Some(if dynamic { Kind::Dynamic } else { Kind::Static })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(kind(&resolve("sh").unwrap()), Kind::Dynamic);
        assert_eq!(kind(Path::new("/nonexistent")), Kind::Other);
        assert_eq!(kind(Path::new("/etc/passwd")), Kind::Other);
    }
}
