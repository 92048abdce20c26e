//! Why a bind ended as it did: the event log's `reason`, one variant per case, each
//! worded here once for every writer (the daemon, and the seccomp supervisor for what no
//! daemon could be asked or told).

use std::fmt;

use crate::{eventlog, hookproto};

#[allow(non_camel_case_types)]
type c_int = i32;

/// The reason an event gives for a bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Observe mode: nothing is changed.
    ObserveMode,
    /// A single-instance type's port is taken: the program gets `EADDRINUSE`.
    SingleInstance(String),
    /// The coordinator could not be asked.
    Unasked(AskError),
    /// The same process bound the same port again (a twin, a probe then the real bind).
    BoundAgain(u16),
    /// Remapped: the port was taken, by `holder` (" by node (pid 4, session a)" or "").
    Taken { port: u16, holder: String },
    /// A bind of a port the session already holds failed: one of its processes serves it.
    SessionPortServed(u16),
    /// A bind of a port the session already holds failed: an earlier server's socket
    /// lingers in TIME_WAIT (it bound without `SO_REUSEADDR`), as without the library.
    SessionPortInTimeWait(u16),
    /// Observed at `listen()`: the kernel chose the port of an unbound socket.
    KernelChose,
    /// The kernel refuses the address itself (a link-local one without its scope, one
    /// this host does not have): the program's own bind fails the same way.
    KernelRefuses(c_int),
    /// Every port granted was taken at OS level by someone uncoordinated.
    GrantedPortTaken { port: u16, errno: c_int },
}

/// Why the coordinator could not be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AskError {
    /// Nothing answers on the daemon's socket.
    NoCoordinator,
    /// The session's daemon is another user's (a server run with runuser, su or sudo).
    OtherUser { owner: u32, me: u32 },
    /// The daemon did not answer within the hook's budget.
    Timeout,
    /// It answered with an error status.
    Refused { status: u16, message: String },
    /// It answered something we do not understand.
    Garbled(String),
}

impl AskError {
    /// Said to a person with the fix, when coordination stops for the process.
    pub fn fix(&self) -> &'static str {
        match self {
            AskError::NoCoordinator | AskError::Timeout => hookproto::START_IT,
            _ => "",
        }
    }
}

impl fmt::Display for AskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AskError::NoCoordinator => write!(f, "{}", hookproto::NO_COORDINATOR),
            AskError::OtherUser { owner, me } => {
                let [a, b, c] = hookproto::OTHER_USER;
                write!(f, "{a}{owner}{b}{me}{c}")
            }
            AskError::Timeout => write!(f, "{}", hookproto::TIMEOUT),
            AskError::Refused { status, message } => write!(f, "coordinator answered {status}: {message}"),
            AskError::Garbled(e) => write!(f, "{e}"),
        }
    }
}

impl Reason {
    /// Why a bind of `port`, which the session holds already, failed with `EADDRINUSE`:
    /// one of its processes serves it, or an earlier server's socket lingers.
    pub fn session_port_in_use(port: u16) -> Reason {
        if crate::procinfo::listening(port) {
            Reason::SessionPortServed(port)
        } else {
            Reason::SessionPortInTimeWait(port)
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let os = |e: &c_int| std::io::Error::from_raw_os_error(*e);
        match self {
            Reason::ObserveMode => write!(f, "observe mode"),
            Reason::KernelChose => write!(f, "port chosen by the kernel"),
            Reason::SingleInstance(ty) => write!(f, "single-instance type {ty}: not remapped"),
            Reason::Unasked(e) => write!(f, "{e}"),
            Reason::BoundAgain(port) => write!(f, "{}", eventlog::bound_again(*port)),
            Reason::Taken { port, holder } => write!(f, "{}", eventlog::taken(*port, holder)),
            Reason::SessionPortServed(port) => write!(f, "the session's port {port} is served already (by another of its processes)"),
            Reason::SessionPortInTimeWait(port) => {
                write!(f, "the session's port {port} is still in TIME_WAIT from an earlier server (bound without SO_REUSEADDR)")
            }
            Reason::KernelRefuses(e) => write!(f, "the kernel refuses this address ({}), with or without the library", os(e)),
            Reason::GrantedPortTaken { port, errno } => write!(f, "bind to granted port {port} failed: {}", os(errno)),
        }
    }
}
