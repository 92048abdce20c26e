//! The seam between the decisions (`bind`, `listen`, `connect`) and whoever carries
//! them out: this library inside the calling process, or `exec`'s seccomp supervisor
//! holding a copy of the caller's socket. One decision path for both.

use libc::c_int;

use crate::sys::Addr;

/// The process that made the call.
pub struct Caller<'a> {
    pub pid: u32,
    pub comm: &'a str,
    pub cwd: Option<&'a str>,
}

/// The caller's socket, and the hooked call on it.
pub trait Socket {
    /// The socket can be worked on (the supervisor took a copy of it). When it cannot,
    /// the call runs as the program made it, whatever would have been decided.
    fn reachable(&mut self) -> bool;
    /// `SO_TYPE`, or `None` when it cannot be read.
    fn sock_type(&mut self) -> Option<c_int>;
    /// `SO_REUSEPORT` is set (the program means to share the port).
    fn shares_port(&mut self) -> bool;
    /// The bound address (port 0 when unbound).
    fn local_addr(&mut self) -> Option<Addr>;
    /// Makes the call (bind or listen) — with `addr` instead of the program's own
    /// address when given. The errno on failure.
    fn run(&mut self, addr: Option<&Addr>) -> Result<(), c_int>;
}

/// How a hooked `bind()` or `listen()` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to change: the program's call runs as it made it.
    AsAsked,
    /// The call was made: its result, or its errno.
    Done(Result<(), c_int>),
}

/// Where a hooked `connect()` goes.
#[derive(Clone, Copy)]
pub enum Route {
    AsAsked,
    /// The session remapped this port: connect here instead.
    To(Addr),
    /// Another session's server: as if nothing listened.
    Refused,
}
