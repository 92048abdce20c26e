//! Small unsafe helpers around libc: errno, socket type, sockaddr copies with another port.

use libc::{c_int, sockaddr, sockaddr_storage, socklen_t, AF_INET, AF_INET6};

pub type AddrFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
pub type ListenFn = unsafe extern "C" fn(c_int, c_int) -> c_int;

pub fn errno() -> c_int {
    // SAFETY: the thread's errno location is always valid.
    unsafe { *libc::__errno_location() }
}

pub fn set_errno(e: c_int) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = e }
}

/// An IPv4/IPv6 socket address copied out of the caller's memory, port substitutable.
#[derive(Clone, Copy)]
pub struct Addr {
    storage: sockaddr_storage,
    len: socklen_t,
    pub family: c_int,
    pub port: u16,
}

impl Addr {
    /// # Safety
    /// `addr` points to `len` readable bytes (the caller's sockaddr).
    pub unsafe fn read(addr: *const sockaddr, len: socklen_t) -> Option<Addr> {
        if addr.is_null() || (len as usize) < std::mem::size_of::<libc::sa_family_t>() {
            return None;
        }
        let family = c_int::from(std::ptr::read_unaligned(addr.cast::<libc::sa_family_t>()));
        let need = match family {
            AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
            AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
            _ => return None,
        };
        if (len as usize) < need || len as usize > std::mem::size_of::<sockaddr_storage>() {
            return None;
        }
        let mut storage: sockaddr_storage = std::mem::zeroed();
        std::ptr::copy_nonoverlapping(addr.cast::<u8>(), (&mut storage as *mut sockaddr_storage).cast::<u8>(), len as usize);
        let port = u16::from_be(std::ptr::read_unaligned((addr as *const u8).add(2).cast::<u16>()));
        Some(Addr { storage, len, family, port })
    }

    /// The address in `bytes` (a sockaddr as the kernel would read it).
    pub fn from_bytes(bytes: &[u8]) -> Option<Addr> {
        let len = socklen_t::try_from(bytes.len()).ok()?;
        // SAFETY: `bytes` is `len` readable bytes; read() copies them unaligned.
        unsafe { Addr::read(bytes.as_ptr().cast(), len) }
    }

    /// 127.0.0.0/8, ::1 or ::ffff:127.0.0.0/104.
    pub fn is_loopback(&self) -> bool {
        // SAFETY: the family says which sockaddr the storage holds, and both fit in it.
        unsafe {
            if self.family == AF_INET {
                let a = &*self.ptr().cast::<libc::sockaddr_in>();
                return u32::from_be(a.sin_addr.s_addr) >> 24 == 127;
            }
            let a = &*self.ptr().cast::<libc::sockaddr_in6>();
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }

    pub fn with_port(mut self, port: u16) -> Addr {
        // sin_port and sin6_port are both at offset 2
        // SAFETY: storage is large enough and we write two bytes at offset 2.
        unsafe {
            std::ptr::write_unaligned((&mut self.storage as *mut sockaddr_storage).cast::<u8>().add(2).cast::<u16>(), port.to_be());
        }
        self.port = port;
        self
    }

    pub fn ptr(&self) -> *const sockaddr {
        (&self.storage as *const sockaddr_storage).cast()
    }

    pub fn socklen(&self) -> socklen_t {
        self.len
    }

    pub fn family_name(&self) -> &'static str {
        if self.family == AF_INET6 {
            "ipv6"
        } else {
            "ipv4"
        }
    }
}

/// An integer `SOL_SOCKET` option of the socket, or `None` if it cannot be read.
pub fn sockopt(fd: c_int, opt: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: valid out-pointers of the right size.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut c_int).cast(), &mut len) };
    (rc == 0).then_some(v)
}

/// `SO_TYPE` of the socket, or `None` if it cannot be read.
pub fn sock_type(fd: c_int) -> Option<c_int> {
    sockopt(fd, libc::SO_TYPE)
}

/// `SO_REUSEPORT` is set: the program means to share the port with other sockets.
pub fn shares_port(fd: c_int) -> bool {
    sockopt(fd, libc::SO_REUSEPORT).is_some_and(|v| v != 0)
}

/// The local address of a socket (its port 0 when unbound).
pub fn local_addr(fd: c_int) -> Option<Addr> {
    // SAFETY: storage is large enough; len tells getsockname its size.
    unsafe {
        let mut storage: sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<sockaddr_storage>() as socklen_t;
        if libc::getsockname(fd, (&mut storage as *mut sockaddr_storage).cast(), &mut len) != 0 {
            return None;
        }
        Addr::read((&storage as *const sockaddr_storage).cast(), len)
    }
}

/// Whether a TCP socket listens on `port` (the kernel's tables, IPv4 and IPv6). Read only
/// on an error path.
pub fn listening(port: u16) -> bool {
    let want = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).unwrap_or_default().lines().skip(1).any(|l| {
            l.split_whitespace().nth(3) == Some("0A") && l.split_whitespace().nth(1).is_some_and(|a| format!("{a} ").ends_with(&want))
        })
    })
}
