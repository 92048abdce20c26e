//! What the hooks tell: one event per decision in the log, and one stderr line when
//! a port changed — only when fd 2 is a terminal, a pipe or a file, never a socket.

use styxy_preload_client::eventlog::{self, Action, Event};

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
    let _ = eventlog::append(&p.log_path, &ev);
    sys::set_errno(errno);
}

/// One line on stderr, if notifications are on and fd 2 is safe to write to.
pub fn notify(p: &Process, line: &str) {
    if !p.notify {
        return;
    }
    let errno = sys::errno();
    // SAFETY: fstat into a zeroed struct; write of a valid buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(2, &mut st) == 0 {
            let kind = st.st_mode & libc::S_IFMT;
            if kind == libc::S_IFCHR || kind == libc::S_IFIFO || kind == libc::S_IFREG {
                let msg = format!("styxy-preload: {line}\n");
                let _ = libc::write(2, msg.as_ptr().cast(), msg.len());
            }
        }
    }
    sys::set_errno(errno);
}
