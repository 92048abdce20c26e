//! An IPv4/IPv6 socket address as the kernel reads it — bytes — for the shim and the
//! hooks' logic alike: its family and port, whether it is loopback, a copy with another
//! port. `no_std` and free of `unsafe`: the shim includes this file; the core and the
//! supervisor use it through the client crate. One reading of a sockaddr for both.

/// `AF_INET` and `AF_INET6` on Linux.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
/// `sizeof(struct sockaddr_in)` and `sizeof(struct sockaddr_in6)`.
pub const IN_LEN: usize = 16;
pub const IN6_LEN: usize = 28;

/// The family and port (host order) of an IPv4/IPv6 address at least as long as its
/// struct; `None` for any other family, or fewer bytes than the kernel would read.
pub fn parse(bytes: &[u8]) -> Option<(u16, u16)> {
    let (family, port) = head(bytes)?;
    let need = if family == AF_INET { IN_LEN } else { IN6_LEN };
    (bytes.len() >= need).then_some((family, port))
}

/// The family and port of an IPv4/IPv6 address from its first four bytes alone (what a
/// truncated `getsockname` buffer still holds); `None` for another family.
pub fn head(bytes: &[u8]) -> Option<(u16, u16)> {
    let family = u16::from_ne_bytes([*bytes.first()?, *bytes.get(1)?]);
    let port = u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]);
    matches!(family, AF_INET | AF_INET6).then_some((family, port))
}

/// 127.0.0.0/8, `::1` or `::ffff:127.0.0.0/104`, of an address [`parse`] accepted.
pub fn is_loopback(bytes: &[u8], family: u16) -> bool {
    if family == AF_INET {
        return bytes.get(4) == Some(&127);
    }
    let Some(a) = bytes.get(8..24) else {
        return false;
    };
    let v4mapped = a[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] && a[12] == 127;
    let one = a[..15] == [0u8; 15] && a[15] == 1;
    v4mapped || one
}

/// Writes `port` into the address (`sin_port` and `sin6_port` are both at offset 2, in
/// network order).
pub fn set_port(bytes: &mut [u8], port: u16) {
    if let Some(p) = bytes.get_mut(2..4) {
        p.copy_from_slice(&port.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4], port: u16) -> [u8; IN_LEN] {
        let mut b = [0u8; IN_LEN];
        b[..2].copy_from_slice(&AF_INET.to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[4..8].copy_from_slice(&a);
        b
    }

    fn v6(a: [u8; 16], port: u16) -> [u8; IN6_LEN] {
        let mut b = [0u8; IN6_LEN];
        b[..2].copy_from_slice(&AF_INET6.to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[8..24].copy_from_slice(&a);
        b
    }

    #[test]
    fn families_ports_and_short_addresses() {
        assert_eq!(parse(&v4([127, 0, 0, 1], 3000)), Some((AF_INET, 3000)));
        assert_eq!(parse(&v6([0; 16], 8080)), Some((AF_INET6, 8080)));
        assert_eq!(parse(&v4([127, 0, 0, 1], 3000)[..15]), None, "short sockaddr_in");
        assert_eq!(parse(&v6([0; 16], 1)[..27]), None, "short sockaddr_in6");
        assert_eq!(parse(&[1, 0, 0, 0]), None, "AF_UNIX");
        assert_eq!(parse(&[2]), None);
        assert_eq!(head(&v4([127, 0, 0, 1], 3000)[..4]), Some((AF_INET, 3000)), "a truncated buffer's head");
        assert_eq!(head(&[1, 0, 0, 0]), None);
    }

    #[test]
    fn loopback_in_both_families() {
        let mapped = |last: u8| {
            let mut a = [0u8; 16];
            a[10..12].copy_from_slice(&[0xff, 0xff]);
            a[12..].copy_from_slice(&[last, 0, 0, 1]);
            a
        };
        let mut one = [0u8; 16];
        one[15] = 1;
        assert!(is_loopback(&v4([127, 0, 0, 2], 1), AF_INET));
        assert!(!is_loopback(&v4([10, 0, 0, 1], 1), AF_INET));
        assert!(is_loopback(&v6(one, 1), AF_INET6));
        assert!(is_loopback(&v6(mapped(127), 1), AF_INET6));
        assert!(!is_loopback(&v6(mapped(10), 1), AF_INET6));
        assert!(!is_loopback(&v6([0; 16], 1), AF_INET6), "::");
    }

    #[test]
    fn another_port() {
        let mut a = v6([0; 16], 3000);
        set_port(&mut a, 3007);
        assert_eq!(parse(&a), Some((AF_INET6, 3007)));
    }
}
