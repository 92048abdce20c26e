//! What the hooks tell: one event per decision in the log, and one stderr line when a
//! port changed (`notify`: never blocking, never into a network socket or a file the
//! program opened as fd 2).

use styxy_preload_common::eventlog::{self, Action, Event};

use crate::call::Caller;
use crate::process::Process;
use crate::sys::{self, Addr};

pub struct Outcome<'a> {
    pub call: &'static str,
    pub requested: u16,
    pub port: u16,
    pub addr: &'a Addr,
    pub service_type: Option<&'a str>,
    pub action: Action,
    pub reason: Option<String>,
    pub started: std::time::Instant,
    pub backend: Option<&'static str>,
    pub retries: u32,
}

/// Appends the event; errno is left as it was (the log write must not leak into it).
pub fn event(p: &Process, who: &Caller, o: Outcome) {
    let errno = sys::errno();
    let ev = Event {
        ts: eventlog::now_ms(),
        session: p.session.clone(),
        pid: who.pid,
        comm: who.comm.to_string(),
        call: o.call.to_string(),
        requested_port: o.requested,
        port: o.port,
        family: o.addr.family_name().to_string(),
        service_type: o.service_type.map(str::to_string),
        action: o.action,
        reason: o.reason,
        latency_us: o.started.elapsed().as_micros() as u64,
        backend: o.backend.map(str::to_string),
        retries: o.retries,
    };
    let _ = p.log.append(&ev);
    sys::set_errno(errno);
}

/// Set by `exec` when its own stderr is a regular file (`cmd 2>log`): `<dev>:<ino>` of
/// that file. A regular file at fd 2 is written to only when it is this one: otherwise the
/// program closed fd 2 and reopened one of its own data files there.
pub const STDERR_FILE_ENV: &str = "STYXY_PRELOAD_STDERR";

/// `<dev>:<ino>` of this process's stderr when it is a regular file: what `exec` (its
/// tree's) and `env` (its shell's, `cmd 2>log`) hand down as [`STDERR_FILE_ENV`].
pub fn stderr_file() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/self/fd/2").ok().filter(|m| m.file_type().is_file())?;
    Some(format!("{}:{}", m.dev(), m.ino()))
}

/// One line on stderr, if notifications are on and fd 2 is safe to write to: a terminal, a
/// pipe or a Unix socket (Node's `child_process` gives children a socketpair), or the
/// regular file `exec` was started with. Never a network socket, never another file, and
/// never a wait: a full pipe or socket drops the line.
pub fn notify(p: &Process, line: &str) {
    if !p.notify {
        return;
    }
    let errno = sys::errno();
    let msg = format!("styxy-preload: {}\n", styxy_preload_common::text::cell(line));
    let _ = write_stderr(msg.as_bytes(), p.stderr_file.as_deref());
    sys::set_errno(errno);
}

fn write_stderr(msg: &[u8], stderr_file: Option<&str>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

    let fd2 = std::path::Path::new("/proc/self/fd/2");
    let meta = std::fs::metadata(fd2)?;
    let kind = meta.mode() & libc::S_IFMT;
    if kind == libc::S_IFSOCK {
        // SAFETY: getsockopt/send on fd 2 with valid buffers; MSG_DONTWAIT never waits.
        unsafe {
            if sys::sockopt(2, libc::SO_DOMAIN) != Some(libc::AF_UNIX) {
                return Ok(()); // TCP/UDP: the program's peer would read our line
            }
            libc::send(2, msg.as_ptr().cast(), msg.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        }
        return Ok(());
    }
    if kind == libc::S_IFREG {
        // only exec's own `2>file`, or the log a shell redirect made of both stdout and
        // stderr (`> log 2>&1`), through the program's description: its offset moves on,
        // so the program's next line follows ours instead of overwriting it (a regular
        // file never makes a write wait)
        if stderr_file == Some(format!("{}:{}", meta.dev(), meta.ino()).as_str()) || stdout_is_stderr() {
            // SAFETY: write of a valid buffer to fd 2.
            unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        }
        return Ok(());
    }
    // a pipe: written only when the line fits in it now (a write of at most PIPE_BUF bytes
    // is atomic: all of it, at once, or nothing) — never a wait on a reader
    if kind == libc::S_IFIFO {
        if msg.len() <= libc::PIPE_BUF && pipe_room(2).is_some_and(|room| room >= msg.len()) {
            // SAFETY: write of a valid buffer to fd 2.
            unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        }
        return Ok(());
    }
    if kind != libc::S_IFCHR {
        return Ok(());
    }
    // a terminal: through a description of our own, O_NONBLOCK without touching the program's
    let mut f = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC).open(fd2)?;
    f.write(msg).map(|_| ())
}

/// Whether fd 1 and fd 2 are one open file description (`> log 2>&1`, `&> log`): a log a
/// shell made for the program's output. A data file the program itself opened lands at
/// fd 2 alone (after a `close(2)`), never duplicated onto its stdout.
fn stdout_is_stderr() -> bool {
    // SAFETY: getpid cannot fail; kcmp compares two of this process's fds, no memory.
    let rc = unsafe {
        let me = libc::getpid();
        libc::syscall(libc::SYS_kcmp, me, me, 0 /* KCMP_FILE */, 1, 2)
    };
    match rc {
        0 => true,
        1..=3 => false,
        // no kcmp here (a kernel without it, a seccomp filter): one description shares
        // its offset and flags, read from /proc
        _ => {
            let info = |fd: u8| std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok();
            let same_file = |m: &std::fs::Metadata, n: &std::fs::Metadata| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino()) == (n.dev(), n.ino())
            };
            let meta = |fd: u8| std::fs::metadata(format!("/proc/self/fd/{fd}")).ok();
            matches!((meta(1), meta(2)), (Some(a), Some(b)) if same_file(&a, &b)) && info(1).is_some() && info(1) == info(2)
        }
    }
}

/// Bytes a pipe can take now: its size less what waits in it.
fn pipe_room(fd: libc::c_int) -> Option<usize> {
    // SAFETY: fcntl and ioctl on fd 2 with a valid out-pointer.
    unsafe {
        let size = libc::fcntl(fd, libc::F_GETPIPE_SZ);
        let mut queued: libc::c_int = 0;
        if size < 0 || libc::ioctl(fd, libc::FIONREAD, &mut queued) != 0 {
            return None;
        }
        usize::try_from(size - queued).ok()
    }
}

/// A connect refused because another session's server holds the port (isolation): an
/// `isolated` event once per process and port in a row (not once per retry of a client
/// polling it), and once per process one stderr line naming that server and how to reach
/// one's own.
pub fn refused(p: &Process, who: &Caller, addr: &Addr) {
    if !p.memory.first_refusal(who.pid, addr.port) {
        return;
    }
    let errno = sys::errno();
    let started = std::time::Instant::now();
    let holder = holder(p, addr.port);
    let reason = format!("port {} is {holder}", addr.port);
    let ty = match p.policy.decide(addr.port) {
        styxy_preload_common::policy::Decision::Untouched(_) => None,
        d => d.service_type(),
    };
    let o = Outcome {
        call: "connect",
        requested: addr.port,
        port: addr.port,
        addr,
        service_type: ty,
        action: Action::Isolated,
        reason: Some(reason),
        started,
        backend: None,
        retries: 0,
    };
    event(p, who, o);
    if p.memory.first_refusal_told(who.pid) {
        let session = p.session.as_deref().unwrap_or("?");
        notify(
            p,
            &format!(
                "connect to port {port} refused: it is {holder}; session {session} has no server on {port} — start yours in this \
                 session (then {port} leads to it), see every session's with `styxy-preload ports`, or run with `exec --no-isolate` \
                 to reach other sessions' servers",
                port = addr.port
            ),
        );
    }
    sys::set_errno(errno);
}

/// Who holds `port`, as the daemon knows it (`GET /check/PORT`): "session A's server
/// (python3, pid 4242)", or "another session's server" when it cannot say.
fn holder(p: &Process, port: u16) -> String {
    use styxy_preload_common::http::{self, Timeouts};
    let known = http::call(&p.endpoint, "GET", &format!("/check/{port}"), None, Timeouts::HOOK)
        .ok()
        .filter(|r| r.status == 200)
        .and_then(|r| r.json::<serde_json::Value>().ok())
        .map(|v| v["allocated_to"].clone())
        .filter(|a| a.is_object());
    let Some(a) = known else { return "another session's server".into() };
    let session = a["instance_id"].as_str().unwrap_or("?");
    let comm = a["comm"].as_str().unwrap_or("?");
    match a["process_id"].as_u64() {
        Some(pid) => format!("session {session}'s server ({comm}, pid {pid})"),
        None => format!("session {session}'s server ({comm})"),
    }
}
