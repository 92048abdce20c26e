//! `listen()`: confirms a coordinated port (the pid becomes an owner of its
//! allocation) and observes listens on port 0 or unbound sockets. Never changes anything.

use std::time::{Duration, Instant};

use serde_json::json;
use styxy_preload_common::eventlog::Action;
use styxy_preload_common::http::{self, Timeouts};
use styxy_preload_common::policy::Decision;

use crate::call::{Caller, Socket, Verdict};
use crate::process::{Mode, Process};
use crate::report::{self, Outcome};

/// A listen confirmation's budget (a local daemon answers in well under 1 ms), past which
/// it waits only for a daemon that beats.
const CONFIRM: Timeouts = Timeouts { connect: Duration::from_millis(20), total: Duration::from_millis(50), max_body: 4096 };

/// Makes the `listen()` on `sock`, then tells the daemon or the log about it.
pub fn decide(p: &Process, who: &Caller, sock: &mut dyn Socket) -> Verdict {
    if !sock.reachable() {
        return Verdict::AsAsked;
    }
    let before = sock.local_addr();
    let r = sock.run(None);
    if r.is_err() {
        return Verdict::Done(r);
    }
    let started = Instant::now();
    match before {
        Some(a) if a.port == 0 => {
            // the kernel picked a port at listen(): observe it
            if let Some(now) = sock.local_addr() {
                let outcome = Outcome {
                    call: "listen",
                    requested: 0,
                    port: now.port,
                    addr: &now,
                    service_type: None,
                    action: Action::Observed,
                    reason: Some("port chosen by the kernel".into()),
                    started,
                    backend: None,
                    retries: 0,
                };
                report::event(p, who, outcome);
            }
        }
        Some(a) if p.mode != Mode::Observe && matches!(p.policy.decide(a.port), Decision::Coordinated(_)) => {
            // the pid becomes an owner of this port's allocation, which it confirms; the
            // bind before it may have used most of the hook's budget already
            let body = json!({"pid": who.pid, "instance_id": p.session, "port": a.port, "project_path": who.cwd});
            let _ = http::call_waiting(&p.endpoint, "POST", "/register-instance", Some(body.to_string().as_bytes()), CONFIRM);
        }
        _ => {}
    }
    Verdict::Done(Ok(()))
}
