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

/// `<dev>:<ino>` of this process's stderr when it is a regular file: what `exec` (its
/// tree's) and `env` (its shell's, `cmd 2>log`) hand down as `envvars::STDERR`.
pub fn stderr_file() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/self/fd/2").ok().filter(|m| m.file_type().is_file())?;
    Some(format!("{}:{}", m.dev(), m.ino()))
}

/// One line on stderr, if notifications are on, under the one rule for where a line of
/// ours may go (`styxy_preload_common::notice`: a terminal, a pipe with room, a Unix
/// socket, `exec`'s own `2>file`; never a wait).
pub fn notify(p: &Process, line: &str) {
    if !p.notify {
        return;
    }
    let errno = sys::errno();
    let msg = format!("styxy-preload: {}\n", styxy_preload_common::text::cell(line));
    styxy_preload_common::notice::write_line(msg.as_bytes(), p.stderr_file.as_deref().map(str::as_bytes));
    sys::set_errno(errno);
}
