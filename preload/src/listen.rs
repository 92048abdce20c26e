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

#[cfg(test)]
mod tests {
    //! Every way `decide` ends, over a fake socket and a fake daemon: a Unix socket where
    //! the process's daemon would be, which keeps the one request it receives.

    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

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

    /// Serves one request on the world's daemon socket, answering `{}`; the request's bytes.
    fn fake_daemon(w: &World) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(w.runtime().join("daemon.sock")).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // the request ends with its JSON body's closing brace
            while !got.ends_with(b"}") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
            String::from_utf8_lossy(&got).into_owned()
        })
    }

    fn listen(w: &World, sock: &mut FakeSocket) -> Verdict {
        decide(&w.p, &Caller { pid: 4242, comm: "srv", cwd: Some("/w") }, sock)
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
    fn a_port_the_kernel_chose_at_listen_is_observed() {
        let w = World::new(&[]);
        assert_eq!(listen(&w, &mut sock(Some(0), 43210, Ok(()))), Verdict::Done(Ok(())));
        let ev = w.events();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!((ev[0].requested_port, ev[0].port, ev[0].action), (0, 43210, Action::Observed));
    }

    #[test]
    fn a_coordinated_port_is_confirmed_with_the_daemon() {
        let w = World::new(&[]);
        let daemon = fake_daemon(&w);
        assert_eq!(listen(&w, &mut sock(Some(3000), 3000, Ok(()))), Verdict::Done(Ok(())));
        let req = daemon.join().unwrap();
        assert!(req.starts_with("POST /register-instance "), "{req}");
        for field in [r#""pid":4242"#, r#""port":3000"#, r#""instance_id":"t""#] {
            assert!(req.contains(field), "{field} in {req}");
        }
        assert!(w.events().is_empty(), "the bind logged it");
    }

    #[test]
    fn nothing_is_confirmed_in_observe_mode_or_for_a_port_nobody_coordinates() {
        for (vars, port) in [(&[("STYXY_PRELOAD_MODE", "observe")][..], 3000), (&[][..], 40000)] {
            let w = World::new(vars);
            // no daemon listens: a confirmation would fail, and nothing may wait on it
            assert_eq!(listen(&w, &mut sock(Some(port), port, Ok(()))), Verdict::Done(Ok(())), "{vars:?} {port}");
            assert!(w.events().is_empty());
        }
    }
}
