//! The shim against a fake daemon on `hook.sock`: the test plays the daemon's end of the
//! exchange (docs/ARCHITECTURE.md "Hook ↔ daemon protocol") and checks what the real
//! library does with each answer — the grant, a refusal, a lie, garbage, a slow daemon
//! that beats, a silent one that does not.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use styxy_preload_common::eventlog::Action;
use styxy_preload_common::hookproto::{self, Answer, Ask, ANSWER_LEN, ASK_LEN, DECLINED, DONE, DONE_MAX, GRANTED, KEEP};
use styxy_preload_common::policy::Policy;
use styxy_preload_common::portmap::PortMap;

/// What the fake daemon does with a `KEEP`.
#[derive(Clone, Copy)]
enum Reply {
    /// Sends these bytes after a delay.
    After(Duration, [u8; ANSWER_LEN]),
    /// Never answers.
    Silent,
    /// Closes the connection unanswered (a daemon of another version).
    Close,
}

fn answer(status: u8, port: u16) -> [u8; ANSWER_LEN] {
    Answer { status, port, existing: false }.encode()
}

/// The daemon's side of the world's runtime directory: its policy map, a port map that
/// beats while `beating`, and `hook.sock`, served by a thread that answers one `KEEP` with
/// `reply` and reports the `DONE` that follows (kind, port, errno; errno -1 when it did
/// not carry the shim's `HOME`, where its event log is).
struct FakeDaemon {
    beating: Arc<AtomicBool>,
    done: mpsc::Receiver<(u8, u16, i32)>,
    asked: mpsc::Receiver<u16>,
    /// Which of the asking process's fds 0, 1 and 2 were open while it asked.
    stdio: mpsc::Receiver<[bool; 3]>,
}

impl FakeDaemon {
    fn start(w: &World, reply: Reply, beating: bool) -> FakeDaemon {
        let run = w.path("run/styxy-preload");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        styxy_preload_common::policymap::write(&run.join("policy.map"), &styxy_preload_common::policymap::classes(&Policy::default()))
            .unwrap();
        let map = Arc::new(PortMap::create(&run.join("ports.map")).unwrap());
        let flag = Arc::new(AtomicBool::new(beating));
        let (f, m) = (flag.clone(), map.clone());
        std::thread::spawn(move || {
            while f.load(Ordering::Relaxed) {
                m.beat();
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let listener = seqpacket_listener(&run.join("hook.sock"));
        let (done_tx, done) = mpsc::channel();
        let (asked_tx, asked) = mpsc::channel();
        let (stdio_tx, stdio) = mpsc::channel();
        std::thread::spawn(move || {
            let _map = map; // the port map lives as long as the daemon
            let Some(conn) = accept(&listener) else { return };
            let mut buf = [0u8; ASK_LEN + 1];
            let Some(ask) = recv(&conn, &mut buf).and_then(|n| Ask::decode(&buf[..n]).filter(|a| a.kind == KEEP)) else { return };
            let pid = peer_pid(&conn);
            let _ = stdio_tx.send([0, 1, 2].map(|fd| std::fs::symlink_metadata(format!("/proc/{pid}/fd/{fd}")).is_ok()));
            let _ = asked_tx.send(ask.port);
            match reply {
                Reply::Silent => std::thread::sleep(Duration::from_secs(5)),
                Reply::Close => drop(conn),
                Reply::After(delay, bytes) => {
                    std::thread::sleep(delay);
                    // SAFETY: send of a buffer of its length on our own connection.
                    unsafe { libc::send(conn.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
                    // the ask, then the log variables of the shim's environment
                    let mut buf = vec![0u8; DONE_MAX + 1];
                    let n = recv(&conn, &mut buf).filter(|n| (ASK_LEN..=DONE_MAX).contains(n));
                    if let Some((done, vars)) = n.and_then(|n| Some((Ask::decode(&buf[..ASK_LEN])?, &buf[ASK_LEN..n]))) {
                        let home = hookproto::done_vars(vars).any(|(k, v)| k == "HOME" && !v.is_empty());
                        let _ = done_tx.send((done.kind, done.port, if home { done.errno } else { -1 }));
                    }
                }
            }
        });
        FakeDaemon { beating: flag, done, asked, stdio }
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.beating.store(false, Ordering::Relaxed);
    }
}

fn seqpacket_listener(path: &Path) -> OwnedFd {
    // SAFETY: a new socket of ours, owned by the OwnedFd; bind reads a whole sockaddr_un.
    unsafe {
        let fd = OwnedFd::from_raw_fd(libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0));
        let addr = sockaddr_un(path);
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        assert_eq!(libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len), 0);
        assert_eq!(libc::listen(fd.as_raw_fd(), 8), 0);
        fd
    }
}

/// The pid of the process at the other end of `c` (`SO_PEERCRED`).
fn peer_pid(c: &OwnedFd) -> i32 {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    unsafe { libc::getsockopt(c.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len) };
    cred.pid
}

/// The next connection, within 10 s.
fn accept(l: &OwnedFd) -> Option<OwnedFd> {
    let mut p = libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd; accept4 on our listening socket, the result owned by the OwnedFd.
    unsafe {
        if libc::poll(&mut p, 1, 10_000) != 1 {
            return None;
        }
        let fd = libc::accept4(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC);
        (fd >= 0).then(|| OwnedFd::from_raw_fd(fd))
    }
}

/// One message, within 5 s.
fn recv(c: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    let mut p = libc::pollfd { fd: c.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd; recv into a buffer of its length.
    unsafe {
        if libc::poll(&mut p, 1, 5_000) != 1 {
            return None;
        }
        usize::try_from(libc::recv(c.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)).ok().filter(|n| *n > 0)
    }
}

/// Python in session `s` binding 127.0.0.1:3000 under the library: the port it got.
fn bind_3000(w: &World) -> (u16, String) {
    let mut c = w.preloaded(Some("s"), "python3");
    c.args(["-c", "import socket\ns=socket.socket()\ns.bind(('127.0.0.1',3000))\nprint(s.getsockname()[1])"]);
    let out = run(c);
    let port = text(&out.stdout).trim().parse().unwrap_or_else(|_| panic!("python failed: {}", text(&out.stderr)));
    (port, text(&out.stderr))
}

#[test]
fn a_grant_of_the_very_port_is_bound_and_reported_done() {
    let w = World::new();
    let d = FakeDaemon::start(&w, Reply::After(Duration::ZERO, answer(GRANTED, 3000)), true);
    assert_eq!(bind_3000(&w).0, 3000);
    assert_eq!(d.asked.recv_timeout(Duration::from_secs(5)), Ok(3000));
    assert_eq!(d.done.recv_timeout(Duration::from_secs(5)), Ok((DONE, 3000, 0)));
}

#[test]
fn a_refusal_a_lie_or_garbage_is_never_bound_on_the_daemons_word() {
    // each leaves the bind as asked
    let garbage = [0xffu8; ANSWER_LEN];
    for (name, reply) in [("declined", answer(DECLINED, 0)), ("another port", answer(GRANTED, 3005)), ("garbage", garbage)] {
        let w = World::new();
        let d = FakeDaemon::start(&w, Reply::After(Duration::ZERO, reply), true);
        let (port, err) = bind_3000(&w);
        assert_eq!(port, 3000, "{name}: {err}");
        assert_eq!(d.asked.recv_timeout(Duration::from_secs(5)), Ok(3000), "{name}");
        // the fake's thread ends once the shim closed the connection: no DONE came before
        let after = d.done.recv_timeout(Duration::from_secs(5));
        assert_eq!(after, Err(mpsc::RecvTimeoutError::Disconnected), "{name}: no DONE for a bind the daemon did not grant");
    }
}

#[test]
fn a_daemon_of_another_version_is_passed_by_and_said_once() {
    let w = World::new();
    let _d = FakeDaemon::start(&w, Reply::Close, true);
    let (port, err) = bind_3000(&w);
    assert_eq!(port, 3000, "as asked: {err}");
    assert_eq!(err.matches("closed the ask unanswered (a daemon of another version?").count(), 1, "{err}");
}

#[test]
fn a_slow_daemon_that_beats_is_waited_for() {
    let w = World::new();
    // longer than a stale beat's 600 ms: only the beat keeps the shim waiting
    let d = FakeDaemon::start(&w, Reply::After(Duration::from_millis(900), answer(GRANTED, 3000)), true);
    assert_eq!(bind_3000(&w).0, 3000);
    assert_eq!(d.done.recv_timeout(Duration::from_secs(5)), Ok((DONE, 3000, 0)), "the late grant was taken");
}

#[test]
fn a_silent_daemon_that_does_not_beat_is_passed_by() {
    let w = World::new();
    let d = FakeDaemon::start(&w, Reply::Silent, false);
    let started = std::time::Instant::now();
    assert_eq!(bind_3000(&w).0, 3000);
    assert!(started.elapsed() < Duration::from_secs(4), "does not hang: {:?}", started.elapsed());
    assert_eq!(d.asked.recv_timeout(Duration::from_secs(5)), Ok(3000));
    assert!(d.done.try_recv().is_err());
    // spooled, and logged by the daemon that runs next
    w.start_daemon();
    let ev = w.events();
    let e = ev.iter().find(|e| e.requested_port == 3000).unwrap_or_else(|| panic!("{ev:?}"));
    assert_eq!((e.action, e.reason.as_deref(), e.call.as_str()), (Action::Passthrough, Some("coordinator timeout"), "bind"), "{e:?}");
}

#[test]
fn the_shims_socket_never_lands_on_fd_0_to_2() {
    let w = World::new();
    let d = FakeDaemon::start(&w, Reply::After(Duration::ZERO, answer(GRANTED, 3000)), true);
    // the program closed its stdio: its own socket takes fd 0, and 1 and 2 are free
    let out = w.path("bound");
    let mut c = w.preloaded(Some("s"), "python3");
    c.args(["-c", "import os,socket\nfor fd in (0,1,2): os.close(fd)\ns=socket.socket()\ns.bind(('127.0.0.1',3000))\nopen(os.environ['OUT'],'w').write(str(s.getsockname()[1]))"])
        .env("OUT", &out);
    run(c);
    assert_eq!(d.stdio.recv_timeout(Duration::from_secs(5)), Ok([true, false, false]), "fds 0-2 while the shim asked");
    assert_eq!(std::fs::read_to_string(&out).unwrap_or_default(), "3000");
}
