//! `listen()`: confirms a coordinated port (the pid becomes an owner of its
//! allocation) and observes listens on port 0 or unbound sockets. Never changes anything.

use std::time::Instant;

use serde_json::json;
use styxy_preload_client::eventlog::Action;
use styxy_preload_client::http::{self, Timeouts};
use styxy_preload_client::policy::Decision;

use crate::call::{Caller, Socket, Verdict};
use crate::process::{self, Mode, Process};
use crate::report::{self, Outcome};

/// Makes the `listen()` on `sock`, then tells the daemon or the log about it.
pub fn decide(p: &Process, who: &Caller, sock: &mut dyn Socket) -> Verdict {
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
            // the pid becomes an owner of this port's allocation
            let body = json!({"pid": who.pid, "instance_id": p.session, "port": a.port, "project_path": who.cwd});
            let _ = http::call(process::endpoint(), "POST", "/register-instance", Some(body.to_string().as_bytes()), Timeouts::HOOK);
        }
        _ => {}
    }
    Verdict::Done(Ok(()))
}
