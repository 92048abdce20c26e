//! The policy map's classes as symbolic links, the form a fresh process reads: one link
//! per block of [`PORTS_PER_LINK`] ports, `policy/<block>` beside the daemon's socket,
//! whose target is the block's classes. One `readlink` answers a port's class: no open,
//! no read, no close (docs/ARCHITECTURE.md "The daemon's maps"). `no_std`: the shim
//! includes this file; `policymap` writes the links.
//!
//! A target is [`VERSION`], then one character per three ports, each port's class in two
//! bits (the lowest first) and the sum an index into [`ALPHABET`]: 44 bytes, short enough
//! for the link to live in its inode (ext4 keeps up to 59 bytes there, tmpfs 127), so
//! the walk to it is all a look costs.
//!
//! A link is not checked for its owner (a `readlink` cannot tell): what a link planted by
//! someone who may write the daemon's directory can do is make a port's bind go as asked,
//! or be asked of the daemon on `hook.sock`, whose owner is checked (docs/SECURITY.md).

/// Ports per link.
pub const PORTS_PER_LINK: u16 = 128;
/// Links, for every port.
pub const LINKS: u16 = (65536 / PORTS_PER_LINK as u32) as u16;
/// The first byte of every target: the layout.
pub const VERSION: u8 = b'1';
/// A target's length: the version and 43 characters of three ports each.
pub const LEN: usize = 1 + (PORTS_PER_LINK as usize).div_ceil(3);
/// 64 characters, none of them `/` or NUL.
const ALPHABET: &[u8; 64] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_";

/// The link that holds `port`'s class.
pub fn link_of(port: u16) -> u16 {
    port / PORTS_PER_LINK
}

/// The target of the link for `classes`, a block's classes in port order (each 0–3).
pub fn encode(classes: &[u8; PORTS_PER_LINK as usize]) -> [u8; LEN] {
    let mut target = [VERSION; LEN];
    for (at, three) in target.iter_mut().skip(1).zip(classes.chunks(3)) {
        let index = three.iter().rev().fold(0usize, |v, c| (v << 2) | usize::from(c & 3));
        *at = ALPHABET.get(index).copied().unwrap_or(ALPHABET[0]);
    }
    target
}

/// `port`'s class in `target`, the link of its block ([`link_of`]); `None` for a target
/// of another layout.
pub fn class(target: &[u8], port: u16) -> Option<u8> {
    if target.len() != LEN || target.first() != Some(&VERSION) {
        return None;
    }
    let k = usize::from(port % PORTS_PER_LINK);
    let c = *target.get(1 + k / 3)?;
    let index = ALPHABET.iter().position(|a| *a == c)? as u8;
    Some((index >> ((k % 3) * 2)) & 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_reads_back_its_class_from_its_link() {
        // every class at every position of a three-port character
        let mut classes = [0u8; PORTS_PER_LINK as usize];
        for (i, c) in classes.iter_mut().enumerate() {
            *c = ((i * 7 + i / 3) % 4) as u8;
        }
        let target = encode(&classes);
        assert_eq!(target.len(), 44);
        assert!(!target.contains(&b'/') && !target.contains(&0));
        for base in [0u16, 3000 / PORTS_PER_LINK * PORTS_PER_LINK, (LINKS - 1) * PORTS_PER_LINK] {
            for (i, c) in classes.iter().enumerate() {
                let port = base + i as u16;
                assert_eq!(link_of(port), base / PORTS_PER_LINK);
                assert_eq!(class(&target, port), Some(*c), "port {port}");
            }
        }
        assert_eq!(link_of(65535), LINKS - 1);
    }

    #[test]
    fn a_target_of_another_layout_says_nothing() {
        let target = encode(&[1; PORTS_PER_LINK as usize]);
        assert_eq!(class(&target, 5), Some(1));
        let mut other = target;
        other[0] = b'2';
        assert_eq!(class(&other, 5), None);
        assert_eq!(class(&target[..43], 5), None);
        let mut bad = target;
        bad[2] = b'/';
        assert_eq!(class(&bad, 3), None);
    }
}
