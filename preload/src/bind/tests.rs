//! Every branch of `bind::decide`, over a fake socket and a fake coordinator: what the
//! program gets, which ports were bound, what was asked, and the event written.

use std::collections::{BTreeMap, VecDeque};

use libc::{c_int, EADDRINUSE, EADDRNOTAVAIL};
use styxy_preload_common::api::{AllocateReply, AllocateRequest, Holder};
use styxy_preload_common::eventlog::Action;

use super::*;
use crate::testing::World;

/// The caller's socket: which ports the kernel refuses, and what was bound.
struct FakeSocket {
    asked: u16,
    stream: bool,
    shares: bool,
    reachable: bool,
    /// port → errno the kernel answers a bind of it with; any other port binds.
    refused: BTreeMap<u16, c_int>,
    bound: Vec<u16>,
}

impl Socket for FakeSocket {
    fn reachable(&mut self) -> bool {
        self.reachable
    }
    fn sock_type(&mut self) -> Option<c_int> {
        Some(if self.stream { libc::SOCK_STREAM } else { libc::SOCK_DGRAM })
    }
    fn shares_port(&mut self) -> bool {
        self.shares
    }
    fn local_addr(&mut self) -> Option<Addr> {
        None
    }
    fn run(&mut self, addr: Option<&Addr>) -> Result<(), c_int> {
        let port = addr.map_or(self.asked, |a| a.port);
        self.bound.push(port);
        self.refused.get(&port).map_or(Ok(()), |e| Err(*e))
    }
}

/// A coordinator answering from a script, keeping what it was asked.
#[derive(Default)]
struct FakeCoordinator {
    replies: VecDeque<Result<AllocateReply, AskError>>,
    asked: Vec<AllocateRequest>,
}

impl Coordinator for FakeCoordinator {
    fn allocate(&mut self, req: &AllocateRequest) -> Result<AllocateReply, AskError> {
        self.asked.push(req.clone());
        self.replies.pop_front().expect("asked more often than the test expects")
    }
    fn backend(&self) -> &'static str {
        "fake"
    }
    fn name(&self) -> String {
        "the fake".into()
    }
}

fn grant(port: u16) -> Result<AllocateReply, AskError> {
    Ok(AllocateReply { success: Some(true), port: Some(port), ..Default::default() })
}

fn existing(port: u16) -> Result<AllocateReply, AskError> {
    Ok(AllocateReply { success: Some(true), existing: Some(true), port: Some(port), ..Default::default() })
}

fn taken(port: u16) -> Result<AllocateReply, AskError> {
    let holder = Holder { session: Some("a".into()), pid: Some(7), comm: Some("node".into()) };
    Ok(AllocateReply { success: Some(true), port: Some(port), holder: Some(holder), ..Default::default() })
}

/// A bind of 127.0.0.1:`port` on `sock` in world `w`, answered by `coord`.
fn bind_in(w: &World, port: u16, sock: &mut FakeSocket, coord: &mut FakeCoordinator) -> Verdict {
    let who = Caller { pid: 4242, comm: "srv", cwd: Some("/w") };
    sock.asked = port;
    decide(&w.p, &who, &loopback(port), sock, coord)
}

fn loopback(port: u16) -> Addr {
    Addr::ipv4([127, 0, 0, 1], port)
}

fn tcp() -> FakeSocket {
    FakeSocket { asked: 0, stream: true, shares: false, reachable: true, refused: BTreeMap::new(), bound: vec![] }
}

fn refusing(port: u16, errno: c_int) -> FakeSocket {
    let mut s = tcp();
    s.refused.insert(port, errno);
    s
}

fn script(replies: impl IntoIterator<Item = Result<AllocateReply, AskError>>) -> FakeCoordinator {
    FakeCoordinator { replies: replies.into_iter().collect(), asked: vec![] }
}

/// One case: the bind's port, the environment, the socket and the coordinator's answers;
/// then the verdict, the ports bound, the ports excluded in each ask, and the event.
struct Case {
    name: &'static str,
    vars: &'static [(&'static str, &'static str)],
    port: u16,
    sock: FakeSocket,
    replies: Vec<Result<AllocateReply, AskError>>,
    verdict: Verdict,
    bound: &'static [u16],
    asks: &'static [&'static [u16]],
    event: Option<(Action, u16, &'static str)>,
}

#[test]
fn every_branch_of_a_bind() {
    let udp = FakeSocket { stream: false, ..tcp() };
    let shared = FakeSocket { shares: true, ..refusing(12000, EADDRINUSE) };
    let done = Verdict::Done(Ok(()));
    let in_use = Verdict::Done(Err(EADDRINUSE));
    let cases = vec![
        Case {
            name: "a privileged port",
            vars: &[],
            port: 80,
            sock: tcp(),
            replies: vec![],
            verdict: Verdict::AsAsked,
            bound: &[],
            asks: &[],
            event: None,
        },
        Case {
            name: "a privileged port a rule gives a type",
            vars: &[("STYXY_PRELOAD_PORTS", "80=dev")],
            port: 80,
            sock: tcp(),
            replies: vec![grant(80)],
            verdict: done,
            bound: &[80],
            asks: &[&[]],
            event: Some((Action::Kept, 80, "")),
        },
        Case {
            name: "a free coordinated port",
            vars: &[],
            port: 3000,
            sock: tcp(),
            replies: vec![grant(3000)],
            verdict: done,
            bound: &[3000],
            asks: &[&[]],
            event: Some((Action::Kept, 3000, "")),
        },
        Case {
            name: "a coordinated port another session holds",
            vars: &[],
            port: 3000,
            sock: tcp(),
            replies: vec![taken(3001)],
            verdict: done,
            bound: &[3001],
            asks: &[&[]],
            event: Some((Action::Remapped, 3001, "port 3000 is taken by node (pid 7, session a)")),
        },
        Case {
            name: "UDP",
            vars: &[],
            port: 3000,
            sock: udp,
            replies: vec![],
            verdict: Verdict::AsAsked,
            bound: &[],
            asks: &[],
            event: None,
        },
        Case {
            name: "a socket the supervisor cannot reach",
            vars: &[],
            port: 3000,
            sock: FakeSocket { reachable: false, ..tcp() },
            replies: vec![],
            verdict: Verdict::AsAsked,
            bound: &[],
            asks: &[],
            event: None,
        },
        Case {
            name: "a free port outside every range",
            vars: &[],
            port: 12000,
            sock: tcp(),
            replies: vec![],
            verdict: done,
            bound: &[12000],
            asks: &[],
            event: None,
        },
        Case {
            name: "a taken port outside every range",
            vars: &[],
            port: 12000,
            sock: refusing(12000, EADDRINUSE),
            replies: vec![grant(3005)],
            verdict: done,
            bound: &[12000, 3005],
            asks: &[&[12000]],
            event: Some((Action::Remapped, 3005, "port 12000 is taken")),
        },
        Case {
            name: "a taken UDP port outside every range",
            vars: &[],
            port: 12000,
            sock: FakeSocket { stream: false, ..refusing(12000, EADDRINUSE) },
            replies: vec![],
            verdict: in_use,
            bound: &[12000],
            asks: &[],
            event: None,
        },
        Case {
            name: "SO_REUSEPORT outside every range is asked first",
            vars: &[],
            port: 12000,
            sock: shared,
            replies: vec![taken(3002)],
            verdict: done,
            bound: &[3002],
            asks: &[&[]],
            event: Some((Action::Remapped, 3002, "port 12000 is taken")),
        },
        Case {
            name: "a taken single-instance port",
            vars: &[],
            port: 11434,
            sock: refusing(11434, EADDRINUSE),
            replies: vec![],
            verdict: in_use,
            bound: &[11434],
            asks: &[],
            event: Some((Action::Passthrough, 11434, "single-instance type ai: not remapped")),
        },
        Case {
            name: "observe mode",
            vars: &[("STYXY_PRELOAD_MODE", "observe")],
            port: 3000,
            sock: tcp(),
            replies: vec![],
            verdict: Verdict::AsAsked,
            bound: &[],
            asks: &[],
            event: Some((Action::Observed, 3000, "observe mode")),
        },
        Case {
            name: "on-conflict mode binds a coordinated port first",
            vars: &[("STYXY_PRELOAD_MODE", "on-conflict")],
            port: 3000,
            sock: tcp(),
            replies: vec![],
            verdict: done,
            bound: &[3000],
            asks: &[],
            event: None,
        },
        Case {
            name: "no coordinator",
            vars: &[],
            port: 3000,
            sock: tcp(),
            replies: vec![Err(AskError::NoCoordinator)],
            verdict: Verdict::AsAsked,
            bound: &[],
            asks: &[&[]],
            event: Some((Action::Passthrough, 3000, "no coordinator")),
        },
        Case {
            name: "an error answer",
            vars: &[],
            port: 3000,
            sock: tcp(),
            replies: vec![Err(AskError::Refused { status: 400, message: "bad".into() })],
            verdict: Verdict::AsAsked,
            bound: &[],
            asks: &[&[]],
            event: Some((Action::Passthrough, 3000, "coordinator answered 400: bad")),
        },
        Case {
            name: "no port granted",
            vars: &[],
            port: 3000,
            sock: tcp(),
            replies: vec![Ok(AllocateReply { success: Some(false), ..Default::default() })],
            verdict: Verdict::AsAsked,
            bound: &[],
            asks: &[&[]],
            event: Some((Action::Passthrough, 3000, "no port granted")),
        },
        Case {
            name: "a granted port an uncoordinated process took",
            vars: &[],
            port: 3000,
            sock: refusing(3001, EADDRINUSE),
            replies: vec![grant(3001), grant(3002)],
            verdict: done,
            bound: &[3001, 3002],
            asks: &[&[], &[3001]],
            event: Some((Action::Remapped, 3002, "port 3000 is taken")),
        },
        Case {
            name: "every granted port taken",
            vars: &[],
            port: 3000,
            sock: FakeSocket { refused: (3000..3004).map(|p| (p, EADDRINUSE)).collect(), ..tcp() },
            replies: vec![grant(3000), grant(3001), grant(3002), grant(3003)],
            verdict: Verdict::AsAsked,
            bound: &[3000, 3001, 3002, 3003],
            asks: &[&[], &[3000], &[3000, 3001], &[3000, 3001, 3002]],
            event: Some((Action::Error, 3000, "bind to granted port 3003 failed")),
        },
        Case {
            name: "the session's own port, bound again while served",
            vars: &[],
            port: 3000,
            sock: refusing(3000, EADDRINUSE),
            replies: vec![existing(3000)],
            verdict: in_use,
            bound: &[3000],
            asks: &[&[]],
            event: Some((Action::Error, 3000, "the session's port 3000")),
        },
        Case {
            name: "an address the kernel refuses",
            vars: &[],
            port: 3000,
            sock: refusing(3000, EADDRNOTAVAIL),
            replies: vec![grant(3000)],
            verdict: Verdict::AsAsked,
            bound: &[3000],
            asks: &[&[]],
            event: Some((Action::Passthrough, 3000, "the kernel refuses this address")),
        },
    ];
    for mut c in cases {
        let w = World::new(c.vars);
        let mut coord = script(c.replies);
        let verdict = bind_in(&w, c.port, &mut c.sock, &mut coord);
        assert_eq!(verdict, c.verdict, "{}", c.name);
        assert_eq!(c.sock.bound, c.bound, "{}: ports bound", c.name);
        let asks: Vec<&[u16]> = coord.asked.iter().map(|r| r.exclude.as_slice()).collect();
        assert_eq!(asks, c.asks, "{}: excluded in each ask", c.name);
        assert!(coord.asked.iter().all(|r| r.preferred_port == Some(c.port) && r.bind && !r.dry_run), "{}", c.name);
        let events = w.events();
        match c.event {
            None => assert!(events.is_empty(), "{}: {events:?}", c.name),
            Some((action, port, reason)) => {
                assert_eq!(events.len(), 1, "{}: {events:?}", c.name);
                let e = &events[0];
                assert_eq!((e.action, e.requested_port, e.port), (action, c.port, port), "{}", c.name);
                let got = e.reason.as_deref().unwrap_or("");
                assert!(got.starts_with(reason), "{}: reason {got:?}", c.name);
            }
        }
    }
}

#[test]
fn a_twin_of_the_same_remap_is_one_start() {
    let w = World::new(&[]);
    let mut coord = script([taken(3001), existing(3001)]);
    assert_eq!(bind_in(&w, 3000, &mut tcp(), &mut coord), Verdict::Done(Ok(())));
    assert_eq!(bind_in(&w, 3000, &mut tcp(), &mut coord), Verdict::Done(Ok(())));
    let actions: Vec<_> = w.events().iter().map(|e| (e.action, e.reason.clone().unwrap_or_default())).collect();
    assert_eq!(actions[0].0, Action::Remapped);
    assert_eq!(actions[1], (Action::Observed, "bound again by this process (a twin or after a probe) on 3001".into()));
}

#[test]
fn a_tool_falling_back_by_itself_is_told_the_port_is_taken_and_its_next_port_is_mapped_from_the_first() {
    let w = World::new(&[("STYXY_PRELOAD_MODE", "fallback")]);
    // 8888 another session holds: the dry run would grant elsewhere
    let mut coord = script([grant(3010)]);
    let mut sock = tcp();
    assert_eq!(bind_in(&w, 8888, &mut sock, &mut coord), Verdict::Done(Err(EADDRINUSE)));
    assert!(sock.bound.is_empty(), "nothing bound: the tool moves on by itself");
    assert!(coord.asked[0].dry_run);
    // its next try, 8889 (outside every range), is asked about first, as a move from 8888
    let mut coord = script([grant(8889), grant(8889)]);
    assert_eq!(bind_in(&w, 8889, &mut tcp(), &mut coord), Verdict::Done(Ok(())));
    assert_eq!(coord.asked.iter().map(|r| (r.dry_run, r.requested_port)).collect::<Vec<_>>(), [(true, Some(8888)), (false, Some(8888))]);
    let ev = w.events();
    assert_eq!((ev[0].action, ev[0].reason.as_deref()), (Action::Observed, Some("port 8888 is taken; left to srv's own fallback")));
    assert_eq!((ev[1].action, ev[1].reason.as_deref()), (Action::Kept, Some("srv moved from 8888 by itself")));
}

#[test]
fn a_bind_that_cannot_ask_says_so_once_per_process() {
    let w = World::new(&[]);
    assert!(w.p.memory.first_warning(4242));
    assert!(!w.p.memory.first_warning(4242));
    assert!(w.p.memory.first_warning(4243), "a forked child says it again");
}

#[test]
fn a_failed_bind_of_the_sessions_port_says_why() {
    // served: a listener holds it (its port cannot be anyone else's while we hold it;
    // once dropped, another test's listener may take the number, so that half is the
    // end-to-end tests')
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    assert_eq!(Reason::session_port_in_use(port), Reason::SessionPortServed(port));
    let why = Reason::SessionPortInTimeWait(port).to_string();
    assert!(why.contains("TIME_WAIT") && why.contains("SO_REUSEADDR"), "{why}");
}

#[test]
fn a_tool_falling_back_by_itself_from_a_taken_port_outside_every_range_is_told_so() {
    let w = World::new(&[("STYXY_PRELOAD_MODE", "fallback")]);
    let mut coord = script([grant(3005)]);
    let mut sock = refusing(12000, EADDRINUSE);
    assert_eq!(bind_in(&w, 12000, &mut sock, &mut coord), Verdict::Done(Err(EADDRINUSE)));
    assert_eq!(sock.bound, [12000], "bound as asked once, never elsewhere");
    assert_eq!(coord.asked.iter().map(|r| (r.dry_run, r.exclude.clone())).collect::<Vec<_>>(), [(true, vec![12000])]);
    let ev = w.events();
    assert_eq!(
        (ev.len(), ev[0].action, ev[0].reason.as_deref()),
        (1, Action::Observed, Some("port 12000 is taken; left to srv's own fallback"))
    );
}
