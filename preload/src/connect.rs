//! `connect()` inside a session (docs/ARCHITECTURE.md "A call's way"): a loopback
//! connect to a port this session remapped goes to the actual port; one to a
//! coordinated port another session holds is refused, as if nothing listened. Two
//! reads of the shared port map, no round trip; a refusal is told ([`refused`]).

use libc::{c_int, SOCK_STREAM};
use styxy_preload_common::decide::{self, Class, Seen};

use crate::bind::{Coordinator, KeepAsk};
use crate::call::{Caller, Route};
use crate::process::Process;
use crate::report;
use crate::sys::Addr;

/// Where a connect to `orig` goes (common's `decide::route`, the one decision);
/// `sock_type` is asked only when the port matters.
pub fn route(p: &Process, orig: &Addr, sock_type: &mut dyn FnMut() -> Option<c_int>) -> Route {
    if p.tag == 0 || !orig.is_loopback() {
        return Route::AsAsked;
    }
    let Some(map) = p.portmap() else {
        return Route::AsAsked;
    };
    let (remapped, holder) = map.found(p.tag, orig.port);
    let seen = Seen { tag: p.tag, remapped, holder };
    let class = || Some(Class::of(&p.policy.decide(orig.port)));
    match decide::route(orig.port, seen, p.isolate, class, || sock_type() == Some(SOCK_STREAM)) {
        decide::Route::AsAsked => Route::AsAsked,
        decide::Route::To(actual) => Route::To(orig.with_port(actual)),
        decide::Route::Refused => Route::Refused,
    }
}

/// `who`'s connect to `orig` was refused (another session's server): the daemon is told
/// (`coord`: it logs it and says who serves the port), once per process and port in a row
/// (not once per retry of a client polling it), and the person hears it once a process.
pub fn refused(p: &Process, who: &Caller, orig: &Addr, coord: &mut dyn Coordinator) {
    if !p.memory.first_refusal(who.pid, orig.port) {
        return;
    }
    let family = if orig.family == libc::AF_INET6 { 6 } else { 4 };
    let session = p.session.as_deref().unwrap_or("");
    let ask = KeepAsk { pid: who.pid, port: orig.port, family, flags: 0, origin: None, session, comm: who.comm };
    if let Some(line) = coord.refused(&ask).filter(|_| p.memory.first_refusal_told(who.pid)) {
        report::notify(p, &line);
    }
}

#[cfg(test)]
mod tests {
    //! Every way `route` ends, over a real port map in a private directory: the daemon's
    //! side of it is written here as the daemon writes it.

    use libc::SOCK_DGRAM;
    use styxy_preload_common::portmap::PortMap;
    use styxy_preload_common::session::tag;

    use super::*;
    use crate::testing::World;

    /// `session` (None: a process outside any session) holds `port`, which it asked as
    /// `requested`: as the daemon writes it.
    fn holds(map: &PortMap, session: Option<&str>, requested: u16, port: u16) {
        let t = session.map(tag).unwrap_or(0);
        map.set_held(port, t);
        if t != 0 {
            map.insert(t, requested, port);
        }
    }

    /// A process of `session` (None: outside any) with `vars`, in world `w`.
    fn process(w: &World, session: Option<&str>, vars: &[(&str, &str)]) -> Process {
        let mut all = vec![("STYXY_PRELOAD_SESSION", session.unwrap_or(""))];
        all.extend_from_slice(vars);
        w.process(&all)
    }

    /// Where a connect goes, as a comparable shape: None as asked, Some(None) refused,
    /// Some(Some(port)) to the session's port.
    fn shape(r: Route) -> Option<Option<u16>> {
        match r {
            Route::AsAsked => None,
            Route::Refused => Some(None),
            Route::To(a) => Some(Some(a.port)),
        }
    }

    /// A case: its name, the caller's session and environment, the address, the socket's
    /// type, and where the connect goes ([`shape`]).
    type Case = (&'static str, Option<&'static str>, &'static [(&'static str, &'static str)], [u8; 4], u16, c_int, Option<Option<u16>>);

    #[test]
    fn every_way_a_connect_goes() {
        let w = World::new(&[]);
        let map = PortMap::create(&w.runtime().join("ports.map")).unwrap();
        holds(&map, Some("a"), 3000, 3000); // session a serves 3000
        holds(&map, Some("b"), 3000, 3001); // session b was moved to 3001
        holds(&map, None, 8000, 8000); // a server outside any session
        holds(&map, Some("a"), 40000, 40000); // a port nobody coordinates (the ephemeral range)
        let lo = [127, 0, 0, 1];
        let cases: &[Case] = &[
            ("outside any session: as asked", None, &[], lo, 3000, SOCK_STREAM, None),
            ("another host: as asked", Some("b"), &[], [10, 0, 0, 1], 3000, SOCK_STREAM, None),
            ("the session's remap is followed", Some("b"), &[], lo, 3000, SOCK_STREAM, Some(Some(3001))),
            ("a datagram never follows", Some("b"), &[], lo, 3000, SOCK_DGRAM, None),
            ("another session's server is refused", Some("c"), &[], lo, 3000, SOCK_STREAM, Some(None)),
            ("… unless isolation is off", Some("c"), &[("STYXY_PRELOAD_ISOLATE", "Off")], lo, 3000, SOCK_STREAM, None),
            ("… and never for a datagram", Some("c"), &[], lo, 3000, SOCK_DGRAM, None),
            ("the session's own server", Some("a"), &[], lo, 3000, SOCK_STREAM, None),
            ("a server outside any session stays reachable", Some("c"), &[], lo, 8000, SOCK_STREAM, None),
            ("a port nobody coordinates", Some("c"), &[], lo, 40000, SOCK_STREAM, None),
            ("the actual port itself", Some("c"), &[], lo, 3001, SOCK_STREAM, Some(None)),
        ];
        for (name, session, vars, ip, port, ty, want) in cases {
            let p = process(&w, *session, vars);
            let mut asked = false;
            let got = route(&p, &Addr::ipv4(*ip, *port), &mut || {
                asked = true;
                Some(*ty)
            });
            assert_eq!(shape(got), *want, "{name}");
            assert!(asked || want.is_none(), "{name}: decided without looking at the socket");
        }
    }

    #[test]
    fn without_a_daemon_every_connect_goes_as_asked() {
        let w = World::new(&[]);
        let p = process(&w, Some("c"), &[]);
        assert_eq!(shape(route(&p, &Addr::ipv4([127, 0, 0, 1], 3000), &mut || Some(SOCK_STREAM))), None);
    }
}
