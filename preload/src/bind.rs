//! `bind()`: DESIGN.md "The hooked calls". Ask the coordinator for the requested
//! port, bind a copy of the address with the granted one, retry a bounded number of
//! times when an uncoordinated process took it, and on any failure bind the original
//! address exactly as the program asked.

use std::time::Instant;

use libc::{c_int, sockaddr, socklen_t, EADDRINUSE, SOCK_STREAM};
use styxy_preload_client::api::{self, AllocateReply, AllocateRequest};
use styxy_preload_client::eventlog::Action;
use styxy_preload_client::http::{self, Endpoint, Timeouts};
use styxy_preload_client::policy::Decision;

use crate::process::{self, Mode, Process};
use crate::report::{self, Outcome};
use crate::sys::{self, Addr, AddrFn};

/// Granted ports that turned out taken at OS level before we give up and bind as asked.
const MAX_RETRIES: u32 = 3;

pub unsafe fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t, real: AddrFn) -> c_int {
    let entry_errno = sys::errno();
    let plain = || {
        sys::set_errno(entry_errno);
        real(fd, addr, len)
    };
    let Some(orig) = Addr::read(addr, len) else {
        return plain();
    };
    let p = process::get();
    let decision = p.policy.decide(orig.port);
    let Some(ty) = decision.service_type().map(str::to_string) else {
        return plain();
    };
    let ask_first = matches!(decision, Decision::Coordinated(_)) && p.mode == Mode::Coordinate;
    if !ask_first && p.mode != Mode::Observe {
        // on-conflict ports (and Single types) are bound as asked: nothing else happens
        // unless the kernel says EADDRINUSE
        let rc = plain();
        if rc == 0 || sys::errno() != EADDRINUSE || sys::sock_type(fd) != Some(SOCK_STREAM) {
            return rc;
        }
    } else if sys::sock_type(fd) != Some(SOCK_STREAM) {
        return plain();
    }
    let started = Instant::now();
    let out = |port, action, reason: Option<String>, backend, retries| Outcome {
        call: "bind",
        requested: orig.port,
        port,
        addr: &orig,
        service_type: Some(&ty),
        action,
        reason,
        started,
        backend,
        retries,
    };
    if p.mode == Mode::Observe {
        let rc = plain();
        report::event(p, out(orig.port, Action::Observed, Some("observe mode".into()), None, 0));
        return rc;
    }
    if let Decision::Single(_) = decision {
        let why = format!("single-instance type {ty}: not remapped");
        report::event(p, out(orig.port, Action::Passthrough, Some(why), None, 0));
        sys::set_errno(EADDRINUSE);
        return -1;
    }
    let Some(ep) = process::endpoint() else {
        let rc = plain();
        report::event(p, out(orig.port, Action::Passthrough, Some("no coordinator".into()), None, 0));
        return rc;
    };
    let mut req = AllocateRequest {
        service_type: ty.clone(),
        service_name: Some(api::service_name(&p.comm, orig.port)),
        preferred_port: Some(orig.port),
        instance_id: p.session.clone(),
        project_path: p.cwd.clone(),
        pid: Some(process::pid()),
        requested_port: Some(orig.port),
        comm: Some(p.comm.clone()),
        exclude: if ask_first { vec![] } else { vec![orig.port] },
        ..Default::default()
    };
    let backend = Some(ep.backend());
    let mut retries = 0;
    loop {
        let reply = match allocate(ep, &req) {
            Ok(r) => r,
            Err(reason) => {
                let rc = plain();
                report::event(p, out(orig.port, Action::Passthrough, Some(reason), backend, retries));
                return rc;
            }
        };
        let Some((port, _lock)) = reply.granted() else {
            let rc = plain();
            report::event(p, out(orig.port, Action::Passthrough, Some("no port granted".into()), backend, retries));
            return rc;
        };
        let target = orig.with_port(port);
        sys::set_errno(entry_errno);
        let rc = real(fd, target.ptr(), target.len());
        if rc == 0 {
            sys::set_errno(entry_errno);
            let (action, reason) = if port == orig.port {
                (Action::Kept, None)
            } else {
                let holder = holder_text(&reply);
                notify_remap(p, orig.port, port, &holder);
                (Action::Remapped, Some(format!("port {} is taken{holder}", orig.port)))
            };
            report::event(p, out(port, action, reason, backend, retries));
            return 0;
        }
        let err = sys::errno();
        if err == EADDRINUSE && reply.existing == Some(true) {
            // The session already holds this mapping: a second bind of the same port
            // must fail as it would without us (get-port, tests expecting EADDRINUSE).
            report::event(p, out(port, Action::Error, Some("session already holds this port".into()), backend, retries));
            sys::set_errno(EADDRINUSE);
            return -1;
        }
        if err != EADDRINUSE || retries >= MAX_RETRIES {
            let rc = plain();
            let reason = format!("bind to granted port {port} failed: {}", std::io::Error::from_raw_os_error(err));
            report::event(p, out(orig.port, Action::Error, Some(reason), backend, retries));
            return rc;
        }
        retries += 1;
        req.exclude.push(port);
    }
}

fn holder_text(reply: &AllocateReply) -> String {
    match &reply.holder {
        Some(h) => match (&h.session, h.pid, &h.comm) {
            (Some(s), Some(pid), Some(c)) => format!(" by {c} (pid {pid}, session {s})"),
            (None, Some(pid), Some(c)) => format!(" by {c} (pid {pid})"),
            (Some(s), _, _) => format!(" by session {s}"),
            _ => String::new(),
        },
        None => String::new(),
    }
}

fn notify_remap(p: &Process, requested: u16, port: u16, _holder: &str) {
    report::notify(p, &format!("port {requested} is taken; {} (pid {}) got {port}", p.comm, process::pid()));
}

/// `POST /allocate`; the reason of any failure is what the event log says.
pub fn allocate(ep: &Endpoint, req: &AllocateRequest) -> Result<AllocateReply, String> {
    let body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    let res = http::call(ep, "POST", "/allocate", Some(&body), Timeouts::HOOK).map_err(|e| match e {
        http::Error::Unreachable(_) => "no coordinator".to_string(),
        http::Error::Timeout => "coordinator timeout".to_string(),
        e => e.to_string(),
    })?;
    match res.status {
        200 => res.json::<AllocateReply>().map_err(|e| e.to_string()),
        429 => Err("rate limited (429)".into()),
        401 => Err("coordinator refused the token (401)".into()),
        s => {
            let msg = res.json::<AllocateReply>().ok().and_then(|r| r.error).unwrap_or_else(|| "non-JSON error page".into());
            Err(format!("coordinator answered {s}: {msg}"))
        }
    }
}
