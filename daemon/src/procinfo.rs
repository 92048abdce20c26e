//! What the daemon asks the OS: is a process alive (and still the same process), its
//! command name, and is a port bound at OS level.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

/// The process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22),
/// which tells a live process from a reused pid.
pub fn start_time(pid: u32) -> Option<u64> {
    use std::io::Read;
    // one read into a stack buffer: this runs for every allocation
    let mut buf = [0u8; 1024];
    let n = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?.read(&mut buf).ok()?;
    let stat = std::str::from_utf8(buf.get(..n)?).ok()?;
    // comm may hold spaces and parentheses: the fields start after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split(' ').nth(19)?.parse().ok()
}

/// True if `pid` runs and is the process that started at `start` (0: unknown, any).
pub fn alive(pid: u32, start: u64) -> bool {
    match start_time(pid) {
        Some(s) => start == 0 || s == start,
        None => false,
    }
}

/// The parent of `pid`.
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.get(stat.rfind(')')? + 2..)?.split(' ').nth(1)?.parse().ok()
}

/// Whether `ancestor` is `pid`'s parent, grandparent, … (at most 64 generations).
pub fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        match parent(p) {
            Some(q) if q == ancestor => return true,
            Some(q) if q > 1 => p = q,
            _ => return false,
        }
    }
    false
}

/// Whether `pid`'s environment (as it was started) holds `key=value`.
pub fn env_is(pid: u32, key: &str, value: &str) -> bool {
    let want = format!("{key}={value}");
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|e| e.split(|b| *b == 0).any(|kv| kv == want.as_bytes()))
}

/// `pid`'s environment as it was started, as pairs.
pub fn environ(pid: u32) -> Vec<(String, std::ffi::OsString)> {
    use std::os::unix::ffi::OsStrExt;
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter_map(|kv| {
            let eq = kv.iter().position(|b| *b == b'=')?;
            Some((String::from_utf8_lossy(&kv[..eq]).into_owned(), std::ffi::OsStr::from_bytes(&kv[eq + 1..]).to_owned()))
        })
        .collect()
}

/// `pid`'s working directory (at most 1000 characters, as a client may send).
pub fn cwd(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok().map(|d| d.to_string_lossy().chars().take(1000).collect())
}

pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim_end().to_string())
}

/// True if a socket listens on `port` (or holds it without `SO_REUSEADDR`), on any
/// address, IPv4 or IPv6: a test bind of the dual-stack wildcard with `SO_REUSEADDR`.
pub fn port_in_use(port: u16) -> bool {
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    match test_bind(v6, false) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => test_bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), true).is_err(),
        Err(_) => true,
    }
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
    let rc = unsafe { libc::syscall(libc::SYS_bind, s.as_raw_fd(), addr.as_ptr(), addr.len(), styxy_preload_client::UNSUPERVISED_BIND) };
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
    fn self_is_alive_and_listeners_are_seen() {
        let me = std::process::id();
        let st = start_time(me).unwrap();
        assert!(alive(me, st));
        assert!(!alive(me, st + 1));
        assert!(!alive(u32::MAX - 1, 0));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        assert!(port_in_use(p));
        let l6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        assert!(port_in_use(l6.local_addr().unwrap().port()));
        drop(l);
        assert!(!port_in_use(p));
    }
}
