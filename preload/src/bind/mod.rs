//! `bind()`: docs/ARCHITECTURE.md "A call's way". [`plan`] (common's `decide`, the one
//! decision) says from the policy, the mode and the socket what the bind needs;
//! [`decide`] carries that out over two seams — the caller's [`Socket`] and a
//! [`Coordinator`] — as the shim does: bind as asked first, or ask first; a port the daemon
//! keeps for the caller (`KEEP`, on `hook.sock`) is bound and the result told (`DONE`), and
//! a granted port someone uncoordinated took is asked again, at most [`MAX_RETRIES`]
//! times. A process binding again a port it kept asks no one, and the session's own port
//! (the port map's answer) is bound first and told (`NOTE`). The daemon writes the events,
//! of what it is asked and of what it is told (observe mode, a single-instance type's
//! `EADDRINUSE`: a `NOTE`); this writes only what no daemon could be asked or told. Every
//! way a bind ends has a [`Reason`]; on any failure the original address is bound exactly
//! as the program asked.

mod ask;

pub use ask::{Coordinator, Hook, Keep, KeepAsk};
pub use styxy_preload_common::decide::{plan, Bypass, Class, Facts, Plan};
pub use styxy_preload_common::reason::{AskError, Reason};

use std::time::Instant;

use libc::{EADDRINUSE, SOCK_STREAM};
use styxy_preload_common::eventlog::Action;
use styxy_preload_common::hookproto;
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
    let b = Bind { p, who, orig, ty, started: Instant::now() };
    // what the daemon plans with, as the shim says it: the mode, the process's own rules
    let mode_flag = match p.mode {
        Mode::Fallback => hookproto::FALLBACK,
        Mode::OnConflict => hookproto::ON_CONFLICT_MODE,
        _ => 0,
    };
    let own = if p.own_rule(orig.port) { hookproto::OWN_RULES } else { 0 };
    let may_move = |fallback: bool| if fallback { 0 } else { hookproto::MAY_MOVE };
    let family = if orig.family == libc::AF_INET6 { 6 } else { 4 };
    let session = p.session.as_deref().unwrap_or("");
    let ask = KeepAsk { pid: who.pid, port: orig.port, family, flags: own, origin: None, session, comm: who.comm };
    match plan(Class::of(&decision), p.mode, &mut { facts }) {
        Plan::AsAsked(_) => Verdict::AsAsked,
        Plan::Observe => {
            if !coord.note(&ask, hookproto::NOTE_OBSERVED, orig.port) {
                b.event(Action::Observed, Reason::ObserveMode);
            }
            Verdict::AsAsked
        }
        Plan::TryFirst { single, fallback } => {
            let r = sock.run(None);
            if r != Err(EADDRINUSE) || !facts.stream {
                return Verdict::Done(r);
            }
            if single {
                // a single-instance type's EADDRINUSE stands, and the daemon logs why
                if !coord.note(&ask, hookproto::NOTE_SINGLE, orig.port) {
                    b.event(Action::Passthrough, Reason::SingleInstance(ty.to_string()));
                }
                return Verdict::Done(Err(EADDRINUSE));
            }
            keep(&b, &KeepAsk { flags: hookproto::TAKEN | mode_flag | own | may_move(fallback), ..ask }, sock, coord)
        }
        Plan::AskFirst { fallback } => {
            let shares = if facts.shares_port { hookproto::SHARES_PORT } else { 0 };
            let flags = shares | mode_flag | own | may_move(fallback);
            keep(&b, &KeepAsk { flags, origin: facts.moved_from, ..ask }, sock, coord)
        }
    }
}

/// One bind being carried out: who asked, and for what.
struct Bind<'a> {
    p: &'a Process,
    who: &'a Caller<'a>,
    orig: &'a Addr,
    ty: &'a str,
    started: Instant,
}

impl Bind<'_> {
    /// The bind's event, written here: what no daemon could be told.
    fn event(&self, action: Action, reason: Reason) {
        let outcome = Outcome {
            call: "bind",
            requested: self.orig.port,
            port: self.orig.port,
            addr: self.orig,
            service_type: Some(self.ty).filter(|t| !t.is_empty()),
            action,
            reason: Some(reason.to_string()),
            started: self.started,
            backend: Some("unix"),
            retries: 0,
        };
        report::event(self.p, self.who, outcome);
    }

    /// The coordinator could not be asked: said once on stderr, logged, bound as asked.
    fn unasked(&self, e: AskError, coord: &dyn Coordinator) -> Verdict {
        if self.p.memory.first_warning(self.who.pid) {
            report::notify(self.p, &format!("{e} ({}){}{}", coord.name(), hookproto::PASS_THROUGH, e.fix()));
        }
        self.event(Action::Passthrough, Reason::Unasked(e));
        Verdict::AsAsked
    }
}

/// A coordinated bind in one exchange with the daemon (`ask.flags`: `hookproto::MAY_MOVE`
/// …; `ask.origin`: the port a tool in fallback mode first wanted): the port it keeps for
/// the caller, or another, is bound and the result told; a tool that moves on by itself is
/// told `EADDRINUSE` (`BUSY`). A granted port someone uncoordinated took is asked again.
fn keep(b: &Bind, ask: &KeepAsk, sock: &mut dyn Socket, coord: &mut dyn Coordinator) -> Verdict {
    if let Some(v) = unasked_for(b, ask, sock, coord) {
        return v;
    }
    let (pid, port) = (ask.pid, ask.port);
    for _ in 0..=MAX_RETRIES {
        let (got, existing) = match coord.keep(ask) {
            Ok(Keep::Grant { port, existing }) => (port, existing),
            Ok(Keep::Busy) => {
                // not this tool's as it is: it moves on by itself, and its session's
                // connects to the first port follow (the daemon logged it)
                b.p.memory.remember_origin(pid, ask.origin.unwrap_or(port));
                return Verdict::Done(Err(EADDRINUSE));
            }
            Ok(Keep::Declined(line)) => {
                if let Some(line) = line.filter(|_| b.p.memory.first_warning(pid)) {
                    report::notify(b.p, &line);
                }
                return Verdict::AsAsked;
            }
            Err(e) => return b.unasked(e, coord),
        };
        let r = sock.run((got != port).then(|| b.orig.with_port(got)).as_ref());
        coord.done(r.err().unwrap_or(0));
        match r {
            Ok(()) => return bound(b, got),
            // the session serves this port already: a second bind fails as it would
            // without us (get-port, tests expecting EADDRINUSE); the daemon said why
            Err(EADDRINUSE) if existing => return Verdict::Done(Err(EADDRINUSE)),
            // someone uncoordinated took the grant: asked again (the daemon logged it)
            Err(EADDRINUSE) => {}
            // the kernel refuses the address itself: the program's own bind fails the same way
            Err(_) => return Verdict::AsAsked,
        }
    }
    Verdict::AsAsked
}

/// A coordinated bind no one needs to be asked about: a port the process kept before
/// (a probe then the real bind, a restart, a twin: a kernel call alone), or the session's
/// own port ([`stuck_to`]), bound and told. `None`: it must ask — also a port it kept
/// that is taken now: the supervisor remembers pids, and a pid is reused (after 32,768
/// processes where `kernel.pid_max` is its default), so the process may be another one.
fn unasked_for(b: &Bind, ask: &KeepAsk, sock: &mut dyn Socket, coord: &mut dyn Coordinator) -> Option<Verdict> {
    let (pid, port) = (ask.pid, ask.port);
    if ask.flags & hookproto::TAKEN == 0 && b.p.memory.kept_here(pid, port) {
        return match sock.run(None) {
            Err(EADDRINUSE) => None,
            // a privileged port we may not bind: the kernel's, as the program made it
            Err(libc::EACCES) => Some(Verdict::AsAsked),
            r => Some(Verdict::Done(r)),
        };
    }
    let got = stuck_to(b.p, port, ask.flags)?;
    // taken meanwhile, or refused: asked as any bind
    sock.run((got != port).then(|| b.orig.with_port(got)).as_ref()).ok()?;
    let note = if b.p.memory.kept_here(pid, got) { hookproto::NOTE_AGAIN } else { hookproto::NOTE_STUCK };
    coord.note(ask, note, got);
    Some(bound(b, got))
}

/// The session's own port for `port` (docs/ARCHITECTURE.md "Session stickiness"), as the
/// shim finds it: the port map of a daemon that beats says the session holds a port for
/// it — what a `KEEP` would be answered again (a server restarted, a second process of
/// the session) — bound with no round trip. Only for a plain ask (no other flag than
/// `MAY_MOVE`, which another port needs).
fn stuck_to(p: &Process, port: u16, flags: u8) -> Option<u16> {
    if p.tag == 0 || flags & !hookproto::MAY_MOVE != 0 {
        return None;
    }
    let map = p.portmap().filter(|m| m.alive())?;
    let got = map.found(p.tag, port).0.filter(|g| map.held(*g) == p.tag)?;
    (got == port || flags & hookproto::MAY_MOVE != 0).then_some(got)
}

/// The caller's socket is bound to `got`, its process's now; a move is told the person
/// once (a twin, or a probe then the real bind, is one move).
fn bound(b: &Bind, got: u16) -> Verdict {
    let (pid, comm, asked) = (b.who.pid, b.who.comm, b.orig.port);
    b.p.memory.remember_kept(pid, got);
    if !b.p.memory.twin(pid, asked, got) && got != asked {
        report::notify(b.p, &format!("port {asked} is taken; {comm} (pid {pid}) got {got}"));
    }
    Verdict::Done(Ok(()))
}

#[cfg(test)]
mod tests;
