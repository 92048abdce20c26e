//! What a `bind()` needs, decided from the policy, the mode and what the socket is —
//! no I/O. The carrier (`bind::decide`) then carries the [`Plan`] out.

use styxy_preload_common::policy::Decision;

use crate::process::Mode;

/// What the carrier knows of the socket and the process before the bind.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts {
    /// A TCP stream socket (only those are coordinated).
    pub stream: bool,
    /// `SO_REUSEPORT` is set: the program means to share the port.
    pub shares_port: bool,
    /// Fallback mode, after the tool moved on by itself: the port it first wanted.
    pub moved_from: Option<u16>,
}

/// How a `bind()` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan<'a> {
    /// As the program asked, and nobody is told.
    AsAsked(Bypass),
    /// Observe mode: as asked, and the event says what would have been coordinated.
    Observe(&'a str),
    /// Bound as asked first; only `EADDRINUSE` of a stream socket goes further: the
    /// coordinator is asked for another port of `ty` — or, for a single-instance type,
    /// the program gets the `EADDRINUSE` (never remapped). `fallback`: a tool that moves
    /// on by itself gets it too when another port would be granted.
    TryFirst { ty: &'a str, single: bool, fallback: bool },
    /// The coordinator is asked before the bind (a coordinated port, a port that may be
    /// shared, or a tool's fallback). `fallback`: a port another session holds fails
    /// with `EADDRINUSE` so that the tool moves on by itself.
    AskFirst { ty: &'a str, fallback: bool },
}

/// Why a bind goes as asked without a word (every such reason is a variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// The policy leaves the port alone: port 0, a privileged port without a
    /// `STYXY_PRELOAD_PORTS` rule, the ephemeral range, the
    /// coordinator's port, or a rule saying `off`. The policy's reason.
    Untouched(&'static str),
    /// Not a TCP stream socket: UDP and the rest are never coordinated.
    NotStream,
}

/// The plan for a bind the policy decided `decision` about.
pub fn plan<'a>(decision: &Decision<'a>, mode: Mode, facts: &Facts) -> Plan<'a> {
    let ty = match *decision {
        Decision::Untouched(why) => return Plan::AsAsked(Bypass::Untouched(why)),
        Decision::Single(ty) => return try_first(mode, facts, ty, true),
        Decision::Coordinated(ty) | Decision::OnConflict(ty) => ty,
    };
    // a socket that may share its port never fails with EADDRINUSE: two sessions would
    // silently share one reuseport group unless it is asked about first
    let ask = matches!(decision, Decision::Coordinated(_)) || facts.shares_port || facts.moved_from.is_some();
    match mode {
        Mode::Coordinate | Mode::Fallback if ask => match facts.stream {
            true => Plan::AskFirst { ty, fallback: mode == Mode::Fallback },
            false => Plan::AsAsked(Bypass::NotStream),
        },
        _ => try_first(mode, facts, ty, false),
    }
}

fn try_first<'a>(mode: Mode, facts: &Facts, ty: &'a str, single: bool) -> Plan<'a> {
    match mode {
        Mode::Observe if facts.stream => Plan::Observe(ty),
        Mode::Observe => Plan::AsAsked(Bypass::NotStream),
        _ => Plan::TryFirst { ty, single, fallback: mode == Mode::Fallback },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: Facts = Facts { stream: true, shares_port: false, moved_from: None };
    const UDP: Facts = Facts { stream: false, shares_port: false, moved_from: None };
    const SHARED: Facts = Facts { stream: true, shares_port: true, moved_from: None };
    const MOVED: Facts = Facts { stream: true, shares_port: false, moved_from: Some(8888) };

    #[test]
    fn every_branch() {
        use Decision::{Coordinated, OnConflict, Single, Untouched};
        use Mode::{Coordinate, Fallback, Observe};
        let ask = |fallback| Plan::AskFirst { ty: "dev", fallback };
        let try_ = |single| Plan::TryFirst { ty: "dev", single, fallback: false };
        let try_fallback = |single| Plan::TryFirst { ty: "dev", single, fallback: true };
        let table: &[(Decision, Mode, Facts, Plan)] = &[
            (Untouched("privileged port"), Coordinate, STREAM, Plan::AsAsked(Bypass::Untouched("privileged port"))),
            (Untouched("port 0"), Observe, STREAM, Plan::AsAsked(Bypass::Untouched("port 0"))),
            // coordinated ports are asked about first, in the modes that ask
            (Coordinated("dev"), Coordinate, STREAM, ask(false)),
            (Coordinated("dev"), Fallback, STREAM, ask(true)),
            (Coordinated("dev"), Coordinate, UDP, Plan::AsAsked(Bypass::NotStream)),
            (Coordinated("dev"), Mode::OnConflict, STREAM, try_(false)),
            (Coordinated("dev"), Observe, STREAM, Plan::Observe("dev")),
            (Coordinated("dev"), Observe, UDP, Plan::AsAsked(Bypass::NotStream)),
            // ports outside every range: bound first, unless they may be shared
            (OnConflict("dev"), Coordinate, STREAM, try_(false)),
            (OnConflict("dev"), Coordinate, UDP, try_(false)),
            (OnConflict("dev"), Coordinate, SHARED, ask(false)),
            (OnConflict("dev"), Mode::OnConflict, SHARED, try_(false)),
            (OnConflict("dev"), Fallback, MOVED, ask(true)),
            (OnConflict("dev"), Fallback, STREAM, try_fallback(false)),
            (OnConflict("dev"), Observe, STREAM, Plan::Observe("dev")),
            // single-instance types are never asked about first, shared or not
            (Single("dev"), Coordinate, STREAM, try_(true)),
            (Single("dev"), Coordinate, SHARED, try_(true)),
            (Single("dev"), Fallback, MOVED, try_fallback(true)),
            (Single("dev"), Observe, STREAM, Plan::Observe("dev")),
        ];
        for (decision, mode, facts, want) in table {
            assert_eq!(plan(decision, *mode, facts), *want, "{decision:?} {mode:?} {facts:?}");
        }
    }
}
