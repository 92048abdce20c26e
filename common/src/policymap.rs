//! The policy map: the daemon's intercept policy as one byte per port, in a file beside
//! its socket that the always-loaded shim maps read-only. With it the shim answers binds
//! of ports nobody coordinates (and their `listen()`) without loading the hooks' logic:
//! a fresh process pays two memory reads, not a library load (docs/ARCHITECTURE.md
//! "The cold path").
//!
//! Layout: `MAGIC` (4 bytes, native endianness), 60 bytes reserved, then `class[65536]`.
//! Written whole and renamed into place: a process keeps the map it first saw.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::decide::Class;
use crate::policy::Policy;
use crate::policylink;

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

/// Publishes `policy` at `path` (mode 0600, atomically), and as links in `links`, a
/// directory (0700) of [`policylink`] links, each replaced atomically when it changes.
/// Rules a process sets for itself (`STYXY_PRELOAD_PORTS`) are not the daemon's to
/// publish: the shim leaves such a process to the hooks' logic.
pub fn write(path: &Path, links: &Path, policy: &Policy) -> std::io::Result<()> {
    let mut data = vec![0u8; SIZE];
    data[..4].copy_from_slice(&MAGIC.to_ne_bytes());
    for port in 0..=u16::MAX {
        data[HEADER + usize::from(port)] = class(policy, port);
    }
    crate::paths::write_atomic(path, &data, 0o600)?;
    write_links(links, &data[HEADER..])
}

/// The links for `classes` (a class per port) in `dir`: each one made, or written beside
/// as `.<n>.tmp` and renamed over the old one, unless it says so already.
fn write_links(dir: &Path, classes: &[u8]) -> std::io::Result<()> {
    crate::paths::ensure_private_dir(dir)?;
    for (n, block) in classes.chunks(usize::from(policylink::PORTS_PER_LINK)).enumerate() {
        let Ok(block) = <&[u8; policylink::PORTS_PER_LINK as usize]>::try_from(block) else { continue };
        let target = OsStr::from_bytes(&policylink::encode(block)).to_owned();
        let link = dir.join(n.to_string());
        match std::fs::read_link(&link) {
            Ok(t) if t.as_os_str() == target => continue,
            // a new link appears whole: made in place
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::os::unix::fs::symlink(&target, &link).is_ok() => continue,
            _ => {}
        }
        let tmp = dir.join(format!(".{n}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)?;
        std::fs::rename(&tmp, &link)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn classes_follow_the_policy() {
        let p = Policy::default();
        assert_eq!(class(&p, 80), UNTOUCHED);
        assert_eq!(class(&p, 3000), COORDINATED);
        assert_eq!(class(&p, 12001), ON_CONFLICT);
        assert_eq!(class(&p, 11430), SINGLE);
        assert_eq!(class(&p, 40000), UNTOUCHED);
    }

    #[test]
    fn the_links_say_the_maps_class_for_every_port_and_change_with_it() {
        let dir = std::env::temp_dir().join(format!("styxy-policylinks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (map, links) = (dir.join("policy.map"), dir.join("policy"));
        let mut policy = Policy::default();
        write(&map, &links, &policy).unwrap();
        let check = |policy: &Policy| {
            let data = std::fs::read(&map).unwrap();
            for port in 0..=u16::MAX {
                let target = std::fs::read_link(links.join(policylink::link_of(port).to_string())).unwrap();
                let from_link = policylink::class(target.as_os_str().as_bytes(), port);
                assert_eq!(from_link, Some(data[HEADER + usize::from(port)]), "port {port}");
                assert_eq!(from_link, Some(class(policy, port)), "port {port}");
            }
        };
        check(&policy);
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&links).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(std::fs::read_dir(&links).unwrap().count(), usize::from(policylink::LINKS), "no temporary link is left");
        // a link that says so already is not written again; a changed one is replaced
        let untouched = links.join(policylink::link_of(40000).to_string());
        let before = std::fs::symlink_metadata(&untouched).unwrap().ino();
        policy.add_rules("3000=off").unwrap();
        write(&map, &links, &policy).unwrap();
        assert_eq!(std::fs::symlink_metadata(&untouched).unwrap().ino(), before);
        assert_eq!(class(&policy, 3000), UNTOUCHED);
        check(&policy);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
