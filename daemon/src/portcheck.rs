//! Is a port bound at OS level: the daemon's test bind, made with the tag `exec`'s
//! seccomp filter lets through. (What it reads about processes is in
//! `styxy_preload_common::procinfo`.)

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

/// True if a socket listens on `port` (or holds it without `SO_REUSEADDR`), on any
/// address, IPv4 or IPv6: a test bind of the dual-stack wildcard with `SO_REUSEADDR`.
/// A port the daemon may not bind (`EACCES`: a privileged port, for a daemon without the
/// right) cannot be tested: it counts as free, and the root process that asked for it (a
/// `STYXY_PRELOAD_PORTS` rule) hears from the kernel itself.
pub fn port_in_use(port: u16) -> bool {
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let in_use = |e: std::io::Error| e.raw_os_error() != Some(libc::EACCES);
    match test_bind(v6, false) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            test_bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), true).is_err_and(in_use)
        }
        Err(e) => in_use(e),
    }
}

/// True if Styxy's own test-bind would fail on `port`: a bind of `127.0.0.1` with
/// `SO_REUSEADDR`, as Node's `listen()` makes it (docs/STYXY.md "`POST /allocate`"). It sees
/// servers on `0.0.0.0`, `127.0.0.1` and dual-stack `[::]`, not on `::1` or `[::]` V6ONLY.
pub fn styxy_sees(port: u16) -> bool {
    test_bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), true).is_err_and(|e| e.raw_os_error() != Some(libc::EACCES))
}

fn test_bind(addr: SocketAddr, v4: bool) -> std::io::Result<()> {
    let domain = if v4 { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    if !v4 {
        s.set_only_v6(false)?;
    }
    s.set_reuse_address(true)?;
    bind_unsupervised(&s, &addr.into())
}

/// bind(2) with the tag that `exec`'s seccomp filter lets through: the daemon's own binds
/// never wait on a supervisor that may be waiting on the daemon.
pub fn bind_unsupervised(s: &socket2::Socket, addr: &socket2::SockAddr) -> std::io::Result<()> {
    // SAFETY: a valid socket, address and length; bind ignores the extra argument.
    let rc = unsafe { libc::syscall(libc::SYS_bind, s.as_raw_fd(), addr.as_ptr(), addr.len(), styxy_preload_common::UNSUPERVISED_BIND) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_seen() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        assert!(port_in_use(p));
        let l6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        assert!(port_in_use(l6.local_addr().unwrap().port()));
        drop(l);
        assert!(!port_in_use(p));
    }
}
