//! Is a port bound at OS level: the daemon's test bind, made with the tag `exec`'s
//! seccomp filter lets through; and which sockets hold a port (the kernel's socket
//! diagnostics). (What it reads about processes is in `styxy_preload_common::procinfo`.)

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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

/// A TCP socket in any state: listening, connected, or bound and not yet listening.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSocket {
    /// Its local port.
    pub port: u16,
    pub inode: u64,
    pub uid: u32,
}

/// Which sockets [`sockets`] lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// Listening ones: the kernel walks its listeners only (tens of µs).
    Listening,
    /// In any state, bound-only ones included: the kernel walks every bucket of its
    /// connection and bind tables, ~1 ms a family on a machine with 24 GiB, whatever
    /// the port.
    Any,
}

/// The TCP sockets (IPv4 and IPv6) of the daemon's network namespace, `which` of them,
/// whose local port is `port` (all of them for `None`), from the kernel's socket
/// diagnostics (`NETLINK_SOCK_DIAG`; a kernel before 6.7 lists no bound-only socket).
/// Only sockets a process holds: a connection in `TIME_WAIT` (inode 0, uid 0 as the
/// kernel reports it) is nobody's. `None` when the kernel cannot be asked.
pub fn sockets(port: Option<u16>, which: Which) -> Option<Vec<PortSocket>> {
    let states = match which {
        Which::Listening => 1 << TCP_LISTEN,
        Which::Any => ALL_STATES,
    };
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        diag_dump(family as u8, port.unwrap_or(0), states, |m| {
            if m.inode != 0 {
                out.push(PortSocket { port: m.port, uid: m.uid, inode: m.inode });
            }
        })?;
    }
    Some(out)
}

/// The owners (uids) of the TCP sockets listening where a connection to `addr` would
/// go: `addr` itself or the wildcard of its family (and `[::]` for IPv4, dual-stack).
/// Empty when nothing listens there; `None` when the kernel cannot be asked. The kernel
/// walks its listeners only (tens of µs), not its connections.
pub fn listener_uids(addr: SocketAddr) -> Option<Vec<u32>> {
    let mut uids = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        diag_dump(family as u8, addr.port(), 1 << TCP_LISTEN, |m| {
            if accepts(m.local, addr) {
                uids.push(m.uid);
            }
        })?;
    }
    Some(uids)
}

/// Whether a socket listening on `listener` accepts a connection to `addr` (of its port).
fn accepts(listener: IpAddr, addr: SocketAddr) -> bool {
    match (listener, addr.ip()) {
        (l, ip) if l == ip || l.is_unspecified() && l.is_ipv4() == ip.is_ipv4() => true,
        (IpAddr::V6(l), IpAddr::V4(v4)) => l.is_unspecified() || l.to_ipv4_mapped() == Some(v4),
        _ => false,
    }
}

/// Every TCP state, and the kernel's pseudo-state for a socket bound and nothing more
/// (`TCP_BOUND_INACTIVE`, 13).
const ALL_STATES: u32 = (1 << 14) - 1;
const TCP_LISTEN: u32 = 10;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_msg`: family, state, timer, retrans, the 48-byte socket id (source
/// port first, big-endian, at offset 4; the source address at offset 8, 4 or 16 bytes),
/// expires, rqueue, wqueue, uid (offset 64), inode (offset 68).
const DIAG_MSG_LEN: usize = 72;

/// One socket as the kernel's diagnostics describe it.
struct DiagMsg {
    port: u16,
    local: IpAddr,
    uid: u32,
    inode: u64,
}

/// One `SOCK_DIAG_BY_FAMILY` dump of TCP sockets of `family` in `states` whose source
/// port is `port` (the kernel filters on the request's `idiag_sport`; 0: every one), each
/// handed to `each`.
fn diag_dump(family: u8, port: u16, states: u32, mut each: impl FnMut(DiagMsg)) -> Option<()> {
    let fd = diag_socket()?;
    let req = diag_request(family, port, states);
    // SAFETY: send of a buffer of its length on our netlink socket.
    let sent = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent != req.len() as isize {
        return None;
    }
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: recv into a buffer of its length; the socket has a receive timeout.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).ok()?;
        if n == 0 || !diag_messages(&buf[..n], &mut each)? {
            return Some(());
        }
    }
}

/// A netlink socket for socket diagnostics, CLOEXEC, whose reads wait at most 200 ms.
fn diag_socket() -> Option<OwnedFd> {
    // SAFETY: socket(2); the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    if raw < 0 {
        return None;
    }
    // SAFETY: a fresh fd of ours.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
    // SAFETY: setsockopt with a value of the option's type and size.
    let rc = unsafe {
        libc::setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), size_of::<libc::timeval>() as u32)
    };
    (rc == 0).then_some(fd)
}

/// `nlmsghdr` + `inet_diag_req_v2` asking for TCP sockets of `family` in `states` on
/// source `port`.
fn diag_request(family: u8, port: u16, states: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDR + 56);
    m.extend_from_slice(&((NLMSG_HDR + 56) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    m.extend_from_slice(&[0; 8]); // sequence number, port id
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(&port.to_be_bytes()); // idiag_sport
    m.resize(NLMSG_HDR + 56, 0); // the rest of the socket id: any
    m
}

/// Reads one datagram of netlink messages, each socket to `each`; `Some(false)` once the
/// dump is done, `None` on an error message or a malformed one.
fn diag_messages(mut buf: &[u8], each: &mut impl FnMut(DiagMsg)) -> Option<bool> {
    let u32_at = |b: &[u8], at: usize| Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?));
    while buf.len() >= NLMSG_HDR {
        let len = u32_at(buf, 0)? as usize;
        let kind = u16::from_ne_bytes(buf.get(4..6)?.try_into().ok()?);
        let body = buf.get(NLMSG_HDR..len)?;
        match i32::from(kind) {
            libc::NLMSG_DONE => return Some(false),
            libc::NLMSG_ERROR => return None,
            _ if kind == SOCK_DIAG_BY_FAMILY && body.len() >= DIAG_MSG_LEN => {
                let local = match i32::from(body[0]) {
                    libc::AF_INET => IpAddr::from(<[u8; 4]>::try_from(body.get(8..12)?).ok()?),
                    _ => IpAddr::from(<[u8; 16]>::try_from(body.get(8..24)?).ok()?),
                };
                let port = u16::from_be_bytes(body.get(4..6)?.try_into().ok()?);
                each(DiagMsg { port, local, uid: u32_at(body, 64)?, inode: u64::from(u32_at(body, 68)?) });
            }
            _ => {}
        }
        buf = buf.get(len.next_multiple_of(4).min(buf.len())..)?;
    }
    Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_found_with_their_owner_where_a_connection_goes() {
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = l.local_addr().unwrap();
        assert_eq!(listener_uids(at), Some(vec![me]));
        assert_eq!(listener_uids(SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), at.port()))), Some(vec![]), "another address");
        drop(l);
        assert_eq!(listener_uids(at), Some(vec![]));
        let bound = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        bound.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).unwrap();
        let b = bound.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(listener_uids(b), Some(vec![]), "bound, not listening");
        let any6 = std::net::TcpListener::bind("[::]:0").unwrap();
        let p6 = any6.local_addr().unwrap().port();
        assert_eq!(listener_uids(SocketAddr::from((Ipv4Addr::LOCALHOST, p6))), Some(vec![me]), "dual-stack [::] takes IPv4");
        let v4: SocketAddr = "127.0.0.1:9876".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(accepts(ip("127.0.0.1"), v4) && accepts(ip("0.0.0.0"), v4) && accepts(ip("::"), v4) && accepts(ip("::ffff:127.0.0.1"), v4));
        assert!(!accepts(ip("127.0.0.2"), v4) && !accepts(ip("::1"), v4));
        assert!(accepts(ip("::"), "[::1]:1".parse().unwrap()) && !accepts(ip("0.0.0.0"), "[::1]:1".parse().unwrap()));
    }

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

    fn inode(fd: &impl AsRawFd) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap().ino()
    }

    #[test]
    fn sockets_bound_and_not_yet_listening_are_listed_with_their_inode() {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).unwrap();
        let port = s.local_addr().unwrap().as_socket().unwrap().port();
        // SAFETY: getuid(2) cannot fail.
        let uid = unsafe { libc::getuid() };
        assert!(!port_in_use(port), "the test bind does not see a bound socket with SO_REUSEADDR");
        assert_eq!(sockets(Some(port), Which::Any), Some(vec![PortSocket { port, inode: inode(&s), uid }]));
        assert_eq!(sockets(Some(port), Which::Listening), Some(vec![]), "bound, not listening");
        let l6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let p6 = l6.local_addr().unwrap().port();
        let six = PortSocket { port: p6, inode: inode(&l6), uid };
        assert!(sockets(Some(p6), Which::Any).unwrap().contains(&six));
        assert_eq!(sockets(Some(p6), Which::Listening), Some(vec![six]));
        assert!(sockets(None, Which::Any).unwrap().contains(&six), "all of them");
        assert!(sockets(None, Which::Listening).unwrap().contains(&six));
        let gone = inode(&s);
        drop(s);
        assert!(!sockets(Some(port), Which::Any).unwrap().iter().any(|s| s.inode == gone));
        // a connection the server closed first lingers in TIME_WAIT: nobody's socket
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let lp = l.local_addr().unwrap().port();
        let c = std::net::TcpStream::connect(("127.0.0.1", lp)).unwrap();
        drop(l.accept().unwrap());
        drop(l);
        drop(c);
        assert!(sockets(Some(lp), Which::Any).unwrap().is_empty(), "{:?}", sockets(Some(lp), Which::Any));
    }
}
