//! The daemon's side of the block links ([`blocklink`]): one symbolic link per block of
//! ports in `blocks/` beside the port map, saying its ports' classes and whether any of
//! them is used (its word in the port map is not 0). [`BlockLinks`] is owned by the
//! writer's [`crate::portmap::PortMap`], which tells it of every word that becomes used or
//! unused.
//!
//! A link says "used" before the first word of its block becomes used — a fresh process
//! that reads "vacant" finds nothing in the map either — and "vacant" again only once
//! the block has been unused for [`VACANT_AFTER_MS`] ([`BlockLinks::tidy`]): a grant and
//! a withdrawal in a loop rewrite no link. A link is replaced atomically (made beside and
//! renamed over it), and written only when what it says changes; one that cannot be
//! written is removed, and a process that finds none reads the maps' files.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::blocklink::{self, LINKS, PORTS_PER_LINK};

/// How long a block stays said to be used after its last port became unused.
pub const VACANT_AFTER_MS: u64 = 1000;

pub struct BlockLinks {
    dir: PathBuf,
    blocks: Mutex<Blocks>,
}

struct Blocks {
    /// A class per port, once the policy is published (no link is written before).
    classes: Option<Vec<u8>>,
    /// Per block: its used ports, what its link says, and since when it has none.
    used: Vec<u16>,
    said_used: Vec<bool>,
    unused_since_ms: Vec<u64>,
}

impl BlockLinks {
    /// The links in `dir`; nothing is written before [`BlockLinks::set_classes`].
    pub fn new(dir: PathBuf) -> BlockLinks {
        let n = usize::from(LINKS);
        let blocks = Blocks { classes: None, used: vec![0; n], said_used: vec![false; n], unused_since_ms: vec![0; n] };
        BlockLinks { dir, blocks: Mutex::new(blocks) }
    }

    fn blocks(&self) -> std::sync::MutexGuard<'_, Blocks> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `classes` (a class per port): every link that says otherwise is written
    /// (the directory made private first). When the directory cannot be made private, the
    /// links in it are removed ([`remove_links`]).
    pub fn set_classes(&self, classes: &[u8]) -> io::Result<()> {
        if let Err(e) = crate::paths::ensure_private_dir(&self.dir) {
            remove_links(&self.dir);
            return Err(e);
        }
        let mut b = self.blocks();
        b.classes = Some(classes.to_vec());
        let mut first_error = Ok(());
        for n in 0..LINKS {
            if let Err(e) = self.write(&b, n) {
                first_error = first_error.and(Err(e));
            }
        }
        first_error
    }

    /// `port`'s word is about to become used: its block's link says so first.
    pub fn use_port(&self, port: u16) {
        let n = blocklink::link_of(port);
        let mut b = self.blocks();
        let i = usize::from(n);
        b.used[i] += 1;
        if !b.said_used[i] {
            b.said_used[i] = true;
            // not written (and so removed, or it could not be): said again at the next use
            b.said_used[i] = self.write(&b, n).is_ok();
        }
    }

    /// `port`'s word became unused (0) at `now_ms`.
    pub fn unuse_port(&self, port: u16, now_ms: u64) {
        let i = usize::from(blocklink::link_of(port));
        let mut b = self.blocks();
        b.used[i] = b.used[i].saturating_sub(1);
        if b.used[i] == 0 {
            b.unused_since_ms[i] = now_ms;
        }
    }

    /// The links of blocks unused for [`VACANT_AFTER_MS`] at `now_ms` say they are vacant.
    pub fn tidy(&self, now_ms: u64) {
        let mut b = self.blocks();
        for n in 0..LINKS {
            let i = usize::from(n);
            if b.said_used[i] && b.used[i] == 0 && now_ms.saturating_sub(b.unused_since_ms[i]) >= VACANT_AFTER_MS {
                b.said_used[i] = false;
                let _ = self.write(&b, n);
            }
        }
    }

    /// Writes link `n` as `b` says, unless it says so already; a link that cannot be
    /// written is removed (a process then reads the maps' files).
    fn write(&self, b: &Blocks, n: u16) -> io::Result<()> {
        let Some(classes) = &b.classes else { return Ok(()) };
        let at = usize::from(n) * usize::from(PORTS_PER_LINK);
        let Some(block) =
            classes.get(at..at + usize::from(PORTS_PER_LINK)).and_then(|c| <&[u8; PORTS_PER_LINK as usize]>::try_from(c).ok())
        else {
            return Ok(());
        };
        let target = blocklink::encode(block, b.said_used[usize::from(n)]);
        let link = self.dir.join(n.to_string());
        let written = replace_link(&link, OsStr::from_bytes(&target));
        if written.is_err() {
            let _ = std::fs::remove_file(&link);
        }
        written
    }
}

/// Removes the links in `dir`, which nobody keeps (a daemon without a port map, or one
/// that cannot write there): a fresh process then reads the maps' files, never a link
/// that says what is no longer so.
pub fn remove_links(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// Makes `link` point to `target`: in place when there is none (a new link appears
/// whole), else made beside and renamed over it; nothing when it says so already.
fn replace_link(link: &Path, target: &OsStr) -> io::Result<()> {
    match std::fs::read_link(link) {
        Ok(t) if t.as_os_str() == target => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound && std::os::unix::fs::symlink(target, link).is_ok() => return Ok(()),
        _ => {}
    }
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::policymap;
    use std::os::unix::fs::MetadataExt;

    fn says(dir: &Path, port: u16) -> (Option<u8>, bool) {
        let t = std::fs::read_link(dir.join(blocklink::link_of(port).to_string())).unwrap();
        let t = t.as_os_str().as_bytes();
        (blocklink::class(t, port), blocklink::vacant(t))
    }

    #[test]
    fn the_links_say_the_policys_class_for_every_port_and_change_with_it() {
        let tmp = std::env::temp_dir().join(format!("styxy-blocklinks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let (dir, links) = (tmp.join("blocks"), BlockLinks::new(tmp.join("blocks")));
        let mut policy = Policy::default();
        links.set_classes(&policymap::classes(&policy)).unwrap();
        let check = |policy: &Policy| {
            for port in 0..=u16::MAX {
                assert_eq!(says(&dir, port), (Some(policymap::class(policy, port)), true), "port {port}");
            }
        };
        check(&policy);
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), usize::from(LINKS), "no temporary link is left");
        // a link that says so already is not written again; a changed one is replaced
        let untouched = dir.join(blocklink::link_of(40000).to_string());
        let before = std::fs::symlink_metadata(&untouched).unwrap().ino();
        policy.add_rules("3000=off").unwrap();
        links.set_classes(&policymap::classes(&policy)).unwrap();
        assert_eq!(std::fs::symlink_metadata(&untouched).unwrap().ino(), before);
        assert_eq!(policymap::class(&policy, 3000), policymap::UNTOUCHED);
        check(&policy);
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_block_is_said_used_before_its_first_port_and_vacant_a_while_after_its_last() {
        let tmp = std::env::temp_dir().join(format!("styxy-blockuse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let (dir, links) = (tmp.join("blocks"), BlockLinks::new(tmp.join("blocks")));
        // before the policy, a use is counted and written with it
        links.use_port(3001);
        links.set_classes(&policymap::classes(&Policy::default())).unwrap();
        assert!(!says(&dir, 3001).1 && !says(&dir, 3050).1, "the block of 3001 is used");
        assert!(says(&dir, 5173).1);
        links.use_port(5173);
        links.use_port(5174);
        assert!(!says(&dir, 5173).1);
        links.unuse_port(5173, 10_000);
        links.tidy(20_000);
        assert!(!says(&dir, 5173).1, "5174 is still used");
        links.unuse_port(5174, 20_000);
        links.tidy(20_000 + VACANT_AFTER_MS - 1);
        assert!(!says(&dir, 5173).1, "vacant too soon: a grant and a withdrawal in a loop would rewrite it");
        // used again meanwhile: stays used
        links.use_port(5175);
        links.tidy(30_000);
        assert!(!says(&dir, 5173).1);
        links.unuse_port(5175, 30_000);
        links.tidy(30_000 + VACANT_AFTER_MS);
        assert!(says(&dir, 5173).1);
        assert!(!says(&dir, 3001).1);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
