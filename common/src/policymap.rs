//! The policy map: the daemon's intercept policy as one byte per port, in a file beside
//! its socket that the always-loaded shim maps read-only. With it the shim answers binds
//! of ports nobody coordinates (and their `listen()`) without loading the hooks' logic:
//! a fresh process pays two memory reads, not a library load (docs/ARCHITECTURE.md
//! "The cold path").
//!
//! Layout: `MAGIC` (4 bytes, native endianness), 60 bytes reserved, then `class[65536]`.
//! Written whole and renamed into place: a process keeps the map it first saw.

use std::path::Path;

use crate::decide::Class;
use crate::policy::Policy;

pub const MAGIC: u32 = 0x5350_5031; // "SPP1"
pub const HEADER: usize = 64;
pub const SIZE: usize = HEADER + 65536;

/// A port's class, as the shim reads it ([`Class::byte`]).
pub const UNTOUCHED: u8 = Class::Untouched.byte();
pub const COORDINATED: u8 = Class::Coordinated.byte();
pub const ON_CONFLICT: u8 = Class::OnConflict.byte();
pub const SINGLE: u8 = Class::Single.byte();

/// The class of `port` under `policy`, as the map stores it.
pub fn class(policy: &Policy, port: u16) -> u8 {
    Class::of(&policy.decide(port)).byte()
}

/// A class per port under `policy` ([`class`]).
pub fn classes(policy: &Policy) -> Vec<u8> {
    (0..=u16::MAX).map(|port| class(policy, port)).collect()
}

/// Publishes `classes` (a class per port, [`classes`]) at `path` (mode 0600,
/// atomically). Rules a process sets for itself (`STYXY_PRELOAD_PORTS`) are not the
/// daemon's to publish: the shim leaves such a process to the hooks' logic.
pub fn write(path: &Path, classes: &[u8]) -> std::io::Result<()> {
    let mut data = vec![0u8; SIZE];
    data[..4].copy_from_slice(&MAGIC.to_ne_bytes());
    for (at, c) in data[HEADER..].iter_mut().zip(classes) {
        *at = *c;
    }
    crate::paths::write_atomic(path, &data, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_policy() {
        let p = Policy::default();
        assert_eq!(class(&p, 80), UNTOUCHED);
        assert_eq!(class(&p, 3000), COORDINATED);
        assert_eq!(class(&p, 12001), ON_CONFLICT);
        assert_eq!(class(&p, 11430), SINGLE);
        assert_eq!(class(&p, 40000), UNTOUCHED);
    }
}
