//! What the daemon says of a block of [`PORTS_PER_LINK`] ports as the target of one
//! symbolic link, `blocks/<block>` beside its socket: each port's class, and whether any
//! port of the block is held or was asked for by a session (its port map word is not 0).
//! It is the form a fresh process reads: one `readlink` answers a bind's class, and a
//! session's connect to a port of a block nobody uses (docs/ARCHITECTURE.md "The cold
//! path"). `no_std`: the shim includes this file; `blocklinks` writes the links.
//!
//! A target is [`VERSION`], one character per three ports (each port's class in two
//! bits, the lowest first; the sum an index into [`ALPHABET`]), then [`VACANT`] or
//! [`USED`]: 45 bytes, short enough for the link to live in its inode (ext4 keeps up to
//! 59 bytes there, tmpfs 127), so the walk to it is all a look costs.
//!
//! A link is not checked for its owner (a `readlink` cannot tell): what a link planted by
//! someone who may write the daemon's directory can do is make a bind or a connect go as
//! asked, or be asked of the daemon on `hook.sock`, whose owner is checked
//! (docs/SECURITY.md).

/// The links' directory beside the daemon's socket.
pub const DIR: &str = "blocks";
/// Ports per link.
pub const PORTS_PER_LINK: u16 = 128;
/// Links, for every port.
pub const LINKS: u16 = (65536 / PORTS_PER_LINK as u32) as u16;
/// The first byte of every target: the layout.
pub const VERSION: u8 = b'1';
/// The last byte of a block whose ports' words in the port map are all 0.
pub const VACANT: u8 = b'-';
/// The last byte of a block of which a port is held or asked for (or may be).
pub const USED: u8 = b'+';
/// A target's length: the version, 43 characters of three ports each, the use.
pub const LEN: usize = 1 + (PORTS_PER_LINK as usize).div_ceil(3) + 1;
/// 64 characters, none of them `/` or NUL.
const ALPHABET: &[u8; 64] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_";

/// The link of `port`'s block.
pub fn link_of(port: u16) -> u16 {
    port / PORTS_PER_LINK
}

/// The target of a block's link: its ports' `classes` in port order (each 0–3), and
/// whether any of them is `used`.
pub fn encode(classes: &[u8; PORTS_PER_LINK as usize], used: bool) -> [u8; LEN] {
    let mut target = [VERSION; LEN];
    for (at, three) in target.iter_mut().skip(1).zip(classes.chunks(3)) {
        let index = three.iter().rev().fold(0usize, |v, c| (v << 2) | usize::from(c & 3));
        *at = ALPHABET.get(index).copied().unwrap_or(b'0');
    }
    if let Some(last) = target.last_mut() {
        *last = if used { USED } else { VACANT };
    }
    target
}

/// `port`'s class in `target`, the link of its block ([`link_of`]); `None` for a target
/// of another layout.
pub fn class(target: &[u8], port: u16) -> Option<u8> {
    ours(target)?;
    let k = usize::from(port % PORTS_PER_LINK);
    let c = *target.get(1 + k / 3)?;
    let index = ALPHABET.iter().position(|a| *a == c)? as u8;
    Some((index >> ((k % 3) * 2)) & 3)
}

/// No port of the block is held or asked for; `false` when it may be, or `target` is of
/// another layout.
pub fn vacant(target: &[u8]) -> bool {
    ours(target).is_some() && target.last() == Some(&VACANT)
}

fn ours(target: &[u8]) -> Option<()> {
    (target.len() == LEN && target.first() == Some(&VERSION)).then_some(())
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
        for used in [false, true] {
            let target = encode(&classes, used);
            assert_eq!(target.len(), 45);
            assert!(!target.contains(&b'/') && !target.contains(&0));
            assert_eq!(vacant(&target), !used);
            for base in [0u16, 3000 / PORTS_PER_LINK * PORTS_PER_LINK, (LINKS - 1) * PORTS_PER_LINK] {
                for (i, c) in classes.iter().enumerate() {
                    let port = base + i as u16;
                    assert_eq!(link_of(port), base / PORTS_PER_LINK);
                    assert_eq!(class(&target, port), Some(*c), "port {port}");
                }
            }
        }
        assert_eq!(link_of(65535), LINKS - 1);
    }

    #[test]
    fn a_target_of_another_layout_says_nothing() {
        let target = encode(&[1; PORTS_PER_LINK as usize], false);
        assert_eq!((class(&target, 5), vacant(&target)), (Some(1), true));
        let mut other = target;
        other[0] = b'2';
        assert_eq!((class(&other, 5), vacant(&other)), (None, false));
        assert_eq!((class(&target[..44], 5), vacant(&target[..44])), (None, false));
        let mut bad = target;
        bad[2] = b'/';
        assert_eq!(class(&bad, 3), None);
    }
}
