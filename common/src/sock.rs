//! Reading a socket's integer options (`getsockopt(2)` at `SOL_SOCKET`): the daemon
//! checks a socket systemd handed it, the preload library the caller's socket.

use libc::{c_int, socklen_t};

/// An integer `SOL_SOCKET` option of the socket `fd` (`SO_TYPE`, `SO_DOMAIN`,
/// `SO_REUSEPORT`, `SO_ACCEPTCONN`, …).
pub fn sockopt(fd: c_int, opt: c_int) -> std::io::Result<c_int> {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: valid out-pointers to a c_int and its size.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut c_int).cast(), &mut len) };
    if rc == 0 {
        Ok(v)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn options_of_a_listener_and_of_no_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(sockopt(l.as_raw_fd(), libc::SO_TYPE).unwrap(), libc::SOCK_STREAM);
        assert_eq!(sockopt(l.as_raw_fd(), libc::SO_ACCEPTCONN).unwrap(), 1);
        assert_eq!(sockopt(-1, libc::SO_TYPE).unwrap_err().raw_os_error(), Some(libc::EBADF));
    }
}
