//! Small unsafe helpers around libc: errno, socket type, sockaddr copies with another port.

use libc::{c_int, sockaddr, sockaddr_storage, socklen_t, AF_INET6};
use styxy_preload_common::sockaddr as inet;

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
        if addr.is_null() || len as usize > std::mem::size_of::<sockaddr_storage>() {
            return None;
        }
        // SAFETY: `len` readable bytes at `addr` (this function's contract).
        Addr::from_bytes(unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), len as usize) })
    }

    /// The address in `bytes` (a sockaddr as the kernel would read it): IPv4 or IPv6
    /// (`client::sockaddr`, the shim's reading too), at most a `sockaddr_storage`.
    pub fn from_bytes(bytes: &[u8]) -> Option<Addr> {
        let len = socklen_t::try_from(bytes.len()).ok().filter(|l| *l as usize <= std::mem::size_of::<sockaddr_storage>())?;
        let (family, port) = inet::parse(bytes)?;
        // SAFETY: all zeroes is a valid sockaddr_storage (plain integers).
        let storage: sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut a = Addr { storage, len, family: c_int::from(family), port };
        a.bytes_mut()[..bytes.len()].copy_from_slice(bytes);
        Some(a)
    }

    /// `ip:port`, an IPv4 address.
    pub fn ipv4(ip: [u8; 4], port: u16) -> Addr {
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip) },
            sin_zero: [0; 8],
        };
        // SAFETY: a sockaddr_in viewed as its bytes, which it holds all of.
        let bytes = unsafe { std::slice::from_raw_parts((&sin as *const libc::sockaddr_in).cast::<u8>(), std::mem::size_of_val(&sin)) };
        Addr::from_bytes(bytes).expect("an IPv4 address")
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the storage is plain bytes, all of them initialised (zeroed first).
        unsafe { std::slice::from_raw_parts(self.ptr().cast::<u8>(), std::mem::size_of::<sockaddr_storage>()) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let p = (&mut self.storage as *mut sockaddr_storage).cast::<u8>();
        // SAFETY: as in `bytes`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(p, std::mem::size_of::<sockaddr_storage>()) }
    }

    /// 127.0.0.0/8, ::1 or ::ffff:127.0.0.0/104.
    pub fn is_loopback(&self) -> bool {
        inet::is_loopback(self.bytes(), self.family as u16)
    }

    pub fn with_port(mut self, port: u16) -> Addr {
        inet::set_port(self.bytes_mut(), port);
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
    styxy_preload_common::sock::sockopt(fd, opt).ok()
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
