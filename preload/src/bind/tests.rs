//! Every branch of `bind::decide`, over a fake socket and a fake coordinator: what the
//! program gets, which ports were bound, what was asked and told, and the event the
//! supervisor writes itself (the daemon writes those of what it was asked).

use std::collections::{BTreeMap, VecDeque};

use libc::{c_int, EADDRINUSE, EADDRNOTAVAIL};
use styxy_preload_common::eventlog::Action;
use styxy_preload_common::hookproto::{FALLBACK, MAY_MOVE, NOTE_OBSERVED, NOTE_SINGLE, ON_CONFLICT_MODE, OWN_RULES, SHARES_PORT, TAKEN};

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

/// A `KEEP` as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Asked {
    pid: u32,
    port: u16,
    family: u8,
    flags: u8,
    origin: Option<u16>,
    session: String,
    comm: String,
}

/// A coordinator answering from a script, keeping what it was asked and told.
#[derive(Default)]
struct FakeCoordinator {
    replies: VecDeque<Result<Keep, AskError>>,
    asked: Vec<Asked>,
    dones: Vec<c_int>,
    notes: Vec<(u8, u16)>,
    /// Whether a note reaches it (false: no daemon to tell).
    told: bool,
}

impl Coordinator for FakeCoordinator {
    fn keep(&mut self, a: &KeepAsk) -> Result<Keep, AskError> {
        let (session, comm) = (a.session.to_string(), a.comm.to_string());
        self.asked.push(Asked { pid: a.pid, port: a.port, family: a.family, flags: a.flags, origin: a.origin, session, comm });
        self.replies.pop_front().expect("asked more often than the test expects")
    }
    fn done(&mut self, errno: c_int) {
        self.dones.push(errno);
    }
    fn confirm(&mut self, _: &KeepAsk) {
        unreachable!("a bind confirms nothing")
    }
    fn refused(&mut self, _: &KeepAsk) -> Option<String> {
        unreachable!("a bind connects nowhere")
    }
    fn note(&mut self, _: &KeepAsk, note: u8, got: u16) -> bool {
        self.notes.push((note, got));
        self.told
    }
    fn name(&self) -> String {
        "the fake".into()
    }
}

fn grant(port: u16) -> Result<Keep, AskError> {
    Ok(Keep::Grant { port, existing: false })
}

fn existing(port: u16) -> Result<Keep, AskError> {
    Ok(Keep::Grant { port, existing: true })
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

fn script(replies: impl IntoIterator<Item = Result<Keep, AskError>>) -> FakeCoordinator {
    FakeCoordinator { replies: replies.into_iter().collect(), told: true, ..Default::default() }
}

/// One case: the bind's port, the environment, the socket and the coordinator's answers;
/// then the verdict, the ports bound, the flags of each `KEEP`, the errno each `DONE`
/// told, and the event the supervisor wrote.
struct Case {
    name: &'static str,
    vars: &'static [(&'static str, &'static str)],
    port: u16,
    sock: FakeSocket,
    replies: Vec<Result<Keep, AskError>>,
    verdict: Verdict,
    bound: &'static [u16],
    asks: &'static [u8],
    dones: &'static [c_int],
    event: Option<(Action, u16, &'static str)>,
}

#[test]
fn every_branch_of_a_bind() {
    let udp = FakeSocket { stream: false, ..tcp() };
    let shared = FakeSocket { shares: true, ..refusing(12000, EADDRINUSE) };
    let done = Verdict::Done(Ok(()));
    let in_use = Verdict::Done(Err(EADDRINUSE));
    let case = |name, port, sock, replies: Vec<_>, verdict, bound, asks, dones, event| Case {
        name,
        vars: &[],
        port,
        sock,
        replies,
        verdict,
        bound,
        asks,
        dones,
        event,
    };
    let cases = vec![
        case("a privileged port", 80, tcp(), vec![], Verdict::AsAsked, &[], &[], &[], None),
        Case {
            vars: &[("STYXY_PRELOAD_PORTS", "80=dev")],
            ..case("a privileged port a rule gives a type", 80, tcp(), vec![grant(80)], done, &[80], &[MAY_MOVE | OWN_RULES], &[0], None)
        },
        case("a free coordinated port", 3000, tcp(), vec![grant(3000)], done, &[3000], &[MAY_MOVE], &[0], None),
        case("a coordinated port another session holds", 3000, tcp(), vec![grant(3001)], done, &[3001], &[MAY_MOVE], &[0], None),
        case("UDP", 3000, udp, vec![], Verdict::AsAsked, &[], &[], &[], None),
        case(
            "a socket the supervisor cannot reach",
            3000,
            FakeSocket { reachable: false, ..tcp() },
            vec![],
            Verdict::AsAsked,
            &[],
            &[],
            &[],
            None,
        ),
        case("a free port outside every range", 12000, tcp(), vec![], done, &[12000], &[], &[], None),
        case(
            "a taken port outside every range",
            12000,
            refusing(12000, EADDRINUSE),
            vec![grant(3005)],
            done,
            &[12000, 3005],
            &[TAKEN | MAY_MOVE],
            &[0],
            None,
        ),
        case(
            "a taken UDP port outside every range",
            12000,
            FakeSocket { stream: false, ..refusing(12000, EADDRINUSE) },
            vec![],
            in_use,
            &[12000],
            &[],
            &[],
            None,
        ),
        case(
            "SO_REUSEPORT outside every range is asked first",
            12000,
            shared,
            vec![grant(3002)],
            done,
            &[3002],
            &[SHARES_PORT | MAY_MOVE],
            &[0],
            None,
        ),
        case("a taken single-instance port", 11434, refusing(11434, EADDRINUSE), vec![], in_use, &[11434], &[], &[], None),
        Case {
            vars: &[("STYXY_PRELOAD_MODE", "observe")],
            ..case("observe mode", 3000, tcp(), vec![], Verdict::AsAsked, &[], &[], &[], None)
        },
        Case {
            vars: &[("STYXY_PRELOAD_MODE", "on-conflict")],
            ..case("on-conflict mode binds a coordinated port first", 3000, tcp(), vec![], done, &[3000], &[], &[], None)
        },
        Case {
            vars: &[("STYXY_PRELOAD_MODE", "on-conflict")],
            ..case(
                "on-conflict mode asks after EADDRINUSE",
                3000,
                refusing(3000, EADDRINUSE),
                vec![grant(3001)],
                done,
                &[3000, 3001],
                &[TAKEN | ON_CONFLICT_MODE | MAY_MOVE],
                &[0],
                None,
            )
        },
        case(
            "no coordinator",
            3000,
            tcp(),
            vec![Err(AskError::NoCoordinator)],
            Verdict::AsAsked,
            &[],
            &[MAY_MOVE],
            &[],
            Some((Action::Passthrough, 3000, "no coordinator")),
        ),
        case(
            "declined (the daemon logged why)",
            3000,
            tcp(),
            vec![Ok(Keep::Declined(Some("a full range".into())))],
            Verdict::AsAsked,
            &[],
            &[MAY_MOVE],
            &[],
            None,
        ),
        case(
            "a granted port an uncoordinated process took",
            3000,
            refusing(3001, EADDRINUSE),
            vec![grant(3001), grant(3002)],
            done,
            &[3001, 3002],
            &[MAY_MOVE, MAY_MOVE],
            &[EADDRINUSE, 0],
            None,
        ),
        case(
            "every granted port taken",
            3000,
            FakeSocket { refused: (3000..3004).map(|p| (p, EADDRINUSE)).collect(), ..tcp() },
            vec![grant(3000), grant(3001), grant(3002), grant(3003)],
            Verdict::AsAsked,
            &[3000, 3001, 3002, 3003],
            &[MAY_MOVE; 4],
            &[EADDRINUSE; 4],
            None,
        ),
        case(
            "the session's own port, bound again while served",
            3000,
            refusing(3000, EADDRINUSE),
            vec![existing(3000)],
            in_use,
            &[3000],
            &[MAY_MOVE],
            &[EADDRINUSE],
            None,
        ),
        case(
            "an address the kernel refuses",
            3000,
            refusing(3000, EADDRNOTAVAIL),
            vec![grant(3000)],
            Verdict::AsAsked,
            &[3000],
            &[MAY_MOVE],
            &[EADDRNOTAVAIL],
            None,
        ),
    ];
    for mut c in cases {
        let w = World::new(c.vars);
        let mut coord = script(c.replies);
        let verdict = bind_in(&w, c.port, &mut c.sock, &mut coord);
        assert_eq!(verdict, c.verdict, "{}", c.name);
        assert_eq!(c.sock.bound, c.bound, "{}: ports bound", c.name);
        assert_eq!(coord.asked.iter().map(|a| a.flags).collect::<Vec<_>>(), c.asks, "{}: each KEEP's flags", c.name);
        assert!(coord.asked.iter().all(|a| a.port == c.port && a.pid == 4242 && a.origin.is_none()), "{}: {:?}", c.name, coord.asked);
        assert_eq!(coord.dones, c.dones, "{}: what each DONE told", c.name);
        let noted = match c.name {
            "observe mode" => vec![(NOTE_OBSERVED, 3000)],
            "a taken single-instance port" => vec![(NOTE_SINGLE, 11434)],
            _ => vec![],
        };
        assert_eq!(coord.notes, noted, "{}: what the daemon was told to log", c.name);
        let events = w.events();
        match c.event {
            None => assert!(events.is_empty(), "{}: {events:?}", c.name),
            Some((action, port, reason)) => {
                assert_eq!(events.len(), 1, "{}: {events:?}", c.name);
                let e = &events[0];
                assert_eq!((e.action, e.requested_port, e.port, e.pid), (action, c.port, port, 4242), "{}", c.name);
                let got = e.reason.as_deref().unwrap_or("");
                assert!(got.starts_with(reason), "{}: reason {got:?}", c.name);
            }
        }
    }
}

#[test]
fn a_process_binding_again_the_port_it_kept_asks_no_one_unless_it_is_taken() {
    let w = World::new(&[]);
    let mut coord = script([grant(3000)]);
    let verdicts: Vec<_> = (0..3).map(|_| bind_in(&w, 3000, &mut tcp(), &mut coord)).collect();
    assert_eq!(verdicts, [Verdict::Done(Ok(())); 3], "kept, then bound as asked");
    assert_eq!((coord.asked.len(), coord.dones.as_slice()), (1, &[0][..]), "one KEEP, one DONE");
    // taken now: the pid is another process's (pids are reused), which asks
    let mut coord = script([grant(3001)]);
    let mut taken = refusing(3000, libc::EADDRINUSE);
    assert_eq!(bind_in(&w, 3000, &mut taken, &mut coord), Verdict::Done(Ok(())));
    assert_eq!((coord.asked.len(), taken.bound.as_slice()), (1, &[3000, 3001][..]), "asked, and moved");
    // another process (a forked child) asks for itself
    let mut coord = script([existing(3000)]);
    let other = Caller { pid: 4243, comm: "srv", cwd: None };
    let mut sock = tcp();
    sock.asked = 3000;
    assert_eq!(decide(&w.p, &other, &loopback(3000), &mut sock, &mut coord), Verdict::Done(Ok(())));
    assert_eq!(coord.asked.len(), 1);
}

#[test]
fn the_sessions_own_port_in_a_beating_port_map_is_bound_without_asking_and_told() {
    use styxy_preload_common::hookproto::{NOTE_AGAIN, NOTE_STUCK};
    use styxy_preload_common::portmap::PortMap;
    let w = World::new(&[]);
    let map = PortMap::create(&w.runtime().join("ports.map")).unwrap();
    let t = styxy_preload_common::session::tag("t");
    map.set_held(3001, t);
    map.insert(t, 3000, 3001); // session t was moved from 3000 to 3001 (a restart now)
    let mut stale = script([grant(3001)]);
    assert_eq!(bind_in(&w, 3000, &mut tcp(), &mut stale), Verdict::Done(Ok(())));
    assert_eq!((stale.asked.len(), stale.notes.len()), (1, 0), "a daemon that does not beat is asked");
    let w = World::new(&[]);
    let map = PortMap::create(&w.runtime().join("ports.map")).unwrap();
    map.set_held(3001, t);
    map.insert(t, 3000, 3001);
    map.beat();
    let mut coord = script([]);
    let mut sock = tcp();
    assert_eq!(bind_in(&w, 3000, &mut sock, &mut coord), Verdict::Done(Ok(())));
    assert_eq!((sock.bound.as_slice(), coord.asked.len(), coord.notes.as_slice()), (&[3001][..], 0, &[(NOTE_STUCK, 3001)][..]));
    // the same process again: it kept 3001 itself
    assert_eq!(bind_in(&w, 3000, &mut tcp(), &mut coord), Verdict::Done(Ok(())));
    assert_eq!(coord.notes.last(), Some(&(NOTE_AGAIN, 3001)));
    // taken meanwhile by someone uncoordinated: asked as any bind
    let mut coord = script([grant(3002)]);
    let mut sock = refusing(3001, EADDRINUSE);
    sock.asked = 3000;
    let other = Caller { pid: 4300, comm: "srv", cwd: None };
    assert_eq!(decide(&w.p, &other, &loopback(3000), &mut sock, &mut coord), Verdict::Done(Ok(())));
    assert_eq!((sock.bound.as_slice(), coord.asked.len()), (&[3001, 3002][..], 1));
}

#[test]
fn what_no_daemon_could_be_told_is_logged_here() {
    let w = World::new(&[("STYXY_PRELOAD_MODE", "observe")]);
    let mut coord = FakeCoordinator { told: false, ..script([]) };
    assert_eq!(bind_in(&w, 3000, &mut tcp(), &mut coord), Verdict::AsAsked);
    let w2 = World::new(&[]);
    let mut coord = FakeCoordinator { told: false, ..script([]) };
    assert_eq!(bind_in(&w2, 11434, &mut refusing(11434, EADDRINUSE), &mut coord), Verdict::Done(Err(EADDRINUSE)));
    let logged: Vec<_> = [w.events(), w2.events()].concat().into_iter().map(|e| (e.action, e.port, e.reason.unwrap_or_default())).collect();
    assert_eq!(
        logged,
        [(Action::Observed, 3000, "observe mode".into()), (Action::Passthrough, 11434, "single-instance type ai: not remapped".into())]
    );
}

#[test]
fn a_keep_names_the_process_its_session_name_and_address_family() {
    let w = World::new(&[("STYXY_PRELOAD_SESSION", "agent-7")]);
    let mut coord = script([grant(3000)]);
    let who = Caller { pid: 77, comm: "vite", cwd: None };
    let mut sock = tcp();
    let v6 = Addr::from_bytes(&[10, 0, 0x0b, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap();
    sock.asked = 3000;
    assert_eq!(decide(&w.p, &who, &v6, &mut sock, &mut coord), Verdict::Done(Ok(())));
    let want = Asked { pid: 77, port: 3000, family: 6, flags: MAY_MOVE, origin: None, session: "agent-7".into(), comm: "vite".into() };
    assert_eq!(coord.asked, [want]);
}

#[test]
fn a_tool_falling_back_by_itself_is_told_the_port_is_taken_and_its_next_port_is_mapped_from_the_first() {
    let w = World::new(&[("STYXY_PRELOAD_MODE", "fallback")]);
    // 8888 another session holds: the daemon answers BUSY
    let mut coord = script([Ok(Keep::Busy)]);
    let mut sock = tcp();
    assert_eq!(bind_in(&w, 8888, &mut sock, &mut coord), Verdict::Done(Err(EADDRINUSE)));
    assert!(sock.bound.is_empty(), "nothing bound: the tool moves on by itself");
    assert_eq!(coord.asked[0].flags, FALLBACK, "this port or none");
    // its next try, 8889 (outside every range), is asked about first, as a move from 8888
    let mut coord = script([grant(8889)]);
    assert_eq!(bind_in(&w, 8889, &mut tcp(), &mut coord), Verdict::Done(Ok(())));
    assert_eq!(coord.asked.iter().map(|a| (a.flags, a.origin)).collect::<Vec<_>>(), [(FALLBACK, Some(8888))]);
    assert_eq!(coord.dones, [0]);
    assert!(w.events().is_empty(), "the daemon logs both");
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
    let mut coord = script([Ok(Keep::Busy)]);
    let mut sock = refusing(12000, EADDRINUSE);
    assert_eq!(bind_in(&w, 12000, &mut sock, &mut coord), Verdict::Done(Err(EADDRINUSE)));
    assert_eq!(sock.bound, [12000], "bound as asked once, never elsewhere");
    assert_eq!(coord.asked.iter().map(|a| a.flags).collect::<Vec<_>>(), [TAKEN | FALLBACK]);
    assert!(w.events().is_empty(), "the daemon logs the BUSY");
}
