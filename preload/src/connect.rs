//! `connect()` inside a session (DESIGN.md "session port virtualisation"): a loopback
//! connect to a port this session remapped goes to the actual port; one to a
//! coordinated port another session holds is refused, as if nothing listened. Two
//! reads of the shared port map, no round trip.

use libc::{c_int, sockaddr, socklen_t, ECONNREFUSED, SOCK_STREAM};
use styxy_preload_client::policy::Decision;

use crate::process;
use crate::sys::{self, Addr, AddrFn};

pub unsafe fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t, real: AddrFn) -> c_int {
    let entry_errno = sys::errno();
    let plain = || {
        sys::set_errno(entry_errno);
        real(fd, addr, len)
    };
    let Some(orig) = Addr::read(addr, len) else {
        return plain();
    };
    let p = process::get();
    if p.tag == 0 {
        return plain();
    }
    let Some(map) = process::portmap() else {
        return plain();
    };
    if let Some(actual) = map.lookup(p.tag, orig.port).filter(|a| *a != orig.port) {
        if sys::sock_type(fd) == Some(SOCK_STREAM) {
            let target = orig.with_port(actual);
            sys::set_errno(entry_errno);
            return real(fd, target.ptr(), target.len());
        }
        return plain();
    }
    if p.isolate {
        let holder = map.held(orig.port);
        if holder != 0
            && holder != p.tag
            && !matches!(p.policy.decide(orig.port), Decision::Untouched(_))
            && sys::sock_type(fd) == Some(SOCK_STREAM)
        {
            sys::set_errno(ECONNREFUSED);
            return -1;
        }
    }
    plain()
}
