//! `bind()`: docs/ARCHITECTURE.md "A call's way". Ask the coordinator for the requested
//! port, bind a copy of the address with the granted one, retry a bounded number of
//! times when an uncoordinated process took it, and on any failure bind the original
//! address exactly as the program asked.

use std::time::Instant;

use libc::{EADDRINUSE, SOCK_STREAM};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use styxy_preload_client::api::{self, AllocateReply, AllocateRequest};
use styxy_preload_client::eventlog::Action;
use styxy_preload_client::http::{self, Endpoint, Timeouts};
use styxy_preload_client::policy::Decision;

use crate::call::{Caller, Socket, Verdict};
use crate::process::{self, Mode, Process};
use crate::report::{self, Outcome};
use crate::sys::{self, Addr};

/// Granted ports that turned out taken at OS level before we give up and bind as asked.
const MAX_RETRIES: u32 = 3;

/// A bind nobody coordinates: a privileged port, or one no service type claims.
pub fn untouched(p: &Process, orig: &Addr) -> bool {
    orig.port < 1024 || matches!(p.policy.decide(orig.port), Decision::Untouched(_))
}

/// Decides and carries out a `bind()` of `orig` on `sock` for `who`.
pub fn decide(p: &Process, who: &Caller, orig: &Addr, sock: &mut dyn Socket) -> Verdict {
    if orig.port < 1024 {
        return Verdict::AsAsked;
    }
    let decision = p.policy.decide(orig.port);
    let Some(ty) = decision.service_type() else {
        return Verdict::AsAsked;
    };
    // a socket that may share its port (SO_REUSEPORT) never fails with EADDRINUSE: two
    // sessions would silently share one reuseport group unless it is asked about first
    let shared = !matches!(decision, Decision::Single(_)) && sock.shares_port();
    // a tool falling back by itself: the port it first wanted, which its session maps here
    let moved_from = (p.mode == Mode::Fallback).then(|| fallback_origin(who.pid)).flatten();
    let ask_first = (matches!(decision, Decision::Coordinated(_)) || shared || moved_from.is_some())
        && matches!(p.mode, Mode::Coordinate | Mode::Fallback);
    if !ask_first && p.mode != Mode::Observe {
        // on-conflict ports (and Single types) are bound as asked: nothing else happens
        // unless the kernel says EADDRINUSE
        let r = sock.run(None);
        if r != Err(EADDRINUSE) || sock.sock_type() != Some(SOCK_STREAM) {
            return Verdict::Done(r);
        }
    } else if sock.sock_type() != Some(SOCK_STREAM) {
        return Verdict::AsAsked;
    }
    let started = Instant::now();
    let out = |port, action, reason: Option<String>, backend, retries| Outcome {
        call: "bind",
        requested: orig.port,
        port,
        addr: orig,
        service_type: Some(ty),
        action,
        reason,
        started,
        backend,
        retries,
    };
    let event = |o| report::event(p, who, o);
    if p.mode == Mode::Observe {
        event(out(orig.port, Action::Observed, Some("observe mode".into()), None, 0));
        return Verdict::AsAsked;
    }
    if let Decision::Single(_) = decision {
        let why = format!("single-instance type {ty}: not remapped");
        event(out(orig.port, Action::Passthrough, Some(why), None, 0));
        return Verdict::Done(Err(EADDRINUSE));
    }
    let ep = process::endpoint();
    let backend = Some(ep.backend());
    let mut req = AllocateRequest {
        service_type: ty.to_string(),
        service_name: Some(api::service_name(who.comm, orig.port)),
        preferred_port: Some(orig.port),
        instance_id: p.session.clone(),
        project_path: who.cwd.map(str::to_string),
        pid: Some(who.pid),
        requested_port: Some(moved_from.unwrap_or(orig.port)),
        comm: Some(who.comm.to_string()),
        exclude: if ask_first { vec![] } else { vec![orig.port] },
        bind: true,
        ..Default::default()
    };
    if p.mode == Mode::Fallback {
        // would this very port be granted? If not, the tool is told what the kernel would
        // tell it were the port bound: it moves on by itself and says where it went
        match allocate(ep, &AllocateRequest { dry_run: true, ..req.clone() }).map(|r| r.granted().map(|(port, _)| port)) {
            Ok(Some(port)) if port != orig.port => {
                remember_origin(who.pid, moved_from.unwrap_or(orig.port));
                // a probe the tool answers itself: not a start
                let why = format!("port {} is taken; left to {}'s own fallback", orig.port, who.comm);
                event(out(orig.port, Action::Observed, Some(why), backend, 0));
                return Verdict::Done(Err(EADDRINUSE));
            }
            Ok(_) => {}
            Err(reason) => {
                warn_once(p, who, ep, &reason);
                event(out(orig.port, Action::Passthrough, Some(reason), backend, 0));
                return Verdict::AsAsked;
            }
        }
    }
    let mut retries = 0;
    loop {
        let reply = match allocate(ep, &req) {
            Ok(r) => r,
            Err(reason) => {
                warn_once(p, who, ep, &reason);
                event(out(orig.port, Action::Passthrough, Some(reason), backend, retries));
                return Verdict::AsAsked;
            }
        };
        let Some((port, _)) = reply.granted() else {
            event(out(orig.port, Action::Passthrough, Some("no port granted".into()), backend, retries));
            return Verdict::AsAsked;
        };
        let err = match sock.run(Some(&orig.with_port(port))) {
            Ok(()) => {
                // the same process binding the same port again (a server's 0.0.0.0 and ::
                // twins, a probe then the real bind): one start, one line of consequence
                let again = twin(who.pid, orig.port, port) && reply.existing == Some(true);
                let (action, reason) = if again {
                    (Action::Observed, Some(format!("bound again by this process (a twin or after a probe) on {port}")))
                } else if port == orig.port {
                    let moved = moved_from.filter(|r| *r != port).map(|r| format!("{} moved from {r} by itself", who.comm));
                    (Action::Kept, moved)
                } else {
                    let holder = holder_text(&reply);
                    notify_remap(p, who, orig.port, port);
                    (Action::Remapped, Some(format!("port {} is taken{holder}", orig.port)))
                };
                event(out(port, action, reason, backend, retries));
                return Verdict::Done(Ok(()));
            }
            Err(e) => e,
        };
        if err == EADDRINUSE && reply.existing == Some(true) {
            // The session already holds this mapping: a second bind of the same port
            // must fail as it would without us (get-port, tests expecting EADDRINUSE).
            event(out(port, Action::Error, Some(in_use_reason(port)), backend, retries));
            return Verdict::Done(Err(EADDRINUSE));
        }
        if err != EADDRINUSE {
            // the address itself is refused (a link-local one without its scope, one this
            // host does not have): the program's own bind fails the same way, not ours
            let why = std::io::Error::from_raw_os_error(err);
            event(out(
                orig.port,
                Action::Passthrough,
                Some(format!("the kernel refuses this address ({why}), with or without the library")),
                backend,
                retries,
            ));
            return Verdict::AsAsked;
        }
        if retries >= MAX_RETRIES {
            let reason = format!("bind to granted port {port} failed: {}", std::io::Error::from_raw_os_error(err));
            event(out(orig.port, Action::Error, Some(reason), backend, retries));
            return Verdict::AsAsked;
        }
        retries += 1;
        req.exclude.push(port);
    }
}

/// The port a tool of this process first wanted before it fell back by itself (fallback
/// mode): its session maps that port to the one the tool settles on.
static ORIGIN: AtomicU64 = AtomicU64::new(0);

fn remember_origin(pid: u32, port: u16) {
    ORIGIN.store(u64::from(pid) << 16 | u64::from(port), Ordering::Relaxed);
}

fn fallback_origin(pid: u32) -> Option<u16> {
    let v = ORIGIN.load(Ordering::Relaxed);
    (v >> 16 == u64::from(pid) && v != 0).then_some(v as u16)
}

/// Remembers this process's last grant; true when (`requested` → `port`) is it again.
fn twin(pid: u32, requested: u16, port: u16) -> bool {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let key = u64::from(pid) << 32 | u64::from(requested) << 16 | u64::from(port);
    LAST.swap(key, Ordering::Relaxed) == key
}

/// Why a bind of the session's own port failed: a listener of the session serves it, or
/// an earlier server's socket lingers in TIME_WAIT (no `SO_REUSEADDR`), which fails as
/// it would without the library.
fn in_use_reason(port: u16) -> String {
    if sys::listening(port) {
        format!("the session's port {port} is served already (by another of its processes)")
    } else {
        format!("the session's port {port} is still in TIME_WAIT from an earlier server (bound without SO_REUSEADDR)")
    }
}

/// The daemon did not answer the shim in time (docs/ARCHITECTURE.md "Hook ↔ daemon
/// protocol"): the bind goes as asked, said in the log and once on stderr, without
/// asking a second time.
pub fn unanswered(p: &Process, who: &Caller, orig: &Addr) {
    let reason = "coordinator timeout";
    let ty = p.policy.decide(orig.port).service_type().map(str::to_string);
    let ep = process::endpoint();
    warn_once(p, who, ep, reason);
    report::event(
        p,
        who,
        Outcome {
            call: "bind",
            requested: orig.port,
            port: orig.port,
            addr: orig,
            service_type: ty.as_deref(),
            action: Action::Passthrough,
            reason: Some(reason.into()),
            started: Instant::now(),
            backend: Some(ep.backend()),
            retries: 0,
        },
    );
}

/// One line on stderr per process when the daemon cannot be asked, not one per bind:
/// coordination never stops silently.
fn warn_once(p: &Process, who: &Caller, ep: &Endpoint, reason: &str) {
    static WARNED: AtomicU32 = AtomicU32::new(0);
    if WARNED.swap(who.pid, Ordering::Relaxed) != who.pid {
        let fix = match reason {
            "no coordinator" | "coordinator timeout" => {
                "; start it with `styxy-preload daemon start`, or run the tool under `styxy-preload exec`"
            }
            _ => "",
        };
        report::notify(p, &format!("{reason} ({ep}): ports pass through uncoordinated{fix}"));
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

fn notify_remap(p: &Process, who: &Caller, requested: u16, port: u16) {
    report::notify(p, &format!("port {requested} is taken; {} (pid {}) got {port}", who.comm, who.pid));
}

/// Why the daemon does not answer: it is not there, or it is another user's (a server run
/// with runuser, su or sudo inside a session).
fn unreachable_reason(ep: &Endpoint) -> String {
    use std::os::unix::fs::MetadataExt;
    let Endpoint::Unix(sock) = ep else { return "no coordinator".into() };
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    // the socket, or (when its directory is closed to us) the nearest directory we can see
    let owner = match std::fs::metadata(sock) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => sock.ancestors().skip(1).find_map(|d| std::fs::metadata(d).ok()),
        r => r.ok(),
    };
    match owner {
        Some(m) if m.uid() != me => format!(
            "the session's daemon belongs to uid {} and this process runs as uid {me}: run the command under `styxy-preload exec --seccomp` to coordinate it",
            m.uid()
        ),
        _ => "no coordinator".into(),
    }
}

/// `POST /allocate` to the local daemon; the event log's reason when it fails.
pub fn allocate(ep: &Endpoint, req: &AllocateRequest) -> Result<AllocateReply, String> {
    let body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    let res = http::call(ep, "POST", "/allocate", Some(&body), Timeouts::HOOK).map_err(|e| match e {
        http::Error::Unreachable(_) => unreachable_reason(ep),
        http::Error::Timeout => "coordinator timeout".to_string(),
        e => e.to_string(),
    })?;
    match res.status {
        200 => res.json::<AllocateReply>().map_err(|e| e.to_string()),
        s => {
            let msg = res.json::<AllocateReply>().ok().and_then(|r| r.error).unwrap_or_else(|| "non-JSON error page".into());
            Err(format!("coordinator answered {s}: {msg}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_bind_of_the_sessions_port_says_why() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(in_use_reason(port).contains("served already"), "{}", in_use_reason(port));
        drop(l);
        assert!(in_use_reason(port).contains("TIME_WAIT"), "{}", in_use_reason(port));
    }

    #[test]
    fn a_twin_is_the_same_remap_in_the_same_process() {
        assert!(!twin(7, 3000, 3001));
        assert!(twin(7, 3000, 3001));
        assert!(!twin(8, 3000, 3001), "another process");
        assert!(!twin(8, 3000, 3002), "another port");
    }
}
