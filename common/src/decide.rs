//! What happens to a hooked call, decided from facts alone: pure, no I/O, `no_std` (the
//! shim includes this file). Every carrier — the shim in each process, the seccomp
//! supervisor (`bind::decide` in the supervisor's crate) and the daemon's check of a
//! shim's `KEEP` — asks these functions and carries the answer out; none
//! decides on its own (docs/ARCHITECTURE.md "A call's way").
//!
//! Here: [`plan`] for a `bind()` ([`Class`] × [`Mode`] × [`Facts`] → [`Plan`]), [`route`]
//! for a session's loopback `connect()` ([`Route`]), [`listen_way`] for a `listen()`, and
//! [`rule_class`] for a port a rule of the process's own covers.

/// What the policy says of a port, as the policy map stores it (one byte per port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Never asked about: port 0, a privileged port without a rule, the ephemeral range,
    /// the coordinator's port, a rule saying `off`.
    Untouched,
    /// A service type's range: asked about before the bind.
    Coordinated,
    /// Outside every range: bound as asked, asked about only after `EADDRINUSE`.
    OnConflict,
    /// A single-instance type: never remapped, a second instance fails as usual.
    Single,
}

impl Class {
    /// The class a policy map's byte stands for (`policymap::UNTOUCHED` …), `None` for an
    /// unknown byte.
    pub fn of_byte(b: u8) -> Option<Class> {
        match b {
            0 => Some(Class::Untouched),
            1 => Some(Class::Coordinated),
            2 => Some(Class::OnConflict),
            3 => Some(Class::Single),
            _ => None,
        }
    }

    /// Its byte in the policy map.
    pub const fn byte(self) -> u8 {
        match self {
            Class::Untouched => 0,
            Class::Coordinated => 1,
            Class::OnConflict => 2,
            Class::Single => 3,
        }
    }
}

/// How a process's binds are coordinated (`STYXY_PRELOAD_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Ask before every coordinated bind (default).
    Coordinate,
    /// Bind as asked; ask only after `EADDRINUSE`.
    OnConflict,
    /// Never change a port; log what would have been coordinated.
    Observe,
    /// For tools that move to the next port by themselves (Jupyter, Vite, http-server):
    /// a port another session holds is refused (`EADDRINUSE`), so the tool falls back and
    /// prints the URL it really serves; the session's connects to the first port follow.
    Fallback,
}

/// What the carrier can tell of the socket and the process before the bind, each fact
/// asked only when the decision needs it (each may cost the carrier a system call: an
/// uncoordinated bind asks `shares_port` alone).
pub trait SocketFacts {
    /// A TCP stream socket (only those are coordinated).
    fn stream(&mut self) -> bool;
    /// `SO_REUSEPORT` is set: the program means to share the port.
    fn shares_port(&mut self) -> bool;
    /// Fallback mode, after the tool moved on by itself: the port it first wanted.
    fn moved_from(&mut self) -> Option<u16>;
}

/// Facts known already (the daemon's check of a `KEEP`, the supervisor, tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
pub enum Plan {
    /// As the program asked, and nobody is told.
    AsAsked(Bypass),
    /// Observe mode: as asked, and the event says what would have been coordinated.
    Observe,
    /// Bound as asked first; only `EADDRINUSE` of a stream socket goes further: the
    /// coordinator is asked for another port — or, for a single-instance type, the
    /// program gets the `EADDRINUSE` (never remapped). `fallback`: a tool that moves on
    /// by itself gets it too when another port would be granted.
    TryFirst { single: bool, fallback: bool },
    /// The coordinator is asked before the bind (a coordinated port, a port that may be
    /// shared, or a tool's fallback). `fallback`: a port another session holds fails
    /// with `EADDRINUSE` so that the tool moves on by itself.
    AskFirst { fallback: bool },
}

impl SocketFacts for Facts {
    fn stream(&mut self) -> bool {
        self.stream
    }
    fn shares_port(&mut self) -> bool {
        self.shares_port
    }
    fn moved_from(&mut self) -> Option<u16> {
        self.moved_from
    }
}

/// Why a bind goes as asked without a word (every such reason is a variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// The policy leaves the port alone ([`Class::Untouched`]).
    Untouched,
    /// Not a TCP stream socket: UDP and the rest are never coordinated.
    NotStream,
}

/// The plan for a bind of a port of `class` in `mode`; of `facts`, only what the plan
/// turns on is asked (nothing for an untouched port; `SO_TYPE` not before a bind first).
pub fn plan(class: Class, mode: Mode, facts: &mut impl SocketFacts) -> Plan {
    let single = match class {
        Class::Untouched => return Plan::AsAsked(Bypass::Untouched),
        Class::Single => true,
        Class::Coordinated | Class::OnConflict => false,
    };
    // a socket that may share its port never fails with EADDRINUSE: two sessions would
    // silently share one reuseport group unless it is asked about first
    let ask = mode != Mode::Observe && !single && (class == Class::Coordinated || facts.shares_port() || facts.moved_from().is_some());
    match mode {
        Mode::Coordinate | Mode::Fallback if ask => match facts.stream() {
            true => Plan::AskFirst { fallback: mode == Mode::Fallback },
            false => Plan::AsAsked(Bypass::NotStream),
        },
        Mode::Observe if facts.stream() => Plan::Observe,
        Mode::Observe => Plan::AsAsked(Bypass::NotStream),
        _ => Plan::TryFirst { single, fallback: mode == Mode::Fallback },
    }
}

/// Where a session's loopback `connect()` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    AsAsked,
    /// The session remapped this port: connect here instead.
    To(u16),
    /// Another session's server: as if nothing listened (isolation).
    Refused,
}

/// What the port map says of a connect's port, for a process of session `tag` (not 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The session's `tag`.
    pub tag: u32,
    /// The actual port the session got for this one, if it holds one.
    pub remapped: Option<u16>,
    /// The tag of the session that holds the port, 0 if none does.
    pub holder: u32,
}

/// Where a connect to loopback `port` goes, from what the port map says. Only a stream
/// socket's connect is changed; `stream` is asked only when it would be, and `class` (the
/// port's policy class, `None` unknown) only when another session holds the port and
/// `isolate` is on.
pub fn route(port: u16, seen: Seen, isolate: bool, class: impl FnOnce() -> Option<Class>, stream: impl FnOnce() -> bool) -> Route {
    if let Some(actual) = seen.remapped.filter(|a| *a != port) {
        return if stream() { Route::To(actual) } else { Route::AsAsked };
    }
    let foreign = seen.holder != 0 && seen.holder != seen.tag;
    if foreign && isolate && class().is_some_and(|c| c != Class::Untouched) && stream() {
        return Route::Refused;
    }
    Route::AsAsked
}

/// What a `listen()` knows of its socket: its port (`None`: unnamed, not inet), whether
/// this process kept the port in one round trip, whether an ancestor did before a
/// `fork`, and whether the hooks' logic is loaded in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listening {
    pub port: Option<u16>,
    pub kept_here: bool,
    pub kept_before: bool,
}

/// The class a rule of the process's own (`STYXY_PRELOAD_PORTS`, `spec` as the
/// environment holds it) gives `port`: [`Class::Untouched`] for `off` or `none`,
/// [`Class::Coordinated`] for a type (the daemon decides with the same rules, and may say
/// otherwise: a single-instance type, an unknown one); `None` when no rule covers it.
/// Read as `Policy::add_rules` reads them: the first rule that covers the port, up to the
/// first malformed entry.
pub fn rule_class(spec: &[u8], port: u16) -> Option<Class> {
    for item in spec.split(|c| *c == b',' || c.is_ascii_whitespace()).filter(|s| !s.is_empty()) {
        let eq = item.iter().position(|c| *c == b'=')?;
        let (ports, ty) = (&item[..eq], item[eq + 1..].trim_ascii());
        let (lo, hi) = match ports.iter().position(|c| *c == b'-') {
            Some(dash) => (rule_port(&ports[..dash])?, rule_port(&ports[dash + 1..])?),
            None => (rule_port(ports)?, rule_port(ports)?),
        };
        if lo > hi {
            return None;
        }
        if (lo..=hi).contains(&port) {
            return Some(if ty == b"off" || ty == b"none" { Class::Untouched } else { Class::Coordinated });
        }
    }
    None
}

/// A rule's port: 1-65535 in decimal, spaces around it allowed.
fn rule_port(s: &[u8]) -> Option<u16> {
    let s = s.trim_ascii();
    if s.is_empty() || s.len() > 5 {
        return None;
    }
    let n = s.iter().try_fold(0u32, |n, d| d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0')))?;
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// How a `listen()` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenWay {
    /// The kernel's alone: nothing to confirm or observe.
    AsAsked,
    /// Listened, then confirmed with the daemon: an ancestor kept the port before a
    /// `fork`, and this process becomes an owner of its allocation.
    Confirm,
    /// Listened, then the port the kernel chose is told (observed): the socket was
    /// unbound, and the kernel binds it at this very listen.
    Observe,
}

/// How a `listen()` on a socket [`Listening`] says of goes.
pub fn listen_way(l: Listening) -> ListenWay {
    match l.port {
        None => ListenWay::AsAsked,
        Some(0) => ListenWay::Observe,
        Some(_) if l.kept_here => ListenWay::AsAsked,
        Some(_) if l.kept_before => ListenWay::Confirm,
        Some(_) => ListenWay::AsAsked,
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
    fn every_bind_plan() {
        use Class::{Coordinated, OnConflict, Single, Untouched};
        use Mode::{Coordinate, Fallback, Observe};
        let ask = |fallback| Plan::AskFirst { fallback };
        let try_ = |single| Plan::TryFirst { single, fallback: false };
        let try_fallback = |single| Plan::TryFirst { single, fallback: true };
        let table: &[(Class, Mode, Facts, Plan)] = &[
            (Untouched, Coordinate, STREAM, Plan::AsAsked(Bypass::Untouched)),
            (Untouched, Observe, STREAM, Plan::AsAsked(Bypass::Untouched)),
            (Untouched, Fallback, SHARED, Plan::AsAsked(Bypass::Untouched)),
            // coordinated ports are asked about first, in the modes that ask
            (Coordinated, Coordinate, STREAM, ask(false)),
            (Coordinated, Coordinate, SHARED, ask(false)),
            (Coordinated, Fallback, STREAM, ask(true)),
            (Coordinated, Coordinate, UDP, Plan::AsAsked(Bypass::NotStream)),
            (Coordinated, Mode::OnConflict, STREAM, try_(false)),
            (Coordinated, Mode::OnConflict, UDP, try_(false)),
            (Coordinated, Observe, STREAM, Plan::Observe),
            (Coordinated, Observe, UDP, Plan::AsAsked(Bypass::NotStream)),
            // ports outside every range: bound first, unless they may be shared
            (OnConflict, Coordinate, STREAM, try_(false)),
            (OnConflict, Coordinate, UDP, try_(false)),
            (OnConflict, Coordinate, SHARED, ask(false)),
            (OnConflict, Mode::OnConflict, SHARED, try_(false)),
            (OnConflict, Fallback, MOVED, ask(true)),
            (OnConflict, Fallback, STREAM, try_fallback(false)),
            (OnConflict, Observe, STREAM, Plan::Observe),
            // single-instance types are never asked about first, shared or not
            (Single, Coordinate, STREAM, try_(true)),
            (Single, Coordinate, SHARED, try_(true)),
            (Single, Fallback, MOVED, try_fallback(true)),
            (Single, Observe, STREAM, Plan::Observe),
        ];
        for (class, mode, facts, want) in table {
            assert_eq!(plan(*class, *mode, &mut facts.clone()), *want, "{class:?} {mode:?} {facts:?}");
        }
    }

    /// Facts that count what was asked.
    #[derive(Default)]
    struct Asked(Vec<&'static str>);

    impl SocketFacts for Asked {
        fn stream(&mut self) -> bool {
            self.0.push("stream");
            true
        }
        fn shares_port(&mut self) -> bool {
            self.0.push("shares_port");
            false
        }
        fn moved_from(&mut self) -> Option<u16> {
            self.0.push("moved_from");
            None
        }
    }

    #[test]
    fn only_the_facts_a_plan_turns_on_are_asked() {
        let asked = |class, mode| {
            let mut a = Asked::default();
            let p = plan(class, mode, &mut a);
            (p, a.0)
        };
        assert_eq!(asked(Class::Untouched, Mode::Coordinate), (Plan::AsAsked(Bypass::Untouched), vec![]));
        // an uncoordinated bind: whether it shares its port, not its type (a bind first)
        let try_first = Plan::TryFirst { single: false, fallback: false };
        assert_eq!(asked(Class::OnConflict, Mode::Coordinate), (try_first, vec!["shares_port", "moved_from"]));
        assert_eq!(asked(Class::Coordinated, Mode::Coordinate), (Plan::AskFirst { fallback: false }, vec!["stream"]));
        assert_eq!(asked(Class::Single, Mode::Coordinate), (Plan::TryFirst { single: true, fallback: false }, vec![]));
        assert_eq!(asked(Class::Coordinated, Mode::Observe), (Plan::Observe, vec!["stream"]));
    }

    #[test]
    fn every_class_byte_reads_back() {
        for c in [Class::Untouched, Class::Coordinated, Class::OnConflict, Class::Single] {
            assert_eq!(Class::of_byte(c.byte()), Some(c));
        }
        assert_eq!(Class::of_byte(4), None);
    }

    #[test]
    fn every_connect_route() {
        const A: u32 = 7;
        const B: u32 = 9;
        let seen = |remapped, holder| Seen { tag: A, remapped, holder };
        use Class::{Coordinated, OnConflict, Untouched};
        // name, what the map says, isolation, the port's class, a stream socket, the route
        type Case = (&'static str, Seen, bool, Option<Class>, bool, Route);
        let cases: &[Case] = &[
            ("the session's remap is followed", seen(Some(3001), B), true, Some(Coordinated), true, Route::To(3001)),
            ("… by a stream socket only", seen(Some(3001), B), true, Some(Coordinated), false, Route::AsAsked),
            ("a remap to the same port is no remap", seen(Some(3000), 0), true, Some(Coordinated), true, Route::AsAsked),
            ("another session's server is refused", seen(None, B), true, Some(Coordinated), true, Route::Refused),
            ("… but never a datagram", seen(None, B), true, Some(Coordinated), false, Route::AsAsked),
            ("… nor with isolation off", seen(None, B), false, Some(Coordinated), true, Route::AsAsked),
            ("… nor an untouched port", seen(None, B), true, Some(Untouched), true, Route::AsAsked),
            ("… nor a port of unknown class", seen(None, B), true, None, true, Route::AsAsked),
            ("an on-conflict port another session holds", seen(None, B), true, Some(OnConflict), true, Route::Refused),
            ("the session's own server", seen(None, A), true, Some(Coordinated), true, Route::AsAsked),
            ("nobody holds it", seen(None, 0), true, Some(Coordinated), true, Route::AsAsked),
        ];
        for (name, s, isolate, class, stream, want) in cases {
            assert_eq!(route(3000, *s, *isolate, || *class, || *stream), *want, "{name}");
        }
        // a fact is asked only when it matters
        let never = || -> bool { panic!("asked") };
        assert_eq!(route(3000, seen(None, 0), true, || panic!("asked"), never), Route::AsAsked);
        assert_eq!(route(3000, seen(Some(3001), B), true, || panic!("asked"), || true), Route::To(3001));
        assert_eq!(route(3000, seen(None, B), false, || panic!("asked"), never), Route::AsAsked);
    }

    #[test]
    fn every_listen_way() {
        use ListenWay::{AsAsked, Confirm, Observe};
        let l = |port, kept_here, kept_before| listen_way(Listening { port, kept_here, kept_before });
        assert_eq!(l(None, false, false), AsAsked, "not an inet socket");
        assert_eq!(l(Some(0), false, false), Observe, "bound by the kernel at this listen: observed");
        assert_eq!(l(Some(3000), false, false), AsAsked, "nothing to confirm: no map read");
        assert_eq!(l(Some(3000), true, false), AsAsked, "kept here: the daemon knows");
        assert_eq!(l(Some(3000), true, true), AsAsked, "kept here after the parent: the daemon knows");
        assert_eq!(l(Some(3000), false, true), Confirm, "an ancestor kept it: confirmed");
    }
}
