//! The coordinator seam of `bind()`: a [`Coordinator`] is asked whether the caller may
//! bind a port (`KEEP`), told how the bind went (`DONE`), what the caller bound without
//! asking (`NOTE`), who listens on a port another process kept (`CONFIRM`) and a connect
//! refused (`REFUSED`); [`Hook`] speaks to the local daemon on its `hook.sock` (and mailbox),
//! as the shim does, for the process the supervisor answers for.
//! Tests put a fake in its place.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libc::c_int;
use styxy_preload_common::hookproto::{self, Answer, Ask, ANSWER_LEN, ASK_LEN, DONE_MAX, FOR_CHILD, TOLD_MAX};
use styxy_preload_common::http::{self, Endpoint, Timeouts};
use styxy_preload_common::mapview;
use styxy_preload_common::reason::AskError;

use crate::process::Process;
use crate::sys::errno;

/// What a `KEEP` asks: a bind of `port` by process `pid`, as `flags` say
/// (`hookproto::MAY_MOVE` …).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeepAsk<'a> {
    pub pid: u32,
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
    pub flags: u8,
    /// Fallback mode: the port the tool first wanted, before it moved on by itself.
    pub origin: Option<u16>,
    pub session: &'a str,
    pub comm: &'a str,
}

/// What the daemon answers a `KEEP`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Bind `port` (the one asked, or another: a remap); `existing`: the session held it
    /// already. A `DONE` must follow.
    Grant { port: u16, existing: bool },
    /// Not this process's to coordinate, or refused (the daemon logged why, and says it
    /// in the line for the person): as asked.
    Declined(Option<String>),
    /// Fallback mode: not this port as it is; the tool gets `EADDRINUSE` and moves on by
    /// itself (the daemon logged it).
    Busy,
}

/// Whoever grants ports to a bind, and logs it.
pub trait Coordinator {
    /// `KEEP`: may `ask`'s process bind its port, or which one instead?
    fn keep(&mut self, ask: &KeepAsk) -> Result<Keep, AskError>;
    /// `DONE`: the bind of the port just granted ended with `errno` (0: bound); the
    /// coordinator logs it, and withdraws a new grant that failed.
    fn done(&mut self, errno: c_int);
    /// `CONFIRM`: `ask`'s process listens on `ask.port`, which another process of the tree
    /// kept (and handed down): it becomes an owner. Nothing is awaited.
    fn confirm(&mut self, ask: &KeepAsk);
    /// `REFUSED`: `ask`'s process's loopback connect to `ask.port` was refused (another
    /// session's server); the coordinator logs it and says the line to tell the person.
    fn refused(&mut self, ask: &KeepAsk) -> Option<String>;
    /// `NOTE`: what `ask`'s process did without asking, for the coordinator to log
    /// (`hookproto::NOTE_OBSERVED` …): with `NOTE_STUCK` or `NOTE_AGAIN`, it bound `got`,
    /// the port the port map says its session holds for the one asked (the coordinator
    /// makes it an owner). Nothing is awaited; false when it could not be told.
    fn note(&mut self, ask: &KeepAsk, note: u8, got: u16) -> bool;
    /// Where it is, for a person (`unix:/run/user/1000/styxy-preload/daemon.sock`).
    fn name(&self) -> String;
}

/// The local daemon's `hook.sock` (and its mailbox), beside the API socket of process
/// `p`'s daemon; the variables that name the traced process's event log
/// (`Process::log_vars`) go with what the daemon logs.
pub struct Hook<'a> {
    p: &'a Process,
    /// The exchange a grant left open, for its `DONE`.
    open: Option<(OwnedFd, [u8; ASK_LEN])>,
}

impl<'a> Hook<'a> {
    pub fn new(p: &'a Process) -> Hook<'a> {
        Hook { p, open: None }
    }

    fn path(&self) -> Option<PathBuf> {
        match &self.p.endpoint {
            Endpoint::Unix(sock) => Some(sock.with_file_name(hookproto::SOCKET)),
            Endpoint::Tcp { .. } => None,
        }
    }

    /// `ask` as the message of `kind` for the traced process (`FOR_CHILD`, its pid after
    /// the ask), with `with_vars` the variables that name its event log.
    fn message(kind: u8, ask: &KeepAsk, note: u8, port: u16, with_vars: Option<&[(&'static str, String)]>) -> Option<Vec<u8>> {
        let flags = match kind {
            hookproto::KEEP => ask.flags,
            hookproto::NOTE => ask.flags & (hookproto::MAY_MOVE | hookproto::OWN_RULES),
            _ => 0,
        };
        let wire = Ask {
            kind,
            port,
            family: ask.family,
            errno: 0,
            flags: flags | FOR_CHILD,
            origin: if kind == hookproto::NOTE { ask.port } else { ask.origin.unwrap_or(0) },
            session: ask.session.as_bytes(),
            note,
            comm: ask.comm.as_bytes(),
        };
        let mut msg = [&wire.encode()?[..], &ask.pid.to_le_bytes()].concat();
        append_vars(&mut msg, with_vars.unwrap_or_default());
        Some(msg)
    }

    /// Whether to go on waiting for the daemon's answer, `started` ago: while it beats in
    /// the port map (alive, however busy the machine), up to the hooks' patience, as the
    /// shim waits; without a port map, the hooks' budget.
    fn worth_waiting(&self, started: Instant) -> bool {
        let waited = started.elapsed();
        match self.p.portmap() {
            Some(map) => waited < Duration::from_millis(mapview::PATIENCE_MS) && map.alive(),
            None => waited < Timeouts::HOOK.total,
        }
    }
}

/// `KEY=VALUE` and a NUL for each of `vars` (the variables that name an event log), as
/// many as fit in a message of at most `DONE_MAX` bytes.
fn append_vars(msg: &mut Vec<u8>, vars: &[(&'static str, String)]) {
    for (k, v) in vars {
        let entry = format!("{k}={v}\0");
        if msg.len() + entry.len() <= DONE_MAX {
            msg.extend_from_slice(entry.as_bytes());
        }
    }
}

/// One wait on the daemon (a send, an answer) before its beat is looked at again.
const SLICE: Duration = Duration::from_millis(100);

impl Coordinator for Hook<'_> {
    fn keep(&mut self, ask: &KeepAsk) -> Result<Keep, AskError> {
        self.open = None;
        let fallback = ask.flags & hookproto::FALLBACK != 0;
        // in fallback mode the daemon logs a BUSY itself: where, the variables say
        let vars = fallback.then_some(self.p.log_vars.as_slice());
        let msg = Hook::message(hookproto::KEEP, ask, 0, ask.port, vars)
            .ok_or_else(|| AskError::Garbled("a session id longer than 100 bytes".into()))?;
        let started = Instant::now();
        let conn = self.connect(true)?;
        send(&conn, &msg).map_err(|_| AskError::Timeout)?;
        let mut buf = [0u8; TOLD_MAX];
        let n = loop {
            match recv(&conn, &mut buf) {
                Ok(n) => break n,
                Err(libc::EAGAIN) if self.worth_waiting(started) => continue,
                Err(libc::EAGAIN) => return Err(AskError::Timeout),
                Err(_) => return Err(AskError::NoCoordinator),
            }
        };
        let closed = || {
            AskError::Garbled(
                "the daemon closed the exchange unanswered (an older daemon? `styxy-preload daemon stop`, then run again)".into(),
            )
        };
        let answer = buf.get(..n.min(ANSWER_LEN)).and_then(Answer::decode).ok_or_else(closed)?;
        let may_move = ask.flags & hookproto::MAY_MOVE != 0;
        // only what the ask allows, as the shim takes it
        Ok(match answer.status {
            hookproto::GRANTED if answer.port == ask.port => self.granted(conn, ask, answer),
            hookproto::MOVED if may_move && answer.port != 0 && answer.port != ask.port => self.granted(conn, ask, answer),
            hookproto::BUSY if fallback => Keep::Busy,
            status => Keep::Declined(
                Answer::line_of(&buf[..n], status).filter(|l| !l.is_empty()).map(|l| String::from_utf8_lossy(l).into_owned()),
            ),
        })
    }

    fn done(&mut self, errno: c_int) {
        let Some((conn, mut head)) = self.open.take() else { return };
        head[8..12].copy_from_slice(&errno.to_le_bytes());
        let mut msg = head.to_vec();
        append_vars(&mut msg, &self.p.log_vars);
        let _ = send(&conn, &msg);
    }

    fn confirm(&mut self, ask: &KeepAsk) {
        if let (Some(msg), Ok(conn)) = (Hook::message(hookproto::CONFIRM, ask, 0, ask.port, None), self.connect(false)) {
            let _ = send(&conn, &msg);
        }
    }

    fn refused(&mut self, ask: &KeepAsk) -> Option<String> {
        let msg = Hook::message(hookproto::REFUSED, ask, 0, ask.port, Some(&self.p.log_vars))?;
        let conn = self.connect(false).ok()?;
        send(&conn, &msg).ok()?;
        let mut buf = [0u8; TOLD_MAX];
        let n = recv(&conn, &mut buf).ok()?;
        Answer::told_line(&buf[..n]).map(|l| String::from_utf8_lossy(l).into_owned())
    }

    fn note(&mut self, ask: &KeepAsk, note: u8, got: u16) -> bool {
        let Some(msg) = Hook::message(hookproto::NOTE, ask, note, got, Some(&self.p.log_vars)) else { return false };
        // the mailbox wakes no one (the daemon reads it within its beat); else a connection
        self.mail(&msg) || self.connect(false).is_ok_and(|conn| send(&conn, &msg).is_ok())
    }

    fn name(&self) -> String {
        self.p.endpoint.to_string()
    }
}

impl Hook<'_> {
    /// The grant `answer` to `ask`: its `DONE` is sent on `conn` once the bind is made.
    fn granted(&mut self, conn: OwnedFd, ask: &KeepAsk, answer: Answer) -> Keep {
        let done = Ask {
            kind: hookproto::DONE,
            port: answer.port,
            family: ask.family,
            errno: 0,
            flags: 0,
            origin: 0,
            session: ask.session.as_bytes(),
            note: 0,
            comm: ask.comm.as_bytes(),
        };
        self.open = done.encode().map(|d| (conn, d));
        Keep::Grant { port: answer.port, existing: answer.existing }
    }

    /// `msg` left in the daemon's mailbox (a socket of our uid beside `hook.sock`), never
    /// waiting; false when it could not be.
    fn mail(&self, msg: &[u8]) -> bool {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let Some(path) = self.path().map(|p| p.with_file_name(hookproto::MAILBOX)) else { return false };
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket() && m.uid() == me) {
            return false;
        }
        let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return false };
        sock.set_nonblocking(true).is_ok() && sock.send_to(msg, &path).is_ok_and(|n| n == msg.len())
    }

    /// A connection to `hook.sock`. For a `KEEP` (`wake`), a daemon that is not there yet
    /// (started a moment ago, or socket-activated: `hook.sock` exists only while it runs)
    /// is woken and waited for on its API socket, then asked once more; what is only told
    /// never waits for one.
    fn connect(&self, wake: bool) -> Result<OwnedFd, AskError> {
        let path = self.path().ok_or(AskError::NoCoordinator)?;
        match connect(&path) {
            Ok(fd) => return Ok(fd),
            Err(_) if !wake => return Err(AskError::NoCoordinator),
            Err(_) => {}
        }
        match http::call_waiting(&self.p.endpoint, "GET", "/status", None, Timeouts::HOOK) {
            Ok(_) => connect(&path).map_err(|_| AskError::NoCoordinator),
            Err(http::Error::Timeout) => Err(AskError::Timeout),
            Err(_) => Err(unreachable(&self.p.endpoint)),
        }
    }
}

/// A `SOCK_SEQPACKET` connection to `path` (close-on-exec), whose sends and receives wait
/// at most [`SLICE`] at a time.
fn connect(path: &Path) -> std::io::Result<OwnedFd> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    sock.set_write_timeout(Some(SLICE))?;
    sock.set_read_timeout(Some(SLICE))?;
    sock.connect(&SockAddr::unix(path)?)?;
    Ok(sock.into())
}

fn send(fd: &OwnedFd, msg: &[u8]) -> Result<(), c_int> {
    // SAFETY: send of a buffer of its length on our own socket.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL) };
    if n == msg.len() as isize {
        Ok(())
    } else {
        Err(errno())
    }
}

/// One message, waiting at most [`SLICE`] (`EAGAIN` when none came); 0 bytes when the
/// daemon closed the connection.
fn recv(fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, c_int> {
    loop {
        // SAFETY: recv into a buffer of its length on our own socket.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) if errno() == libc::EINTR => continue,
            Err(_) => return Err(errno()),
        }
    }
}

/// Why the daemon does not answer: it is not there, or it is another user's (a server run
/// with runuser, su or sudo inside a session).
fn unreachable(ep: &Endpoint) -> AskError {
    use std::os::unix::fs::MetadataExt;
    let Endpoint::Unix(sock) = ep else { return AskError::NoCoordinator };
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    // the socket, or (when its directory is closed to us) the nearest directory we can see
    let owner = match std::fs::metadata(sock) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => sock.ancestors().skip(1).find_map(|d| std::fs::metadata(d).ok()),
        r => r.ok(),
    };
    match owner {
        Some(m) if m.uid() != me => AskError::OtherUser { owner: m.uid(), me },
        _ => AskError::NoCoordinator,
    }
}
