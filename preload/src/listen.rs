//! `listen()`: makes it, then does what the one decision (`decide::listen_way`) says, as
//! the library does: a port another process of the tree kept (and handed down) is
//! confirmed (the pid becomes an owner of its allocation), a listen on port 0 or on an
//! unbound socket is observed; anything else, a port this process kept included, needs no
//! one's word. Never changes the call.

use std::time::Instant;

use styxy_preload_common::decide::{self, ListenWay, Listening};
use styxy_preload_common::eventlog::Action;
use styxy_preload_common::hookproto;
use styxy_preload_common::reason::Reason;

use crate::bind::{Coordinator, KeepAsk};
use crate::call::{Caller, Socket, Verdict};
use crate::process::Process;
use crate::report::{self, Outcome};

/// Makes the `listen()` on `sock`, then tells the daemon (`coord`), which logs it.
pub fn decide(p: &Process, who: &Caller, sock: &mut dyn Socket, coord: &mut dyn Coordinator) -> Verdict {
    if !sock.reachable() {
        return Verdict::AsAsked;
    }
    let before = sock.local_addr();
    let r = sock.run(None);
    if r.is_err() {
        return Verdict::Done(r);
    }
    let port = before.map(|a| a.port);
    let (kept_here, kept_before) = port.map_or((false, false), |port| p.memory.kept_by(who.pid, port));
    let way = decide::listen_way(Listening { port, kept_here, kept_before });
    // the port it listens on: the one bound, or the kernel's choice at this listen
    let Some(at) = (if way == ListenWay::Observe { sock.local_addr() } else { before }) else { return Verdict::Done(Ok(())) };
    let family = if at.family == libc::AF_INET6 { 6 } else { 4 };
    let session = p.session.as_deref().unwrap_or("");
    let ask = KeepAsk { pid: who.pid, port: at.port, family, flags: 0, origin: None, session, comm: who.comm };
    match way {
        ListenWay::Confirm => coord.confirm(&ask),
        ListenWay::Observe if at.port != 0 && !coord.note(&ask, hookproto::NOTE_KERNEL_CHOSE, at.port) => {
            // no daemon to tell: logged here
            let outcome = Outcome {
                call: "listen",
                requested: 0,
                port: at.port,
                addr: &at,
                service_type: None,
                action: Action::Observed,
                reason: Some(Reason::KernelChose.to_string()),
                started: Instant::now(),
                backend: None,
                retries: 0,
            };
            report::event(p, who, outcome);
        }
        _ => {}
    }
    Verdict::Done(Ok(()))
}

#[cfg(test)]
mod tests {
    //! Every way `decide` ends, over a fake socket and a fake coordinator that keeps the
    //! confirmations it is told.

    use libc::c_int;

    use super::*;
    use crate::sys::Addr;
    use crate::testing::World;

    /// A socket bound to `before`; `listen()` answers `result`, and the kernel then names `after`.
    struct FakeSocket {
        reachable: bool,
        before: Option<u16>,
        after: u16,
        result: Result<(), c_int>,
        listened: bool,
    }

    impl Socket for FakeSocket {
        fn reachable(&mut self) -> bool {
            self.reachable
        }
        fn sock_type(&mut self) -> Option<c_int> {
            Some(libc::SOCK_STREAM)
        }
        fn shares_port(&mut self) -> bool {
            false
        }
        fn local_addr(&mut self) -> Option<Addr> {
            let port = if self.listened { Some(self.after) } else { self.before };
            port.map(|p| Addr::ipv4([127, 0, 0, 1], p))
        }
        fn run(&mut self, _: Option<&Addr>) -> Result<(), c_int> {
            self.listened = true;
            self.result
        }
    }

    fn sock(before: Option<u16>, after: u16, result: Result<(), c_int>) -> FakeSocket {
        FakeSocket { reachable: true, before, after, result, listened: false }
    }

    /// A coordinator that keeps the confirmations and notes it is told.
    #[derive(Default)]
    struct Confirms(Vec<(u32, u16, String)>, Vec<(u8, u16)>);

    impl Coordinator for Confirms {
        fn keep(&mut self, _: &KeepAsk) -> Result<crate::bind::Keep, crate::bind::AskError> {
            unreachable!("a listen asks for no port")
        }
        fn done(&mut self, _: c_int) {}
        fn confirm(&mut self, a: &KeepAsk) {
            self.0.push((a.pid, a.port, a.session.to_string()));
        }
        fn refused(&mut self, _: &KeepAsk) -> Option<String> {
            unreachable!("a listen connects nowhere")
        }
        fn note(&mut self, _: &KeepAsk, note: u8, got: u16) -> bool {
            self.1.push((note, got));
            true
        }
        fn name(&self) -> String {
            "the fake".into()
        }
    }

    fn listen(w: &World, sock: &mut FakeSocket) -> Verdict {
        listen_as(w, 4242, sock, &mut Confirms::default())
    }

    fn listen_as(w: &World, pid: u32, sock: &mut FakeSocket, coord: &mut Confirms) -> Verdict {
        decide(&w.p, &Caller { pid, comm: "srv", cwd: Some("/w") }, sock, coord)
    }

    #[test]
    fn an_unreachable_socket_listens_as_asked() {
        let w = World::new(&[]);
        let mut s = FakeSocket { reachable: false, ..sock(Some(3000), 3000, Ok(())) };
        assert_eq!(listen(&w, &mut s), Verdict::AsAsked);
        assert!(!s.listened && w.events().is_empty());
    }

    #[test]
    fn a_failed_listen_is_the_programs_and_nothing_else() {
        let w = World::new(&[]);
        assert_eq!(listen(&w, &mut sock(Some(3000), 3000, Err(libc::EINVAL))), Verdict::Done(Err(libc::EINVAL)));
        assert!(w.events().is_empty());
    }

    #[test]
    fn a_port_the_kernel_chose_at_listen_is_told() {
        let w = World::new(&[]);
        let mut coord = Confirms::default();
        assert_eq!(listen_as(&w, 4242, &mut sock(Some(0), 43210, Ok(())), &mut coord), Verdict::Done(Ok(())));
        assert_eq!((coord.0.len(), coord.1.as_slice()), (0, &[(hookproto::NOTE_KERNEL_CHOSE, 43210)][..]));
        assert!(w.events().is_empty(), "the daemon logs it");
    }

    #[test]
    fn a_port_another_process_of_the_tree_kept_is_confirmed_and_ones_own_is_not() {
        let w = World::new(&[]);
        w.p.memory.remember_kept(4242, 3000); // the parent kept 3000 before it forked
        let mut coord = Confirms::default();
        assert_eq!(listen_as(&w, 4242, &mut sock(Some(3000), 3000, Ok(())), &mut coord), Verdict::Done(Ok(())));
        assert!(coord.0.is_empty(), "its own: the bind's grant already names it");
        assert_eq!(listen_as(&w, 4343, &mut sock(Some(3000), 3000, Ok(())), &mut coord), Verdict::Done(Ok(())));
        assert_eq!(coord.0, [(4343, 3000, "t".to_string())], "the child that listens on it becomes an owner");
        assert_eq!(listen_as(&w, 4343, &mut sock(Some(3001), 3001, Ok(())), &mut coord), Verdict::Done(Ok(())));
        assert_eq!(coord.0.len(), 1, "a port nobody kept here: nothing to confirm");
        assert!(w.events().is_empty(), "the binds logged them");
    }
}
