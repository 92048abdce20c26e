//! `bind()`: docs/ARCHITECTURE.md "A call's way". [`plan`] (common's `decide`, the one
//! decision) says from the policy, the mode and the socket what the bind needs;
//! [`decide`] carries that out over two seams — the caller's [`Socket`] and a
//! [`Coordinator`] — in small named steps: bind as asked
//! first, ask first (a fallback's dry run), allocate and bind with bounded retries when
//! an uncoordinated process took the granted port, and say what happened. Every way a
//! bind ends has a [`Reason`]; on any failure the original address is bound exactly as
//! the program asked.

mod ask;

pub use ask::{Coordinator, Daemon};
pub use styxy_preload_common::decide::{plan, Bypass, Class, Facts, Plan};
pub use styxy_preload_common::reason::{AskError, Reason};

use std::time::Instant;

use libc::{EADDRINUSE, SOCK_STREAM};
use styxy_preload_common::api::{self, AllocateReply, AllocateRequest};
use styxy_preload_common::eventlog::Action;
use styxy_preload_common::policy::Decision;

use crate::call::{Caller, Socket, Verdict};
use crate::process::{Mode, Process};
use crate::report::{self, Outcome};
use crate::sys::Addr;

/// Granted ports that turned out taken at OS level before we give up and bind as asked.
const MAX_RETRIES: u32 = 3;

/// A bind nobody coordinates: the policy leaves its port alone.
pub fn untouched(p: &Process, orig: &Addr) -> bool {
    matches!(p.policy.decide(orig.port), Decision::Untouched(_))
}

/// Decides and carries out a `bind()` of `orig` on `sock` for `who`.
pub fn decide(p: &Process, who: &Caller, orig: &Addr, sock: &mut dyn Socket, coord: &mut dyn Coordinator) -> Verdict {
    let decision = p.policy.decide(orig.port);
    let Some(ty) = decision.service_type().filter(|_| sock.reachable()) else {
        return Verdict::AsAsked;
    };
    let facts = Facts {
        stream: sock.sock_type() == Some(SOCK_STREAM),
        shares_port: sock.shares_port(),
        moved_from: (p.mode == Mode::Fallback).then(|| p.memory.origin(who.pid)).flatten(),
    };
    let b = Bind { p, who, orig, ty, started: Instant::now(), backend: coord.backend() };
    match plan(Class::of(&decision), p.mode, &mut { facts }) {
        Plan::AsAsked(_) => Verdict::AsAsked,
        Plan::Observe => {
            b.event(orig.port, Action::Observed, Some(Reason::ObserveMode), 0);
            Verdict::AsAsked
        }
        Plan::TryFirst { single, fallback } => try_first(&b, single, fallback, facts.stream, sock, coord),
        Plan::AskFirst { fallback } => ask_first(&b, fallback, facts.moved_from, sock, coord),
    }
}

/// One bind being carried out: who asked, for what, and where its events go.
struct Bind<'a> {
    p: &'a Process,
    who: &'a Caller<'a>,
    orig: &'a Addr,
    ty: &'a str,
    started: Instant,
    backend: &'static str,
}

impl Bind<'_> {
    fn event(&self, port: u16, action: Action, reason: Option<Reason>, retries: u32) {
        let outcome = Outcome {
            call: "bind",
            requested: self.orig.port,
            port,
            addr: self.orig,
            service_type: Some(self.ty).filter(|t| !t.is_empty()),
            action,
            reason: reason.map(|r| r.to_string()),
            started: self.started,
            backend: Some(self.backend),
            retries,
        };
        report::event(self.p, self.who, outcome);
    }

    /// The request for this bind; `moved_from` is the port the tool first wanted.
    fn request(&self, moved_from: Option<u16>, exclude: Vec<u16>) -> AllocateRequest {
        AllocateRequest {
            service_name: Some(api::service_name(self.who.comm, self.orig.port)),
            instance_id: self.p.session.clone(),
            project_path: self.who.cwd.map(str::to_string),
            pid: Some(self.who.pid),
            requested_port: Some(moved_from.unwrap_or(self.orig.port)),
            comm: Some(self.who.comm.to_string()),
            exclude,
            bind: true,
            ..AllocateRequest::for_port(self.ty, self.orig.port)
        }
    }

    /// The coordinator could not be asked: said once on stderr, logged, bound as asked.
    fn unasked(&self, e: AskError, coord: &dyn Coordinator, retries: u32) -> Verdict {
        warn_once(self.p, self.who, coord, &e);
        self.event(self.orig.port, Action::Passthrough, Some(Reason::Unasked(e)), retries);
        Verdict::AsAsked
    }
}

/// Bound as asked; only `EADDRINUSE` of a stream socket asks for another port.
fn try_first(b: &Bind, single: bool, fallback: bool, stream: bool, sock: &mut dyn Socket, coord: &mut dyn Coordinator) -> Verdict {
    let r = sock.run(None);
    if r != Err(EADDRINUSE) || !stream {
        return Verdict::Done(r);
    }
    if single {
        b.event(b.orig.port, Action::Passthrough, Some(Reason::SingleInstance(b.ty.to_string())), 0);
        return Verdict::Done(Err(EADDRINUSE));
    }
    let req = b.request(None, vec![b.orig.port]);
    if let Some(v) = fallback.then(|| leave_to_the_tool(b, &req, None, coord)).flatten() {
        return v;
    }
    allocate_and_bind(b, req, None, sock, coord)
}

/// Asked before the bind. A tool that falls back by itself (`fallback`) is first told,
/// as the kernel would tell it, that a port another session holds is taken.
fn ask_first(b: &Bind, fallback: bool, moved_from: Option<u16>, sock: &mut dyn Socket, coord: &mut dyn Coordinator) -> Verdict {
    let req = b.request(moved_from, vec![]);
    if let Some(v) = fallback.then(|| leave_to_the_tool(b, &req, moved_from, coord)).flatten() {
        return v;
    }
    allocate_and_bind(b, req, moved_from, sock, coord)
}

/// Fallback mode: would `req` be granted this very port? If not, the tool is told what
/// the kernel would tell it were the port bound (`EADDRINUSE`): it moves on by itself
/// and says where it went. `None`: the port would be granted, go on.
fn leave_to_the_tool(b: &Bind, req: &AllocateRequest, moved_from: Option<u16>, coord: &mut dyn Coordinator) -> Option<Verdict> {
    match coord.allocate(&AllocateRequest { dry_run: true, ..req.clone() }).map(|r| r.port_and_lock().map(|(port, _)| port)) {
        Ok(Some(port)) if port != b.orig.port => {
            b.p.memory.remember_origin(b.who.pid, moved_from.unwrap_or(b.orig.port));
            // a probe the tool answers itself: not a start
            let why = Reason::LeftToOwnFallback { port: b.orig.port, comm: b.who.comm.to_string() };
            b.event(b.orig.port, Action::Observed, Some(why), 0);
            Some(Verdict::Done(Err(EADDRINUSE)))
        }
        Ok(_) => None,
        Err(e) => Some(b.unasked(e, coord, 0)),
    }
}

/// Asks for a port and binds it; a granted port someone uncoordinated took is excluded
/// and asked again, at most [`MAX_RETRIES`] times.
fn allocate_and_bind(
    b: &Bind,
    mut req: AllocateRequest,
    moved_from: Option<u16>,
    sock: &mut dyn Socket,
    coord: &mut dyn Coordinator,
) -> Verdict {
    let mut last = (b.orig.port, EADDRINUSE);
    for retries in 0..=MAX_RETRIES {
        let reply = match coord.allocate(&req) {
            Ok(r) => r,
            Err(e) => return b.unasked(e, coord, retries),
        };
        let Some((port, _)) = reply.port_and_lock() else {
            b.event(b.orig.port, Action::Passthrough, Some(Reason::NoPortGranted), retries);
            return Verdict::AsAsked;
        };
        match sock.run(Some(&b.orig.with_port(port))) {
            Ok(()) => return bound(b, port, &reply, moved_from, retries),
            // the session already holds this mapping: a second bind of the same port
            // fails as it would without us (get-port, tests expecting EADDRINUSE)
            Err(EADDRINUSE) if reply.existing == Some(true) => {
                b.event(port, Action::Error, Some(Reason::session_port_in_use(port)), retries);
                return Verdict::Done(Err(EADDRINUSE));
            }
            Err(EADDRINUSE) => {
                req.exclude.push(port);
                last = (port, EADDRINUSE);
            }
            Err(e) => {
                // the program's own bind fails the same way, not ours
                b.event(b.orig.port, Action::Passthrough, Some(Reason::KernelRefuses(e)), retries);
                return Verdict::AsAsked;
            }
        }
    }
    let why = Reason::GrantedPortTaken { port: last.0, errno: last.1 };
    b.event(b.orig.port, Action::Error, Some(why), MAX_RETRIES);
    Verdict::AsAsked
}

/// The granted `port` is bound: kept, remapped (one notice), or the same process binding
/// the same port again (a twin, a probe then the real bind: one start, one line).
fn bound(b: &Bind, port: u16, reply: &AllocateReply, moved_from: Option<u16>, retries: u32) -> Verdict {
    let (pid, comm) = (b.who.pid, b.who.comm);
    let again = b.p.memory.twin(pid, b.orig.port, port) && reply.existing == Some(true);
    let (action, reason) = if again {
        (Action::Observed, Some(Reason::BoundAgain(port)))
    } else if port == b.orig.port {
        (Action::Kept, moved_from.filter(|from| *from != port).map(|from| Reason::MovedByItself { comm: comm.to_string(), from }))
    } else {
        report::notify(b.p, &format!("port {} is taken; {comm} (pid {pid}) got {port}", b.orig.port));
        (Action::Remapped, Some(Reason::Taken { port: b.orig.port, holder: holder_text(reply) }))
    };
    b.event(port, action, reason, retries);
    Verdict::Done(Ok(()))
}

/// The daemon did not answer the shim in time (docs/ARCHITECTURE.md "Hook ↔ daemon
/// protocol"): the bind goes as asked, said in the log and once on stderr, without
/// asking a second time.
pub fn unanswered(p: &Process, who: &Caller, orig: &Addr) {
    let coord = Daemon(&p.endpoint);
    let ty = p.policy.decide(orig.port).service_type().unwrap_or_default();
    let b = Bind { p, who, orig, ty, started: Instant::now(), backend: coord.backend() };
    b.unasked(AskError::Timeout, &coord, 0);
}

/// One line on stderr per process when the daemon cannot be asked, not one per bind:
/// coordination never stops silently.
fn warn_once(p: &Process, who: &Caller, coord: &dyn Coordinator, e: &AskError) {
    if p.memory.first_warning(who.pid) {
        report::notify(p, &format!("{e} ({}){}{}", coord.name(), styxy_preload_common::hookproto::PASS_THROUGH, e.fix()));
    }
}

fn holder_text(reply: &AllocateReply) -> String {
    reply.holder.as_ref().map(api::Holder::describe).unwrap_or_default()
}

#[cfg(test)]
mod tests;
