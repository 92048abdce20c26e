//! The shim's socket (docs/ARCHITECTURE.md "Hook ↔ daemon protocol"): `hook.sock`, a
//! `SOCK_SEQPACKET` Unix socket beside `daemon.sock`, speaking the fixed layout of
//! `styxy_preload_common::hookproto`. It answers one question — which port may this
//! process bind for the one it asked for? — so that a process's coordinated bind, kept or
//! remapped, costs one round trip and no library load; when Styxy answers, the grant
//! waits for its word on this side of the exchange (`Shared::grant`). The rest (a port no
//! type claims, fallback mode, a retry after a failed bind) is `DECLINED` or left to the
//! hooks' logic, which goes the HTTP way.
//!
//! The peer is known from the kernel (`SO_PEERCRED`): only our uid, and the owner pid
//! is the peer itself. The daemon writes the bind's event once the shim reports the
//! bind's result (`DONE`), in the log the process would have written.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use styxy_preload_common::api::{service_name, valid_instance_id, AllocateRequest};
use styxy_preload_common::eventlog::{self, Action, Event, Log};
use styxy_preload_common::hookproto::{self, Answer, Ask, ASK_LEN, DECLINED, DONE, DONE_MAX, GRANTED, KEEP, MAY_MOVE, MOVED};
use styxy_preload_common::policy::Decision;
use styxy_preload_common::procinfo;
use tokio::io::unix::AsyncFd;

use crate::state::{Claim, Owner};
use crate::{now_ms, Backoff, Shared};

/// One connection's whole exchange, `KEEP` to `DONE`: the shim binds in between.
const EXCHANGE: Duration = Duration::from_secs(1);

/// Creates the listening socket at `path` (non-blocking, close-on-exec, mode 0600).
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
    let _ = std::fs::remove_file(path);
    s.bind(&socket2::SockAddr::unix(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    s.listen(128)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Open shim connections at once; past it a connection is closed unanswered (the shim
/// then asks over HTTP, which has its own limit).
const MAX_CONNS: usize = 512;

/// Accepts shim connections for the daemon's life; each one its own task.
pub async fn serve(shared: Arc<Shared>, listener: OwnedFd, uid: u32) {
    let Some(listener) = watch(listener) else { return };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
    let mut backoff = Backoff::default();
    loop {
        let Ok(mut ready) = listener.readable().await else { return };
        // SAFETY: accept4 on our listening socket; the result is a new fd we own.
        let fd = unsafe {
            libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                ready.clear_ready();
            } else {
                drop(ready);
                backoff.after(&e, "hook.sock").await;
            }
            continue;
        }
        backoff.reset();
        // SAFETY: fd was just returned by accept4 and is owned by nobody else.
        let conn = unsafe { OwnedFd::from_raw_fd(fd) };
        match peer(&conn) {
            Some((pid, peer_uid)) if peer_uid == uid => {
                let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
                let sh = shared.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(EXCHANGE, exchange(sh, conn, pid)).await;
                    drop(slot);
                });
            }
            _ => {} // another user's process: closed unanswered
        }
    }
}

/// `fd` in the runtime's reactor.
fn watch(fd: OwnedFd) -> Option<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and keeps its number until the AsyncFd drops it.
    unsafe { AsyncFd::register(fd) }.ok()
}

/// The peer's pid and uid, from the kernel.
fn peer(fd: &OwnedFd) -> Option<(u32, u32)> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt with a buffer of the option's size.
    let rc =
        unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len) };
    (rc == 0).then(|| (u32::try_from(cred.pid).unwrap_or(0), cred.uid))
}

async fn recv(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut ready = fd.readable().await?;
        match ready.try_io(|s| {
            // SAFETY: recv into a buffer of its length, on a socket we own.
            let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

fn send(fd: &AsyncFd<OwnedFd>, msg: &[u8]) {
    // SAFETY: send of a buffer of its length; never waits, never raises SIGPIPE.
    unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
}

/// `KEEP`, the answer, then `DONE`. A malformed or unexpected message ends the exchange.
/// Who asked is read from `/proc` before the answer, while the process waits for it (a
/// short-lived one is gone soon after): its name and directory, which never wait on the
/// process; its log comes with `DONE`. What touches the client's files (the log it names)
/// runs on a blocking thread: a client's path never holds up this thread, which answers
/// every hook and every HTTP request. A new grant whose `DONE` says the bind failed, or
/// whose client closed without one, is withdrawn.
async fn exchange(sh: Arc<Shared>, conn: OwnedFd, pid: u32) {
    let Some(fd) = watch(conn) else { return };
    let mut buf = [0u8; ASK_LEN + 1];
    let started = Instant::now();
    let Ok(n) = recv(&fd, &mut buf).await else { return };
    let Some(ask) = Ask::decode(&buf[..n]).filter(|a| a.kind == KEEP) else { return };
    let Some(grant) = keep(&sh, pid, &ask).await else {
        send(&fd, &Answer { status: DECLINED, port: 0, existing: false }.encode());
        return;
    };
    let _pending = Pending::new(&sh.hook_pending);
    let (port, family, existing) = (grant.port, ask.family, grant.existing);
    let status = if port == ask.port { GRANTED } else { MOVED };
    send(&fd, &Answer { status, port, existing }.encode());
    let mut done = vec![0u8; DONE_MAX + 1];
    let heard = recv(&fd, &mut done).await;
    let message = heard.as_ref().ok().and_then(|n| done.get(..*n)).filter(|m| m.len() >= ASK_LEN);
    let reported =
        message.and_then(|m| Some((Ask::decode(&m[..ASK_LEN])?, &m[ASK_LEN..]))).filter(|(a, _)| a.kind == DONE && a.port == port);
    match reported {
        Some((done, vars)) if done.errno == 0 => {
            // bound: confirmed, and the binder an owner, as a listen would
            if let Some(owner) = Owner::of(grant.pid) {
                sh.confirm(port, owner);
            }
            let vars = log_vars(vars);
            let _ = tokio::task::spawn_blocking(move || log_event(&grant, vars, port, family, started)).await;
        }
        // no word in time: the grant stands while its owner's socket holds the port
        _ if existing || heard.is_err() => {}
        // the bind failed, or the client closed without a word (it gave up): a new grant
        // is withdrawn (the hooks' logic takes it from here)
        _ => sh.withdraw(port),
    }
}

/// Counts an exchange between its grant and its end (logged, withdrawn, or given up).
struct Pending<'a>(&'a AtomicUsize);

impl<'a> Pending<'a> {
    fn new(n: &'a AtomicUsize) -> Pending<'a> {
        n.fetch_add(1, Ordering::AcqRel);
        Pending(n)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the daemon granted, for the event.
struct KeptBind {
    pid: u32,
    /// The port granted: the one asked, or another (a remap).
    port: u16,
    /// The port asked for.
    asked: u16,
    /// Who holds the port asked for, when another was granted (the remap's reason).
    holder: String,
    existing: bool,
    /// The process had bound this port before (a dual-stack twin, a probe).
    again: bool,
    service_type: String,
    session: Option<String>,
    comm: String,
}

/// Grants `ask.port` to `pid`, or another port when the ask [`MAY_MOVE`], as the hooks'
/// logic would for a coordinated port, Styxy consulted when it answers.
async fn keep(sh: &Shared, pid: u32, ask: &Ask<'_>) -> Option<KeptBind> {
    sh.last_activity.store(now_ms(), Ordering::Relaxed);
    let session = std::str::from_utf8(ask.session).ok().filter(|s| !s.is_empty() && *s != "default");
    if session.is_some_and(|s| !valid_instance_id(s)) {
        return None;
    }
    let ty = match sh.state.lock().policy().decide(ask.port) {
        Decision::Coordinated(ty) => ty.to_string(),
        _ => return None,
    };
    // who asks, read while it waits for the answer (neither read waits on the process):
    // the grant is named as the hooks' logic would name it, and so is Styxy's mirror of it
    let comm = procinfo::comm(pid).unwrap_or_else(|| "?".into());
    let asked = AllocateRequest {
        service_name: Some(service_name(&comm, ask.port)),
        instance_id: session.map(str::to_string),
        project_path: procinfo::cwd(pid),
        comm: Some(comm.clone()),
        bind: true,
        ..AllocateRequest::for_port(&ty, ask.port)
    };
    let claim = Claim { exactly: ask.flags & MAY_MOVE == 0, ..Claim::new(asked, Some(Owner::pid(pid))) };
    // mirrored in Styxy when it answers (which may choose another port); a grant that
    // cannot be journaled is not made (and said): the hooks' logic hears why over HTTP
    let g = sh.grant(&claim).await.ok()?;
    // the process had bound this grant before (a twin, a probe): one start
    let again = g.existing && session.is_some_and(|s| sh.state.lock().owned_by(g.port, s, pid));
    Some(KeptBind {
        pid,
        port: g.port,
        asked: ask.port,
        holder: g.holder.as_ref().map(styxy_preload_common::api::Holder::describe).unwrap_or_default(),
        existing: g.existing,
        again,
        service_type: ty,
        session: session.map(str::to_string),
        comm,
    })
}

/// The event the process would have logged (a blocking thread's work: the client names
/// the file).
fn log_event(g: &KeptBind, vars: Option<Vec<(&'static str, std::ffi::OsString)>>, port: u16, family: u8, started: Instant) {
    let (action, reason) = match () {
        _ if g.again => (Action::Observed, Some(eventlog::bound_again(port))),
        _ if port != g.asked => (Action::Remapped, Some(eventlog::taken(g.asked, &g.holder))),
        _ => (Action::Kept, None),
    };
    let ev = Event {
        ts: eventlog::now_ms(),
        session: g.session.clone(),
        pid: g.pid,
        comm: g.comm.clone(),
        call: "bind".into(),
        requested_port: g.asked,
        port,
        family: if family == 6 { "ipv6" } else { "ipv4" }.into(),
        service_type: Some(g.service_type.clone()),
        action,
        reason,
        latency_us: started.elapsed().as_micros() as u64,
        backend: Some("unix".into()),
        retries: 0,
    };
    let log = match vars {
        Some(vars) => Log::of(&|k| vars.iter().find(|(key, _)| *key == k).map(|(_, v)| v.clone())),
        None => log_of(g.pid),
    };
    let _ = log.append(&ev);
}

/// The log variables a `DONE` carried; `None` when it carried none (a shim that does not
/// send them: its environment is read from `/proc` instead).
fn log_vars(tail: &[u8]) -> Option<Vec<(&'static str, std::ffi::OsString)>> {
    use std::os::unix::ffi::OsStrExt;
    let vars: Vec<_> = hookproto::done_vars(tail).map(|(k, v)| (k, std::ffi::OsStr::from_bytes(v).to_owned())).collect();
    (!tail.is_empty()).then_some(vars)
}

/// The event log of `pid`: where its own environment says (`paths::event_log_path`), as
/// `/proc` shows it.
fn log_of(pid: u32) -> Log {
    let env = procinfo::environ(pid);
    Log::of(&|k| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()))
}

#[cfg(test)]
mod tests {
    //! The hook server against a fake shim: the test plays the other end of the
    //! `SOCK_SEQPACKET` connection in the hookproto layout, both ways, and a real
    //! process (`sleep`, with its own environment) is the binder the daemon looks up.
    use std::path::PathBuf;
    use std::process::{Child, Command};

    use socket2::{Domain, Socket, Type};
    use styxy_preload_common::hookproto::ANSWER_LEN;

    use super::*;
    use crate::state::Os;

    const EADDRINUSE: i32 = 98;

    /// A scratch directory, a daemon's state with its journal there, and a process
    /// whose environment puts its event log there too.
    struct Fixture {
        dir: PathBuf,
        sh: Arc<Shared>,
        binder: Child,
    }

    impl Fixture {
        fn new(name: &str) -> Fixture {
            Fixture::with_journal(name, |dir| dir.join("daemon-journal.jsonl"))
        }

        fn with_journal(name: &str, journal: fn(&Path) -> PathBuf) -> Fixture {
            let dir = std::env::temp_dir().join(format!("styxy-hook-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let os = Os { in_use: |_| false, styxy_sees: |_| false, sockets: |_| Some(vec![]) };
            let sh = Shared::for_tests(os, journal(&dir));
            let binder = Command::new("sleep").arg("30").env_clear().env("STYXY_PRELOAD_LOG", dir.join("events.jsonl")).spawn().unwrap();
            Fixture { dir, sh, binder }
        }

        fn events(&self) -> String {
            std::fs::read_to_string(self.dir.join("events.jsonl")).unwrap_or_default()
        }

        fn journal(&self) -> String {
            std::fs::read_to_string(self.dir.join("daemon-journal.jsonl")).unwrap_or_default()
        }

        /// One exchange: the daemon's side runs here, the shim's (`shim`, given its end
        /// of the connection) on a thread; what the shim saw comes back.
        async fn exchange<T: Send + 'static>(&self, shim: impl FnOnce(Socket) -> T + Send + 'static) -> T {
            let (daemon_end, shim_end) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
            daemon_end.set_nonblocking(true).unwrap();
            shim_end.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let peer = std::thread::spawn(move || shim(shim_end));
            let served = tokio::time::timeout(Duration::from_secs(5), exchange(self.sh.clone(), daemon_end.into(), self.binder.id()));
            assert!(served.await.is_ok(), "the exchange ends");
            peer.join().unwrap()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = self.binder.kill();
            let _ = self.binder.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn ask(kind: u8, port: u16, errno: i32, session: &[u8]) -> [u8; ASK_LEN] {
        Ask { kind, port, family: 4, errno, flags: 0, session }.encode().unwrap()
    }

    fn send(s: &Socket, msg: &[u8]) {
        assert_eq!(s.send(msg).unwrap(), msg.len());
    }

    /// The daemon's answer; `None` when it closed the connection unanswered.
    fn answer(s: &Socket) -> Option<Answer> {
        let mut buf = [std::mem::MaybeUninit::new(0u8); ANSWER_LEN + 1];
        let n = s.recv(&mut buf).expect("an answer or the end, within the read timeout");
        // SAFETY: recv initialised the first n bytes (all of them were initialised anyway).
        let bytes: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
        (n > 0).then(|| Answer::decode(&bytes).expect("an answer in the layout"))
    }

    /// KEEP, the answer, then DONE with `errno`.
    fn keep_then_done(port: u16, session: &'static [u8], errno: i32) -> impl FnOnce(Socket) -> Option<Answer> {
        move |s| {
            send(&s, &ask(KEEP, port, 0, session));
            let a = answer(&s);
            if a.is_some_and(|a| a.status == GRANTED) {
                send(&s, &ask(DONE, port, errno, session));
            }
            a
        }
    }

    #[tokio::test]
    async fn a_kept_bind_is_journaled_before_its_answer_then_confirmed_and_logged() {
        let f = Fixture::new("kept");
        let journal = f.dir.join("daemon-journal.jsonl");
        let (got, journaled) = f
            .exchange(move |s| {
                send(&s, &ask(KEEP, 3000, 0, b"s1"));
                let a = answer(&s);
                // the answer is out: its grant must be on disk already
                let journaled = std::fs::read_to_string(&journal).unwrap_or_default();
                send(&s, &ask(DONE, 3000, 0, b"s1"));
                (a, journaled)
            })
            .await;
        assert_eq!(got, Some(Answer { status: GRANTED, port: 3000, existing: false }));
        assert!(journaled.contains("\"port\":3000"), "journaled before the answer: {journaled:?}");
        let st = f.sh.state.lock();
        let a = st.allocation(3000).expect("granted");
        assert!(a.confirmed && a.bind, "confirmed by DONE: {a:?}");
        assert_eq!(a.owners.iter().map(|o| o.pid).collect::<Vec<_>>(), [f.binder.id()]);
        assert_eq!((a.session.as_deref(), a.comm.as_deref()), (Some("s1"), Some("sleep")));
        drop(st);
        let events = f.events();
        assert_eq!(events.lines().count(), 1, "{events}");
        assert!(events.contains("\"action\":\"kept\"") && events.contains("\"port\":3000"), "{events}");
        assert_eq!(f.sh.hook_pending.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_failed_bind_withdraws_its_grant_and_logs_nothing() {
        let f = Fixture::new("withdrawn");
        let got = f.exchange(keep_then_done(3000, b"s1", EADDRINUSE)).await;
        assert_eq!(got.map(|a| a.status), Some(GRANTED));
        assert!(f.sh.state.lock().is_empty(), "withdrawn");
        assert_eq!(f.events(), "");
        assert_eq!(f.sh.hook_pending.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn another_sessions_port_and_an_uncoordinated_one_are_declined_changing_nothing() {
        let f = Fixture::new("declined");
        assert_eq!(f.exchange(keep_then_done(3000, b"a", 0)).await.map(|a| a.status), Some(GRANTED));
        let declined = Some(Answer { status: DECLINED, port: 0, existing: false });
        assert_eq!(f.exchange(keep_then_done(3000, b"b", 0)).await, declined, "a's port: b's would be a remap");
        assert_eq!(f.exchange(keep_then_done(22, b"b", 0)).await, declined, "not a coordinated port");
        let st = f.sh.state.lock();
        assert_eq!(st.len(), 1);
        assert_eq!(st.allocation(3000).and_then(|a| a.session.as_deref()), Some("a"));
        drop(st);
        assert_eq!(f.journal().lines().count(), 1, "one grant, one line");
    }

    #[tokio::test]
    async fn a_shim_that_may_move_gets_another_port_and_the_remap_is_logged() {
        let f = Fixture::new("moved");
        assert_eq!(f.exchange(keep_then_done(3000, b"a", 0)).await.map(|a| a.status), Some(GRANTED));
        let may_move = |session: &'static [u8], errno: i32| {
            move |s: Socket| {
                let ask_move = Ask { kind: KEEP, port: 3000, family: 4, errno: 0, flags: MAY_MOVE, session };
                send(&s, &ask_move.encode().unwrap());
                let a = answer(&s);
                if let Some(a) = a {
                    send(&s, &ask(DONE, a.port, errno, session));
                }
                a
            }
        };
        let got = f.exchange(may_move(b"b", 0)).await.expect("an answer");
        assert_eq!((got.status, got.existing), (MOVED, false));
        assert_ne!(got.port, 3000);
        let b = f.sh.state.lock().allocation(got.port).map(|a| (a.session.clone(), a.requested_port, a.confirmed));
        assert_eq!(b, Some((Some("b".to_string()), Some(3000), true)));
        let events = f.events();
        let remap = events.lines().find(|l| l.contains("\"action\":\"remapped\"")).unwrap_or_else(|| panic!("{events}"));
        assert!(remap.contains("\"requested_port\":3000") && remap.contains("port 3000 is taken by sleep"), "{remap}");
        // withdrawn when the bind of the other port fails
        let got = f.exchange(may_move(b"c", EADDRINUSE)).await.expect("an answer");
        assert_eq!(got.status, MOVED);
        assert!(f.sh.state.lock().allocation(got.port).is_none(), "withdrawn");
    }

    #[tokio::test]
    async fn a_binder_gone_before_done_is_logged_where_its_done_says() {
        let mut f = Fixture::new("gone");
        let elsewhere = f.dir.join("elsewhere.jsonl");
        let log_var = format!("STYXY_PRELOAD_LOG={}\0", elsewhere.display());
        // the binder's name is read while it waits for the answer; it exits right after
        let pid = f.binder.id();
        let _ = f.binder.kill();
        let got = f
            .exchange(move |s| {
                send(&s, &ask(KEEP, 3000, 0, b"s1"));
                let a = answer(&s);
                let _ = std::process::Command::new("true").status(); // time for the exit to land
                let mut done = ask(DONE, 3000, 0, b"s1").to_vec();
                done.extend_from_slice(log_var.as_bytes());
                done.extend_from_slice(b"PATH=/bin\0");
                send(&s, &done);
                a
            })
            .await;
        assert_eq!(got.map(|a| a.status), Some(GRANTED));
        let _ = f.binder.wait();
        assert!(!std::path::Path::new(&format!("/proc/{pid}/environ")).exists() || procinfo::environ(pid).is_empty());
        let events = std::fs::read_to_string(&elsewhere).unwrap_or_default();
        assert!(events.contains("\"action\":\"kept\"") && events.contains("\"comm\":\"sleep\""), "{events:?}");
        assert_eq!(f.events(), "", "not where /proc would have said");
    }

    #[tokio::test]
    async fn garbage_or_an_early_close_ends_the_exchange() {
        let f = Fixture::new("garbage");
        let mut bad = ask(KEEP, 3000, 0, b"s1");
        bad[0] ^= 1; // another layout
        let got = f.exchange(move |s| {
            send(&s, &bad);
            answer(&s)
        });
        assert_eq!(got.await, None, "closed unanswered");
        assert!(f.sh.state.lock().is_empty());
        // granted, then the shim is gone before DONE (it gave up): the grant is withdrawn,
        // and nothing is logged
        let got = f.exchange(|s| {
            send(&s, &ask(KEEP, 3000, 0, b"s1"));
            answer(&s)
        });
        assert_eq!(got.await.map(|a| a.status), Some(GRANTED));
        assert!(f.sh.state.lock().allocation(3000).is_none(), "withdrawn");
        // a DONE for another port is no DONE: withdrawn too
        let got = f.exchange(|s| {
            send(&s, &ask(KEEP, 3001, 0, b"s2"));
            let a = answer(&s);
            send(&s, &ask(DONE, 4000, 0, b"s2"));
            a
        });
        assert_eq!(got.await.map(|a| a.status), Some(GRANTED));
        assert!(f.sh.state.lock().is_empty());
        assert_eq!(f.events(), "");
        assert_eq!(f.sh.hook_pending.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_grant_that_cannot_be_journaled_is_declined() {
        // the journal's path is a directory: no line can be written
        let f = Fixture::with_journal("unjournaled", |dir| dir.to_path_buf());
        let got = f.exchange(keep_then_done(3000, b"s1", 0)).await;
        assert_eq!(got.map(|a| a.status), Some(DECLINED));
        assert!(f.sh.state.lock().is_empty(), "withdrawn");
    }
}
