//! The shim's socket (docs/ARCHITECTURE.md "Hook ↔ daemon protocol"): `hook.sock`, a
//! `SOCK_SEQPACKET` Unix socket beside `daemon.sock`, speaking the fixed layout of
//! `styxy_preload_common::hookproto`. It answers one question — which port may this
//! process bind for the one it asked for? — so that a process's coordinated bind, kept or
//! remapped, costs one round trip and no library load; when Styxy answers, the grant
//! waits for its word on this side of the exchange (`Shared::grant`). A port that is not
//! the process's to coordinate is `DECLINED` (bound as asked); what the shim did alone
//! comes as a `NOTE`, and what it did while this daemon could not be asked waits in the
//! spool ([`drain_spool`]).
//!
//! The peer is known from the kernel (`SO_PEERCRED`): only our uid, and the owner pid
//! is the peer itself — or, for a `KEEP` the seccomp supervisor makes for the program it
//! traces (`FOR_CHILD`), the pid it names, when that is the peer's descendant or a process
//! of the ask's session (the rule `POST /allocate` holds a named pid to). The daemon writes every hooked call's event — a bind's once the
//! shim reports its result (`DONE`) — in the log the process names.
//!
//! One thread of its own serves every connection (`Loop`): an `epoll` set over the
//! listening socket and the connections waiting for their next message, each with its
//! deadline, so that a silent client holds up no other and an exchange costs no task, no
//! wake-up of the runtime's thread and the fewest system calls. A grant that waits for
//! Styxy stays a future of the loop's: Styxy's answer (or the end of its wait) rings an
//! `eventfd` in the set, and the loop polls it again and answers, with no other thread in
//! between; the bind's event is written on a thread of its own (the client names the file).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use styxy_preload_common::api::{service_name, valid_instance_id, AllocateRequest};
use styxy_preload_common::decide::{self, Class, Facts, Mode, Plan};
use styxy_preload_common::eventlog::{self, Action, Event, Log};
use styxy_preload_common::hookproto::{
    self, Answer, Ask, ASK_LEN, BUSY, CONFIRM, DECLINED, DONE, DONE_MAX, FALLBACK, GRANTED, KEEP, MAY_MOVE, MOVED, NOTE, ON_CONFLICT_MODE,
    OWN_RULES, REFUSED, SHARES_PORT, TAKEN,
};
use styxy_preload_common::procinfo;
use styxy_preload_common::reason::{AskError, Reason};
use tokio::runtime::Handle;

use crate::record::Refusal;
use crate::state::{AllocError, Claim, Grant, Owner};
use crate::{now_ms, Backoff, Shared};

/// Refusals are told (and logged) only while fewer events than this wait to be written:
/// a client flooding `REFUSED` costs its own lines, not the daemon's memory.
const MAX_PENDING_EVENTS: usize = 1024;

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

/// Creates the mailbox at `path` (`hookproto::MAILBOX`): a datagram socket (non-blocking,
/// close-on-exec, mode 0600) whose senders' credentials come with each datagram. The
/// hook thread reads it when its wait times out, when it is rung, and every [`MAIL_EVERY`]
/// while busy, never waiting on it.
pub fn mailbox(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
    let _ = std::fs::remove_file(path);
    s.bind(&socket2::SockAddr::unix(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    s.set_nonblocking(true)?;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with an int option of its size, on our socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of_val(&on) as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s.into())
}

/// Notes read from the mailbox in one turn at most (the rest wait for the next one).
const MAIL_PER_TURN: usize = 64;
/// How often a busy loop reads the mailbox (an idle one: each time its wait times out).
const MAIL_EVERY: Duration = Duration::from_millis(5);

/// Open shim connections at once; past it the next waits in the backlog until a place
/// frees (a silent connection's deadline).
const MAX_CONNS: usize = 512;
/// How long a full server leaves its backlog alone before it looks for a free place.
const FULL_PAUSE: Duration = Duration::from_millis(10);

/// The hook server's thread, and what stops it.
pub struct Server {
    wake: Arc<Wake>,
    thread: std::thread::JoinHandle<()>,
}

impl Server {
    /// Serves `listener` (peers of `uid` only) on a thread of its own, until [`stop`]ped.
    /// Call it on the runtime: a grant that waits for Styxy times its wait there.
    ///
    /// [`stop`]: Server::stop
    pub fn start(sh: Arc<Shared>, listener: OwnedFd, mailbox: Option<OwnedFd>, uid: u32) -> io::Result<Server> {
        let mut lp = Loop::new(sh.clone(), Handle::current())?;
        lp.listen(listener, uid)?;
        lp.mailbox = mailbox.map(|fd| (fd, uid));
        let wake = lp.wake.clone();
        let ring = wake.clone();
        let _ = sh.hook_ring.set(Box::new(move || ring.ring()));
        let thread = std::thread::Builder::new().name("hook".into()).spawn(move || lp.run())?;
        Ok(Server { wake, thread })
    }

    /// Stops the thread; the exchanges in flight end as at their deadline.
    pub fn stop(self) {
        self.wake.stop.store(true, Ordering::Release);
        self.wake.ring();
        let _ = self.thread.join();
    }
}

/// How other threads reach the loop: an `eventfd` in its set, the connections whose grant
/// can go on (Styxy had its word, or its wait ended), and the order to stop.
struct Wake {
    fd: OwnedFd,
    woken: Mutex<Vec<u64>>,
    stop: AtomicBool,
}

impl Wake {
    fn new() -> io::Result<Wake> {
        // SAFETY: eventfd with flags; the result is a new fd we own, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by eventfd and is owned by nobody else.
        Ok(Wake { fd: unsafe { OwnedFd::from_raw_fd(fd) }, woken: Mutex::new(Vec::new()), stop: AtomicBool::new(false) })
    }

    fn ring(&self) {
        let one = 1u64;
        // SAFETY: an 8-byte write from a local, to our eventfd.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn clear(&self) {
        let mut n = 0u64;
        // SAFETY: an 8-byte read into a local, from our non-blocking eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }
}

/// What wakes the loop for the grant of one connection: its id, handed over, and the
/// `eventfd` rung. The grant's future is polled again on the loop's thread, which answers at
/// once (no other thread in between).
struct GrantWaker {
    id: u64,
    wake: Arc<Wake>,
}

impl std::task::Wake for GrantWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wake.woken.lock().push(self.id);
        self.wake.ring();
    }
}

/// A grant waiting for Styxy's word (`Shared::grant`), polled on the loop's thread.
type Granting = (Pin<Box<dyn Future<Output = Got> + Send>>, Waker);

/// `epoll` tokens: the listening socket, the [`Wake`] `eventfd`; a connection's is its id.
const LISTENER: u64 = 0;
const WAKE: u64 = 1;

/// The hook server: every connection's exchange, one thread, one `epoll` set.
struct Loop {
    sh: Arc<Shared>,
    rt: Handle,
    epoll: OwnedFd,
    wake: Arc<Wake>,
    /// The listening socket and the uid it serves (none in the unit tests).
    listener: Option<(OwnedFd, u32)>,
    /// The mailbox ([`mailbox`]) and the uid whose notes it takes.
    mailbox: Option<(OwnedFd, u32)>,
    /// When the mailbox was last read.
    mail_read: Instant,
    backoff: Backoff,
    /// Accepting waits until then after an accept that failed for want of resources.
    paused: Option<Instant>,
    conns: HashMap<u64, Conn>,
    /// The grants waiting for Styxy, by connection: one whose client left meanwhile goes
    /// on, and is withdrawn once made.
    granting: HashMap<u64, Granting>,
    /// Each connection's deadline, in the order they were accepted (which is time
    /// order); those of connections already closed are skipped.
    deadlines: VecDeque<(Instant, u64)>,
    next_id: u64,
    /// The events the shim's exchanges end with, written in the order they ended.
    events: Events,
    /// A grant was answered this turn: its `DONE` follows within microseconds.
    done_due: bool,
    /// Since when this thread's wake-ups wait for a turn with no `DONE` due
    /// ([`Shared::pay_wakes`]).
    owed_since: Option<Instant>,
}

/// One thread that writes the events of the shim's exchanges, in the order they were
/// handed over (a server's bind and its dual-stack twin's are logged in that order), off
/// the hook server's thread: a client's log on a slow disk costs the log, not the binds.
struct Events {
    tx: Option<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Events {
    fn start() -> io::Result<Events> {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let thread = std::thread::Builder::new().name("hook-events".into()).spawn(move || {
            while let Ok(write) = rx.recv() {
                write();
            }
        })?;
        Ok(Events { tx: Some(tx), thread: Some(thread) })
    }

    /// Writes with `write` after what was handed over before; `pending` counts it until
    /// it is written (`POST /flush` waits for it).
    fn write(&self, pending: Pending, write: impl FnOnce() + Send + 'static) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Box::new(move || {
                write();
                drop(pending);
            }));
        }
    }

    /// Takes no more, and lets the thread write what it was handed (for at most `bound`:
    /// a log on a frozen disk does not hold up the daemon's exit).
    fn finish(&mut self, bound: Duration) {
        self.tx = None;
        let until = Instant::now() + bound;
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(t) = self.thread.take().filter(|t| t.is_finished()) {
            let _ = t.join();
        }
    }
}

struct Conn {
    fd: OwnedFd,
    pid: u32,
    started: Instant,
    /// In the `epoll` set (once it had to wait for a message).
    watched: bool,
    stage: Stage,
}

enum Stage {
    /// Accepted: `KEEP` next.
    Keep,
    /// The grant waits for Styxy's word (`Loop::granting`).
    Granting(Asked),
    /// Answered: `DONE` next. Counted in `hook_pending` until its end.
    Done(KeptBind, Pending),
}

impl Loop {
    fn new(sh: Arc<Shared>, rt: Handle) -> io::Result<Loop> {
        // SAFETY: epoll_create1 with a flag; the result is a new fd we own, or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by epoll_create1 and is owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let wake = Arc::new(Wake::new()?);
        ctl(&epoll, libc::EPOLL_CTL_ADD, wake.fd.as_raw_fd(), WAKE)?;
        let (conns, deadlines, events) = (HashMap::new(), VecDeque::new(), Events::start()?);
        Ok(Loop {
            sh,
            rt,
            epoll,
            wake,
            listener: None,
            mailbox: None,
            mail_read: Instant::now(),
            backoff: Backoff::default(),
            paused: None,
            conns,
            granting: HashMap::new(),
            deadlines,
            next_id: 2,
            events,
            done_due: false,
            owed_since: None,
        })
    }

    fn listen(&mut self, listener: OwnedFd, uid: u32) -> io::Result<()> {
        ctl(&self.epoll, libc::EPOLL_CTL_ADD, listener.as_raw_fd(), LISTENER)?;
        self.listener = Some((listener, uid));
        Ok(())
    }

    fn run(mut self) {
        self.sh.owe_wakes();
        while !self.wake.stop.load(Ordering::Acquire) {
            self.turn();
        }
        self.last_word();
    }

    /// At the stop: what the shims already said is heard (the mailbox's notes, each
    /// `DONE` already sent), and every event handed over is written (for at most 2 s), so
    /// that a stop loses no event of a bind made before it.
    fn last_word(&mut self) {
        self.read_mail();
        let done: Vec<u64> = self.conns.iter().filter(|(_, c)| matches!(c.stage, Stage::Done(..))).map(|(id, _)| *id).collect();
        for id in done {
            self.readable(id);
        }
        self.sh.pay_wakes();
        self.events.finish(Duration::from_secs(2));
    }

    /// Waits for what is ready (at most until the next deadline) and serves it.
    fn turn(&mut self) {
        const MAX_EVENTS: usize = 64;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
        let n = self.wait(&mut events);
        let ready = events.iter().take(usize::try_from(n).unwrap_or(0));
        let rung = ready.clone().any(|ev| ev.u64 == WAKE);
        for ev in ready {
            match ev.u64 {
                LISTENER => self.accept(),
                WAKE => self.finished(),
                id => self.readable(id),
            }
        }
        // the mailbox: at a turn that timed out (at least every beat), that was rung
        // (`/flush`), or every few milliseconds while exchanges keep the loop busy; after
        // the connections, so that a process's `DONE`, sent before its note, is logged first
        if n == 0 || rung || self.mail_read.elapsed() >= MAIL_EVERY {
            // what `/flush` asked before this read is answered by it
            let asked = self.sh.mail_asked.load(Ordering::Acquire);
            self.mail_read = Instant::now();
            self.read_mail();
            self.sh.mail_read.fetch_max(asked, Ordering::AcqRel);
        }
        self.expire(Instant::now());
        // the writer is woken once every answer of this turn is sent and no shim's DONE is
        // due (under a steady load, a millisecond after it was first owed at the latest)
        if self.done_due && self.owed_since.get_or_insert_with(Instant::now).elapsed() < Duration::from_millis(1) {
            return;
        }
        self.sh.pay_wakes();
        self.owed_since = None;
    }

    /// Waits for what is ready (`epoll_wait` into `events`): after a grant, first awake
    /// for up to [`DONE_SPIN`] (yielding to any other thread that wants this CPU).
    fn wait(&mut self, events: &mut [libc::epoll_event]) -> i32 {
        let (epoll, max) = (self.epoll.as_raw_fd(), i32::try_from(events.len()).unwrap_or(i32::MAX));
        if std::mem::take(&mut self.done_due) {
            let until = Instant::now() + DONE_SPIN;
            loop {
                // SAFETY: epoll_wait into `events` (at most `max` of them), on our epoll fd, not waiting.
                let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), max, 0) };
                if n != 0 || Instant::now() >= until {
                    return n;
                }
                std::thread::yield_now();
            }
        }
        // SAFETY: as above, waiting at most until the next deadline.
        unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), max, self.timeout_ms()) }
    }

    /// Milliseconds until the next deadline or the end of a pause, rounded up, and at most
    /// until the mailbox is read again (-1: none of them).
    fn timeout_ms(&self) -> i32 {
        let next = self.deadlines.front().map(|(at, _)| *at).into_iter().chain(self.paused).min();
        let left = next.map(|at| at.saturating_duration_since(Instant::now()).as_micros().div_ceil(1000));
        let mail = self.mailbox.as_ref().map(|_| u128::from(styxy_preload_common::mapview::BEAT_EVERY_MS));
        left.into_iter().chain(mail).min().map_or(-1, |ms| i32::try_from(ms).unwrap_or(i32::MAX))
    }

    /// Reads what the mailbox holds ([`MAIL_PER_TURN`] notes at most): each a `NOTE` of a
    /// process of our uid, as if it came on a connection.
    fn read_mail(&mut self) {
        let Some((fd, uid)) = self.mailbox.as_ref().map(|(fd, uid)| (fd.as_raw_fd(), *uid)) else { return };
        let mut buf = [0u8; DONE_MAX + 1];
        for _ in 0..MAIL_PER_TURN {
            let Some((n, pid, from)) = recv_with_creds(fd, &mut buf) else { return };
            let msg = &buf[..n];
            let ask = msg.get(..ASK_LEN).and_then(Ask::decode).filter(|a| a.kind == NOTE && from == uid && pid != 0);
            if let Some((ask, (pid, vars))) = ask.and_then(|a| Some((a, who_asks(pid, &a, &msg[ASK_LEN..])?))) {
                self.sh.metrics.hook_notes[1].fetch_add(1, Ordering::Relaxed);
                self.note_of(pid, &ask, vars);
            }
        }
    }

    /// Accepts one connection (the listener stays ready while more wait).
    fn accept(&mut self) {
        let Some((listener, uid)) = self.listener.as_ref().map(|(l, u)| (l.as_raw_fd(), *u)) else { return };
        if self.conns.len() >= MAX_CONNS {
            // full: the next connection waits in the backlog (its shim waits while this
            // daemon beats) until a silent one's deadline frees a place
            self.pause(listener, FULL_PAUSE);
            return;
        }
        // SAFETY: accept4 on our listening socket; the result is a new fd we own, or -1.
        let fd = unsafe { libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                if let Some(wait) = self.backoff.next(&e, "hook.sock") {
                    self.pause(listener, wait);
                }
            }
            return;
        }
        self.backoff.reset();
        // SAFETY: fd was just returned by accept4 and is owned by nobody else.
        let conn = unsafe { OwnedFd::from_raw_fd(fd) };
        match peer(&conn) {
            Some((pid, peer_uid)) if peer_uid == uid => self.adopt(conn, pid),
            _ => {} // another user's process: closed unanswered
        }
    }

    /// Stops accepting for `wait` (`Backoff`): the failed connection stays queued, and
    /// the listener ready.
    fn pause(&mut self, listener: RawFd, wait: Duration) {
        let _ = ctl(&self.epoll, libc::EPOLL_CTL_DEL, listener, LISTENER);
        self.paused = Some(Instant::now() + wait);
    }

    /// A new connection from `pid`: its exchange starts (the `KEEP` is usually there).
    fn adopt(&mut self, fd: OwnedFd, pid: u32) {
        let (id, started) = (self.next_id, Instant::now());
        self.next_id += 1;
        self.conns.insert(id, Conn { fd, pid, started, watched: false, stage: Stage::Keep });
        self.deadlines.push_back((started + EXCHANGE, id));
        self.readable(id);
    }

    /// Connection `id` has a message, or has closed.
    fn readable(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        if matches!(c.stage, Stage::Granting(_)) {
            // it spoke or left before its answer: the exchange is over (the grant, once
            // made, finds it gone and is withdrawn)
            self.conns.remove(&id);
            return;
        }
        let mut buf = [0u8; DONE_MAX + 1];
        match recv(&c.fd, &mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.watch(id),
            heard => match std::mem::replace(&mut c.stage, Stage::Keep) {
                Stage::Keep => self.keep(id, heard.ok().and_then(|n| buf.get(..n))),
                Stage::Done(bind, pending) => {
                    let started = c.started;
                    self.done(bind, pending, started, heard.as_ref().map(|n| &buf[..*n]).map_err(|_| ()));
                    self.conns.remove(&id); // closed once its grant is confirmed or withdrawn
                }
                Stage::Granting(_) => {}
            },
        }
    }

    /// Connection `id` waits for its next message in the `epoll` set.
    fn watch(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        if !c.watched {
            c.watched = ctl(&self.epoll, libc::EPOLL_CTL_ADD, c.fd.as_raw_fd(), id).is_ok();
            if !c.watched {
                self.conns.remove(&id);
            }
        }
    }

    /// The `KEEP` of connection `id` (anything else ends it): declined, or granted now,
    /// or once Styxy has had its word.
    fn keep(&mut self, id: u64, msg: Option<&[u8]>) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        // a REFUSED or a NOTE carries the log variables after the ask; the others are the ask alone
        let (head, mut tail) = msg.filter(|m| m.len() >= ASK_LEN).map_or((None, &[][..]), |m| (Some(&m[..ASK_LEN]), &m[ASK_LEN..]));
        // an ask for another process (FOR_CHILD): that process asks from here on
        match head.and_then(Ask::decode).map(|a| who_asks(c.pid, &a, tail)) {
            Some(Some((pid, rest))) => (c.pid, tail) = (pid, rest),
            Some(None) => {
                send(c.fd.as_raw_fd(), &Answer { status: DECLINED, port: 0, existing: false }.encode());
                self.conns.remove(&id);
                return;
            }
            None => {}
        }
        let ask = head.and_then(Ask::decode).filter(|a| match a.kind {
            KEEP => tail.is_empty() || a.flags & FALLBACK != 0,
            CONFIRM => tail.is_empty(),
            REFUSED | NOTE => true,
            _ => false,
        });
        let Some(ask) = ask else {
            self.conns.remove(&id);
            return;
        };
        if ask.kind == REFUSED {
            self.refused(id, &ask, tail);
            return;
        }
        if ask.kind == NOTE {
            self.noted(id, &ask, tail);
            return;
        }
        if ask.kind == CONFIRM {
            // a forked child listens on what its parent kept: it becomes an owner, of its
            // own session's allocation only
            let session = std::str::from_utf8(ask.session).ok().filter(|s| !s.is_empty()).map(styxy_preload_common::session::sanitize);
            let ours = self.sh.state.lock().allocation(ask.port).is_some_and(|a| a.session == session);
            if let Some(owner) = Owner::of(c.pid).filter(|_| ours) {
                self.sh.confirm(ask.port, owner);
            }
            self.conns.remove(&id);
            return;
        }
        self.sh.metrics.hook_asks.fetch_add(1, Ordering::Relaxed);
        let Some((asked, claim)) = claim(&self.sh, c.pid, &ask, tail) else {
            self.granted(id, None, Got::Declined(None));
            return;
        };
        if asked.fallback && ask.flags & TAKEN != 0 {
            // taken at the OS level: a tool that moves on by itself does
            self.granted(id, Some(asked), Got::Busy);
            return;
        }
        let (sh, fallback) = (self.sh.clone(), asked.fallback);
        let mut grant: Pin<Box<dyn Future<Output = Got> + Send>> = Box::pin(async move {
            match sh.grant(&claim).await {
                Ok(g) => Got::Grant(g),
                // fallback mode: not this port as it is, and no other
                Err(Refusal::State(AllocError::NotExactly)) if fallback => Got::Busy,
                Err(Refusal::State(AllocError::NotExactly)) => Got::Declined(None),
                Err(r) => Got::Declined(Some(crate::server::refusal(&sh, &r))),
            }
        });
        let waker = Waker::from(Arc::new(GrantWaker { id, wake: self.wake.clone() }));
        match self.poll_grant(&mut grant, &waker) {
            Poll::Ready(g) => self.granted(id, Some(asked), g),
            Poll::Pending => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.stage = Stage::Granting(asked);
                }
                self.granting.insert(id, (grant, waker));
            }
        }
    }

    /// Polls a grant on this thread, within the runtime (a grant that asks Styxy sets a
    /// timer there, whose end wakes `waker` as Styxy's answer does).
    fn poll_grant(&self, grant: &mut Pin<Box<dyn Future<Output = Got> + Send>>, waker: &Waker) -> Poll<Got> {
        let _rt = self.rt.enter();
        grant.as_mut().poll(&mut Context::from_waker(waker))
    }

    /// A refused connect of connection `id`'s process (isolation): told who serves the
    /// port, in the line it tells the person; the event written (on the events' thread),
    /// in the log its variables name. Only a port another session holds is told and
    /// logged (anything else closes unanswered), and not while a flood of events waits.
    fn refused(&mut self, id: u64, ask: &Ask<'_>, vars: &[u8]) {
        let Some(c) = self.conns.remove(&id) else { return };
        // the session's id as the hooks' logic names it (characters out of place as `_`)
        let session = std::str::from_utf8(ask.session).ok().filter(|s| !s.is_empty()).map(styxy_preload_common::session::sanitize);
        let told = {
            let state = self.sh.state.lock();
            state.allocation(ask.port).filter(|a| a.session.is_some() && a.session != session).map(|a| {
                let server = eventlog::server_of(a.session.as_deref(), a.comm.as_deref(), a.owners.first().map(|o| o.pid));
                (server, state.policy().decide(ask.port).service_type().map(str::to_string))
            })
        };
        let Some((server, service_type)) = told.filter(|_| self.sh.hook_pending.load(Ordering::Acquire) < MAX_PENDING_EVENTS) else {
            return;
        };
        let line = eventlog::refused_notice(ask.port, &server, session.as_deref().unwrap_or("?"));
        let (head, line) = Answer::told(ask.port, line.as_bytes());
        let pending = Pending::new(self.sh.clone()); // counted before the client can read on
        send(c.fd.as_raw_fd(), &[&head[..], line].concat());
        let (pid, port, family, vars) = (c.pid, ask.port, ask.family, log_vars(vars));
        // its name as the ask says it (the client may be gone by the time this is written)
        let named = std::str::from_utf8(ask.comm).ok().filter(|c| !c.is_empty()).map(str::to_string);
        self.events.write(pending, move || {
            let comm = named.or_else(|| procinfo::comm_and_start(pid).map(|(comm, _)| comm)).unwrap_or_else(|| "?".into());
            let ev = Event {
                ts: eventlog::now_ms(),
                session,
                pid,
                comm,
                call: "connect".into(),
                requested_port: port,
                port,
                family: if family == 6 { "ipv6" } else { "ipv4" }.into(),
                service_type,
                action: Action::Isolated,
                reason: Some(eventlog::refused(port, &server)),
                latency_us: 0,
                backend: None,
                retries: 0,
            };
            let _ = log_named(vars, pid).append(&ev);
        });
    }

    /// What connection `id`'s process did alone (`NOTE`): its event written (on the
    /// events' thread), in the log its variables name; nothing is answered, and nothing is
    /// written while a flood of events waits.
    fn noted(&mut self, id: u64, ask: &Ask<'_>, vars: &[u8]) {
        if let Some(c) = self.conns.remove(&id) {
            self.sh.metrics.hook_notes[0].fetch_add(1, Ordering::Relaxed);
            self.note_of(c.pid, ask, vars);
        }
    }

    /// What process `pid` did alone (`NOTE`, on a connection or in the mailbox).
    fn note_of(&mut self, pid: u32, ask: &Ask<'_>, vars: &[u8]) {
        if matches!(ask.note, hookproto::NOTE_STUCK | hookproto::NOTE_AGAIN) {
            self.stuck(pid, ask, vars);
            return;
        }
        if self.sh.hook_pending.load(Ordering::Acquire) >= MAX_PENDING_EVENTS {
            return;
        }
        let Some(ev) = note_event(&self.sh, pid, ask, eventlog::now_ms()) else { return };
        let (pending, vars) = (Pending::new(self.sh.clone()), log_vars(vars));
        self.events.write(pending, move || {
            let _ = log_named(vars, pid).append(&ev);
        });
    }

    /// `pid` bound `ask.port` as its session's own for `ask.origin`, with no round trip
    /// (`NOTE_STUCK`: the shim read the port map): the session's allocation there gets the
    /// process as an owner — made again when a sweep freed it meanwhile and the process
    /// still runs — and the bind's event is written, as after a `KEEP` answered so and its
    /// `DONE`. `NOTE_AGAIN`: the process had kept that port itself (a dual-stack twin),
    /// and the bind is logged as one made again.
    fn stuck(&mut self, pid: u32, ask: &Ask<'_>, vars: &[u8]) {
        let keep = Ask { kind: KEEP, port: ask.origin, flags: ask.flags & MAY_MOVE, note: 0, ..*ask };
        let Some((asked, claim)) = claim(&self.sh, pid, &keep, &[]) else { return };
        let again = ask.note == hookproto::NOTE_AGAIN;
        let g = match again {
            true => Grant { port: ask.port, lock_id: String::new(), existing: true, holder: None },
            false => match self.sh.adopt(&claim, ask.port, || procinfo::alive(pid, 0)) {
                Some(g) => g,
                None => return,
            },
        };
        let started = Instant::now();
        let mut bind = kept(&self.sh, asked, g);
        bind.again |= again;
        if !again && !bind.lock.is_empty() {
            // an owner now, as a DONE makes one (a process gone leaves none known by pid only)
            let owner = owner_read(&self.sh, &bind).or_else(|| Owner::of(pid));
            if let Some(owner) = owner {
                self.sh.confirm_of(bind.port, &bind.lock, owner);
            }
        }
        if self.sh.hook_pending.load(Ordering::Acquire) >= MAX_PENDING_EVENTS {
            return; // a flood: its events are not written
        }
        let vars = log_vars(vars);
        self.events.write(Pending::new(self.sh.clone()), move || log_event(&bind, vars, started));
    }

    /// The grants woken (Styxy had its word, or its wait ended): polled, and those made
    /// answered.
    fn finished(&mut self) {
        self.wake.clear();
        let woken = std::mem::take(&mut *self.wake.woken.lock());
        for id in woken {
            let Some((mut grant, waker)) = self.granting.remove(&id) else { continue };
            let g = match self.poll_grant(&mut grant, &waker) {
                Poll::Ready(g) => g,
                Poll::Pending => {
                    self.granting.insert(id, (grant, waker));
                    continue;
                }
            };
            let asked = self.conns.get_mut(&id).and_then(|c| match std::mem::replace(&mut c.stage, Stage::Keep) {
                Stage::Granting(asked) => Some(asked),
                _ => None,
            });
            self.granted(id, asked, g);
        }
    }

    /// Answers connection `id`: what `asked` got — a grant, `BUSY` (logged here), or
    /// `DECLINED`. A new grant whose client is gone or out of time is withdrawn.
    fn granted(&mut self, id: u64, asked: Option<Asked>, got: Got) {
        let now = Instant::now();
        let live = self.conns.get(&id).filter(|c| now < c.started + EXCHANGE).map(|c| c.fd.as_raw_fd());
        match (live, asked, got) {
            (Some(fd), Some(asked), Got::Busy) => {
                let pending = Pending::new(self.sh.clone()); // counted before the client can read on
                send(fd, &Answer { status: BUSY, port: asked.port, existing: false }.encode());
                self.events.write(pending, move || log_busy(&asked));
            }
            (Some(fd), Some(asked), Got::Grant(g)) => {
                let bind = kept(&self.sh, asked, g);
                let status = if bind.port == bind.asked.port { GRANTED } else { MOVED };
                let pending = Pending::new(self.sh.clone()); // counted before the client can read on
                send(fd, &Answer { status, port: bind.port, existing: bind.existing }.encode());
                if let Some(c) = self.conns.get_mut(&id) {
                    c.stage = Stage::Done(bind, pending);
                }
                self.watch(id);
                self.done_due = true;
                return;
            }
            (Some(fd), Some(asked), Got::Declined(Some((status, message)))) => {
                // refused (a full range, a quota, Styxy): as asked, and the person and the
                // event are told why
                let why = Reason::Unasked(AskError::Refused { status, message });
                let line = format!("{why}{}", hookproto::PASS_THROUGH);
                let pending = Pending::new(self.sh.clone()); // counted before the client can read on
                let (head, line) = Answer { status: DECLINED, port: 0, existing: false }.with_line(line.as_bytes());
                send(fd, &[&head[..], line].concat());
                self.events.write(pending, move || {
                    let ev = bind_event(&asked, asked.port, Action::Passthrough, Some(why.to_string()), 0);
                    let _ = log_named(asked.vars.clone(), asked.pid).append(&ev);
                });
            }
            (Some(fd), ..) => send(fd, &Answer { status: DECLINED, port: 0, existing: false }.encode()),
            (None, _, Got::Grant(g)) if !g.existing => self.sh.withdraw(g.port),
            (None, ..) => {}
        }
        self.conns.remove(&id);
    }

    /// The end of an answered exchange: what `DONE` said (`Err`: nothing could be read).
    fn done(&self, bind: KeptBind, pending: Pending, started: Instant, heard: Result<&[u8], ()>) {
        let port = bind.port;
        let message = heard.ok().filter(|m| m.len() >= ASK_LEN);
        let reported =
            message.and_then(|m| Some((Ask::decode(&m[..ASK_LEN])?, &m[ASK_LEN..]))).filter(|(a, _)| a.kind == DONE && a.port == port);
        match reported {
            Some((done, vars)) if done.errno == 0 => {
                // bound: confirmed, and the binder an owner, as a listen would
                let owner = match bind.asked.later && !bind.existing {
                    true => owner_read(&self.sh, &bind),
                    false => bind.asked.owner.clone().or_else(|| Owner::of(bind.asked.pid)),
                };
                if let Some(owner) = owner {
                    self.sh.confirm(port, owner);
                }
                let vars = log_vars(vars);
                self.events.write(pending, move || log_event(&bind, vars, started));
            }
            Some((done, vars)) => {
                // the bind failed: a new grant is withdrawn (the shim asks again, or binds
                // as asked), and the event says why
                if !bind.existing {
                    self.sh.withdraw(port);
                }
                let (errno, vars) = (done.errno, log_vars(vars));
                self.events.write(pending, move || log_failed(&bind, errno, vars, started));
            }
            // no word: the grant stands while its owner's socket holds the port
            _ if bind.existing || heard.is_err() => {
                owner_read(&self.sh, &bind);
            }
            // the client closed without a word (it gave up): a new grant is withdrawn
            _ => self.sh.withdraw(port),
        }
    }

    /// Closes the connections whose time is up: unanswered, or with their grant standing
    /// (no word in time). One waiting for Styxy ends when Styxy's word comes.
    fn expire(&mut self, now: Instant) {
        while let Some(&(_, id)) = self.deadlines.front().filter(|(at, _)| *at <= now) {
            self.deadlines.pop_front();
            if self.conns.get(&id).is_some_and(|c| !matches!(c.stage, Stage::Granting(_))) {
                if let Some(Conn { stage: Stage::Done(bind, _), .. }) = self.conns.remove(&id) {
                    owner_read(&self.sh, &bind); // its grant stands without a word
                }
            }
        }
        if self.paused.is_some_and(|until| until <= now) {
            self.paused = None;
            if let Some((l, _)) = &self.listener {
                let _ = ctl(&self.epoll, libc::EPOLL_CTL_ADD, l.as_raw_fd(), LISTENER);
            }
        }
    }
}

/// Adds `fd` to (or removes it from) the `epoll` set, readable, with `token`.
fn ctl(epoll: &OwnedFd, op: i32, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
    // SAFETY: epoll_ctl on our epoll fd with a valid event struct.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut ev) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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

/// How long the hook server stays awake for a `DONE` after its grant: the shim binds and
/// says so within microseconds, and a `DONE` that finds the server asleep costs the shim
/// the wake-up of an idle CPU (tens of microseconds on a virtual machine).
const DONE_SPIN: Duration = Duration::from_micros(100);

/// One datagram, never waiting, with its sender's pid and uid (`SCM_CREDENTIALS`): its
/// length, the pid and the uid; `None` when there is none (or no credentials came).
fn recv_with_creds(fd: RawFd, buf: &mut [u8]) -> Option<(usize, u32, u32)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = [0u64; 8]; // room for one `ucred` message, aligned
                                 // SAFETY: a zeroed msghdr is valid; its buffers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: recvmsg into the buffers `msg` names, all of their stated lengths; fds sent
    // along arrive close-on-exec (and are closed below).
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    let n = usize::try_from(n).ok()?;
    let mut from = (0, u32::MAX); // no credentials: read, and dropped
                                  // SAFETY: the control messages the kernel wrote into `control`, walked with the CMSG
                                  // helpers, which stay within `msg_controllen`; an fd passed is ours to close.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_CREDENTIALS) => {
                    let cred = std::ptr::read_unaligned(data.cast::<libc::ucred>());
                    from = (u32::try_from(cred.pid).unwrap_or(0), cred.uid);
                }
                (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                    let len = ((*c).cmsg_len as usize).saturating_sub(data.offset_from(c.cast::<u8>()) as usize);
                    for i in 0..len / std::mem::size_of::<libc::c_int>() {
                        libc::close(std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i)));
                    }
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    // a datagram or its control data cut short is not a note of ours
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        from = (0, u32::MAX);
    }
    Some((n, from.0, from.1))
}

/// One message, never waiting.
fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv into a buffer of its length, on a socket we own.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn send(fd: RawFd, msg: &[u8]) {
    // SAFETY: send of a buffer of its length; never waits, never raises SIGPIPE.
    unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
}

/// Counts an exchange between its grant and its end (logged, withdrawn, or given up).
struct Pending(Arc<Shared>);

impl Pending {
    fn new(sh: Arc<Shared>) -> Pending {
        sh.hook_pending.fetch_add(1, Ordering::AcqRel);
        Pending(sh)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.hook_pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Who asked for which port, known before the grant.
struct Asked {
    pid: u32,
    /// The process (its start time read with its name), when it still ran.
    owner: Option<Owner>,
    /// Who asks is read once its `DONE` came, or its exchange ended ([`owner_read`]).
    later: bool,
    /// The port asked for.
    port: u16,
    family: u8,
    service_type: String,
    session: Option<String>,
    comm: String,
    /// Fallback mode: the port the tool first wanted.
    origin: Option<u16>,
    /// Fallback mode: this port or `BUSY`.
    fallback: bool,
    /// The log variables the `KEEP` carried (fallback mode).
    vars: LogVars,
}

/// What a `KEEP`'s claim got.
enum Got {
    Grant(Grant),
    /// Fallback mode: not this port as it is (the tool moves on by itself).
    Busy,
    /// Not this process's to coordinate (`None`), or refused: the status and message the
    /// API would answer.
    Declined(Option<(u16, String)>),
}

/// What the daemon granted, for the event.
struct KeptBind {
    asked: Asked,
    /// The port granted: the one asked, or another (a remap).
    port: u16,
    /// Who holds the port asked for, when another was granted (the remap's reason).
    holder: String,
    existing: bool,
    /// The process had bound this port before (a dual-stack twin, a probe).
    again: bool,
    /// The grant's lock id (the allocation its owner is read into).
    lock: String,
}

/// Who asks `ask` (its tail after [`ASK_LEN`] bytes) from process `peer`, and the rest of
/// the tail: the peer; or, for a `KEEP`, `NOTE`, `CONFIRM` or `REFUSED` made for another process (`FOR_CHILD`:
/// the seccomp supervisor's, for the program it traces), that process when the peer may
/// name it (`server::may_name_below`; a process already gone, for a note that is only
/// logged). `None`: it may not, or the tail has no pid.
fn who_asks<'t>(peer: u32, ask: &Ask<'_>, tail: &'t [u8]) -> Option<(u32, &'t [u8])> {
    if !matches!(ask.kind, KEEP | NOTE | CONFIRM | REFUSED) {
        return Some((peer, tail));
    }
    match hookproto::asked_for(ask.flags, tail)? {
        (None, rest) => Some((peer, rest)),
        (Some(pid), rest) => {
            let session = std::str::from_utf8(ask.session).ok().filter(|s| !s.is_empty());
            // what a process did that only goes in the log (observe mode, a single-instance
            // EADDRINUSE, the kernel's choice at listen) is logged for it even once it has
            // exited (a server that gives up at once), when its ancestry cannot be read
            let only_logged =
                ask.kind == NOTE && matches!(ask.note, hookproto::NOTE_OBSERVED | hookproto::NOTE_SINGLE | hookproto::NOTE_KERNEL_CHOSE);
            let gone = || procinfo::parent(pid).is_none();
            (crate::server::may_name_below(Some(peer), pid, session) || only_logged && gone()).then_some((pid, rest))
        }
    }
}

/// The claim of `pid`'s `KEEP`, as the hooks' logic would make it for a coordinated port
/// (named as they would name it, and so is Styxy's mirror of it); `None` (declined) for
/// another port or a malformed session. Who asks is read while it waits for the answer
/// (neither read waits on the process; a short-lived one is gone soon after): its name
/// and start time in one read, and its directory.
fn claim(sh: &Shared, pid: u32, ask: &Ask<'_>, vars: &[u8]) -> Option<(Asked, Claim)> {
    sh.last_activity.store(now_ms(), Ordering::Relaxed);
    let session = std::str::from_utf8(ask.session).ok().filter(|s| !s.is_empty() && *s != "default");
    let taken = ask.flags & TAKEN != 0;
    let mode = match ask.flags {
        f if f & FALLBACK != 0 => Mode::Fallback,
        f if f & ON_CONFLICT_MODE != 0 => Mode::OnConflict,
        _ => Mode::Coordinate,
    };
    let origin = (ask.origin != 0 && mode == Mode::Fallback).then_some(ask.origin);
    if taken && ask.flags & MAY_MOVE == 0 && mode != Mode::Fallback {
        return None;
    }
    if session.is_some_and(|s| !valid_instance_id(s)) {
        return None;
    }
    let ty = {
        let (class, ty) = decided(sh, pid, ask);
        // a KEEP is the shim's ask-first bind of a stream socket (SHARES_PORT: one that may
        // share its port), or (TAKEN) its bind-first that met EADDRINUSE: granted only where
        // the one decision says so
        let mut facts = Facts { stream: true, shares_port: ask.flags & SHARES_PORT != 0, moved_from: origin };
        match (decide::plan(class, mode, &mut facts), taken) {
            (Plan::AskFirst { .. }, false) | (Plan::TryFirst { single: false, .. }, true) => ty,
            _ => None,
        }
    }?;
    // with no Styxy to show it to, who asks is read once the answer is sent (the shim
    // binds meanwhile): its name comes with the ask
    let later = !ask.comm.is_empty() && sh.upstream.get().is_none_or(|up| !up.usable());
    let (comm, owner) = match (!later).then(|| procinfo::comm_and_start(pid)).flatten() {
        Some((comm, start)) => (comm, Some(Owner { pid, start })),
        None if later => (String::from_utf8_lossy(ask.comm).into_owned(), None),
        None => ("?".to_string(), None),
    };
    let req = AllocateRequest {
        service_name: Some(service_name(&comm, ask.port)),
        instance_id: session.map(str::to_string),
        project_path: if later { None } else { procinfo::cwd(pid) },
        comm: Some(comm.clone()),
        bind: true,
        exclude: if taken { vec![ask.port] } else { vec![] },
        // a tool that moved on by itself: its session's connects to the first port follow
        requested_port: Some(origin.unwrap_or(ask.port)),
        ..AllocateRequest::for_port(&ty, ask.port)
    };
    let claim_owner = owner.clone().unwrap_or_else(|| Owner::pid(pid));
    let claim = Claim { exactly: ask.flags & MAY_MOVE == 0, owner_later: later, ..Claim::new(req, Some(claim_owner)) };
    let session = session.map(str::to_string);
    let (fallback, vars) = (mode == Mode::Fallback, log_vars(vars));
    Some((Asked { pid, owner, later, port: ask.port, family: ask.family, service_type: ty, session, comm, origin, fallback, vars }, claim))
}

/// What the policy says of `ask`'s port for process `pid`: its class and service type, with
/// the rules of the process's own environment when the ask says it has some (`OWN_RULES`).
fn decided(sh: &Shared, pid: u32, ask: &Ask<'_>) -> (Class, Option<String>) {
    let state = sh.state.lock();
    let own = (ask.flags & OWN_RULES != 0).then(|| state.policy_of(pid)).flatten();
    let decision = own.as_ref().unwrap_or(state.policy()).decide(ask.port);
    (Class::of(&decision), decision.service_type().map(str::to_string))
}

/// Who owns `bind`'s new grant, read now when its answer went first ([`Asked::later`]):
/// the shim no longer waits on us. `None` for a process gone (then no pid-only owner is
/// left in the allocation) or a grant whose owner was read before.
fn owner_read(sh: &Shared, bind: &KeptBind) -> Option<Owner> {
    (bind.asked.later && !bind.existing).then(|| sh.owner_read(bind.port, &bind.lock, bind.asked.pid)).flatten()
}

/// The grant `g` made for `asked`.
fn kept(sh: &Shared, asked: Asked, g: Grant) -> KeptBind {
    // the process had bound this grant before (a twin, a probe): one start
    let again = g.existing && asked.session.as_deref().is_some_and(|s| sh.state.lock().owned_by(g.port, s, asked.pid));
    KeptBind {
        port: g.port,
        holder: g.holder.as_ref().map(styxy_preload_common::api::Holder::describe).unwrap_or_default(),
        existing: g.existing,
        again,
        asked,
        lock: g.lock_id,
    }
}

/// The event the process would have logged (a blocking thread's work: the client names
/// the file).
fn log_event(g: &KeptBind, vars: LogVars, started: Instant) {
    let (asked, port) = (&g.asked, g.port);
    let (action, reason) = match () {
        _ if g.again => (Action::Observed, Some(eventlog::bound_again(port))),
        _ if port != asked.port => (Action::Remapped, Some(eventlog::taken(asked.port, &g.holder))),
        _ => (Action::Kept, asked.origin.filter(|from| *from != port).map(|from| eventlog::moved_by_itself(&asked.comm, from))),
    };
    let ev = bind_event(asked, port, action, reason, started.elapsed().as_micros() as u64);
    let _ = log_named(vars, asked.pid).append(&ev);
}

/// The event log the variables a message carried name, else the one of `pid`'s own
/// environment ([`log_of`]).
fn log_named(vars: LogVars, pid: u32) -> Log {
    match vars {
        Some(vars) => Log::of(&|k| vars.iter().find(|(key, _)| *key == k).map(|(_, v)| v.clone())),
        None => log_of(pid),
    }
}

/// The bind of the port granted to `asked` failed with `errno`: the session serves it
/// already, someone uncoordinated took it, or the kernel refuses the address itself.
fn log_failed(g: &KeptBind, errno: i32, vars: LogVars, started: Instant) {
    let (action, port, why) = match errno {
        libc::EADDRINUSE if g.existing => (Action::Error, g.port, Reason::session_port_in_use(g.port)),
        libc::EADDRINUSE => (Action::Error, g.asked.port, Reason::GrantedPortTaken { port: g.port, errno }),
        _ => (Action::Passthrough, g.asked.port, Reason::KernelRefuses(errno)),
    };
    let ev = bind_event(&g.asked, port, action, Some(why.to_string()), started.elapsed().as_micros() as u64);
    let _ = log_named(vars, g.asked.pid).append(&ev);
}

/// The event of what process `pid` did alone, as its `NOTE` says (at `ts`, ms since the
/// epoch); `None` for a note this daemon does not know.
fn note_event(sh: &Shared, pid: u32, ask: &Ask<'_>, ts: u64) -> Option<Event> {
    use hookproto::{NOTE_AGAIN, NOTE_KERNEL_CHOSE, NOTE_NO_COORDINATOR, NOTE_OBSERVED, NOTE_SINGLE, NOTE_STUCK, NOTE_UNANSWERED};
    // a bind's type; a listen's port is the kernel's choice, of no type; a bind to the
    // session's own port, the type of the port it asked for
    let service_type = match ask.note {
        NOTE_KERNEL_CHOSE => None,
        NOTE_STUCK | NOTE_AGAIN => decided(sh, pid, &Ask { port: ask.origin, ..*ask }).1,
        _ => decided(sh, pid, ask).1,
    };
    let (call, requested, action, why) = match ask.note {
        NOTE_OBSERVED => ("bind", ask.port, Action::Observed, Some(Reason::ObserveMode)),
        NOTE_SINGLE => ("bind", ask.port, Action::Passthrough, Some(Reason::SingleInstance(service_type.clone().unwrap_or_default()))),
        NOTE_KERNEL_CHOSE => ("listen", 0, Action::Observed, Some(Reason::KernelChose)),
        NOTE_UNANSWERED => ("bind", ask.port, Action::Passthrough, Some(Reason::Unasked(AskError::Timeout))),
        NOTE_NO_COORDINATOR => ("bind", ask.port, Action::Passthrough, Some(Reason::Unasked(AskError::NoCoordinator))),
        // spooled: the daemon stopped between the port map's look and the note
        NOTE_AGAIN => ("bind", ask.origin, Action::Observed, Some(Reason::BoundAgain(ask.port))),
        NOTE_STUCK if ask.port != ask.origin => {
            ("bind", ask.origin, Action::Remapped, Some(Reason::Taken { port: ask.origin, holder: String::new() }))
        }
        NOTE_STUCK => ("bind", ask.origin, Action::Kept, None),
        _ => return None,
    };
    let comm = match std::str::from_utf8(ask.comm) {
        Ok(c) if !c.is_empty() => c.to_string(),
        _ => procinfo::comm_and_start(pid).map(|(comm, _)| comm).unwrap_or_else(|| "?".into()),
    };
    Some(Event {
        ts,
        session: std::str::from_utf8(ask.session).ok().filter(|s| !s.is_empty()).map(styxy_preload_common::session::sanitize),
        pid,
        comm,
        call: call.into(),
        requested_port: requested,
        port: ask.port,
        family: if ask.family == 6 { "ipv6" } else { "ipv4" }.into(),
        service_type,
        action,
        reason: why.map(|why| why.to_string()),
        latency_us: 0,
        backend: matches!(ask.note, NOTE_UNANSWERED | NOTE_NO_COORDINATOR).then(|| "unix".into()),
        retries: 0,
    })
}

/// Logs what the shims spooled while this daemon could not be asked (`hookproto::SPOOL`
/// in `dir`): each record's event in the log its variables name, then the spool is gone.
/// Taken aside first, so that a record a shim appends meanwhile waits for the next drain;
/// what a drain cut short left aside is logged first.
pub fn drain_spool(sh: &Shared, dir: &Path) {
    let (spool, taken) = (dir.join(hookproto::SPOOL), dir.join(format!("{}.draining", hookproto::SPOOL)));
    if taken.exists() {
        log_spool(sh, &taken);
    }
    if std::fs::rename(&spool, &taken).is_ok() {
        log_spool(sh, &taken);
    }
}

/// Logs the spool at `path`, then removes it: only a regular file of ours alone, of one
/// link, read up to twice the shims' limit (a torn or garbled record ends it).
fn log_spool(sh: &Shared, path: &Path) {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut data = Vec::new();
    let read = styxy_preload_common::paths::open_regular(std::fs::OpenOptions::new().read(true), path).and_then(|f| {
        let meta = f.metadata()?;
        styxy_preload_common::paths::owned_by_us(&meta, path)?;
        if meta.nlink() != 1 {
            return Err(io::Error::other("linked elsewhere"));
        }
        f.take(2 * hookproto::SPOOL_MAX).read_to_end(&mut data)
    });
    if read.is_ok() {
        for (pid, ts, msg) in hookproto::spooled(&data) {
            let Some(ask) = msg.get(..ASK_LEN).and_then(Ask::decode).filter(|a| a.kind == NOTE) else { continue };
            if let Some(ev) = note_event(sh, pid, &ask, ts) {
                let _ = log_named(log_vars(&msg[ASK_LEN..]), pid).append(&ev);
            }
        }
    }
    let _ = std::fs::remove_file(path);
}

/// Fallback mode: the port `asked` was not its to have, and the tool moves on by itself.
fn log_busy(asked: &Asked) {
    let why = eventlog::left_to_own_fallback(asked.port, &asked.comm);
    let _ = log_named(asked.vars.clone(), asked.pid).append(&bind_event(asked, asked.port, Action::Observed, Some(why), 0));
}

/// The event of the bind `asked` made (of `port`, the one asked or another).
fn bind_event(asked: &Asked, port: u16, action: Action, reason: Option<String>, latency_us: u64) -> Event {
    Event {
        ts: eventlog::now_ms(),
        session: asked.session.clone(),
        pid: asked.pid,
        comm: asked.comm.clone(),
        call: "bind".into(),
        requested_port: asked.port,
        port,
        family: if asked.family == 6 { "ipv6" } else { "ipv4" }.into(),
        service_type: Some(asked.service_type.clone()),
        action,
        reason,
        latency_us,
        backend: Some("unix".into()),
        retries: 0,
    }
}

/// The log variables a message carried (`hookproto::LOG_VARS`).
type LogVars = Option<Vec<(&'static str, std::ffi::OsString)>>;

/// The log variables a `DONE` carried; `None` when it carried none (a shim that does not
/// send them: its environment is read from `/proc` instead).
fn log_vars(tail: &[u8]) -> LogVars {
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

    /// A scratch directory, a daemon's state with its journal there, a process whose
    /// environment puts its event log there too, and a runtime for what the hook server
    /// hands off (the events' blocking threads).
    struct Fixture {
        dir: PathBuf,
        sh: Arc<Shared>,
        binder: Child,
        rt: tokio::runtime::Runtime,
    }

    impl Fixture {
        fn new(name: &str) -> Fixture {
            Fixture::with_journal(name, |dir| dir.join("daemon-journal.jsonl"))
        }

        fn with_journal(name: &str, journal: fn(&Path) -> PathBuf) -> Fixture {
            let dir = std::env::temp_dir().join(format!("styxy-hook-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let os = Os { in_use: |_| false, styxy_sees: |_| false, sockets: |_, _| Some(vec![]) };
            let sh = Shared::for_tests(os, journal(&dir));
            let binder = Command::new("sleep").arg("30").env_clear().env("STYXY_PRELOAD_LOG", dir.join("events.jsonl")).spawn().unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            Fixture { dir, sh, binder, rt }
        }

        fn events(&self) -> String {
            std::fs::read_to_string(self.dir.join("events.jsonl")).unwrap_or_default()
        }

        fn journal(&self) -> String {
            std::fs::read_to_string(self.dir.join("daemon-journal.jsonl")).unwrap_or_default()
        }

        /// A hook server with no listener: the test hands it its connections.
        fn server(&self) -> Loop {
            Loop::new(self.sh.clone(), self.rt.handle().clone()).unwrap()
        }

        /// A connection from process `peer`, adopted by `lp`; the shim's end comes back.
        fn connect(&self, lp: &mut Loop, peer: u32) -> Socket {
            let (daemon_end, shim_end) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
            daemon_end.set_nonblocking(true).unwrap();
            shim_end.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            lp.adopt(daemon_end.into(), peer);
            shim_end
        }

        /// One exchange: the daemon's side runs here, the shim's (`shim`, given its end
        /// of the connection) on a thread; what the shim saw comes back once the
        /// exchange and its event are done (`/flush`'s wait).
        fn exchange<T: Send + 'static>(&self, shim: impl FnOnce(Socket) -> T + Send + 'static) -> T {
            self.exchange_as(self.binder.id(), shim)
        }

        /// [`Fixture::exchange`] from process `peer` (the binder's parent, this test, is
        /// a seccomp supervisor asking for it).
        fn exchange_as<T: Send + 'static>(&self, peer: u32, shim: impl FnOnce(Socket) -> T + Send + 'static) -> T {
            let mut lp = self.server();
            let shim_end = self.connect(&mut lp, peer);
            let peer = std::thread::spawn(move || shim(shim_end));
            let until = Instant::now() + Duration::from_secs(5);
            while !lp.conns.is_empty() && Instant::now() < until {
                lp.turn();
            }
            assert!(lp.conns.is_empty(), "the exchange ends");
            while self.sh.hook_pending.load(Ordering::Acquire) > 0 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
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
        Ask { kind, port, family: 4, errno, flags: 0, origin: 0, session, note: 0, comm: b"" }.encode().unwrap()
    }

    fn send(s: &Socket, msg: &[u8]) {
        assert_eq!(s.send(msg).unwrap(), msg.len());
    }

    /// The daemon's answer; `None` when it closed the connection unanswered.
    fn answer(s: &Socket) -> Option<Answer> {
        answer_and_line(s).map(|(a, _)| a)
    }

    /// The daemon's answer and the line after it (a `DECLINED` that says why).
    fn answer_and_line(s: &Socket) -> Option<(Answer, String)> {
        let mut buf = [std::mem::MaybeUninit::new(0u8); hookproto::TOLD_MAX];
        let n = s.recv(&mut buf).expect("an answer or the end, within the read timeout");
        // SAFETY: recv initialised the first n bytes (all of them were initialised anyway).
        let bytes: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
        let head = bytes.get(..ANSWER_LEN.min(n)).unwrap_or_default();
        (n > 0)
            .then(|| (Answer::decode(head).expect("an answer in the layout"), String::from_utf8_lossy(&bytes[head.len()..]).into_owned()))
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

    /// A stop hears each `DONE` already sent, and writes every event handed over before
    /// the daemon goes on to exit: none of a bind made before it is lost.
    #[test]
    fn a_stop_hears_each_done_already_sent_and_writes_every_event_first() {
        let f = Fixture::new("stop");
        let mut lp = f.server();
        // the events' thread is held up for a while: what it is handed waits behind
        let (_hold, held) = std::sync::mpsc::channel::<()>();
        lp.events.write(Pending::new(f.sh.clone()), move || {
            let _ = held.recv_timeout(Duration::from_millis(300));
        });
        let s = f.connect(&mut lp, f.binder.id());
        send(&s, &ask(KEEP, 3000, 0, b"s1"));
        let until = Instant::now() + Duration::from_secs(5);
        while !lp.conns.values().any(|c| matches!(c.stage, Stage::Done(..))) && Instant::now() < until {
            lp.turn();
        }
        assert_eq!(answer(&s).map(|a| a.status), Some(GRANTED));
        send(&s, &ask(DONE, 3000, 0, b"s1")); // sent, not heard yet: the stop comes first
        lp.wake.stop.store(true, Ordering::Release);
        lp.run();
        let events = f.events();
        assert!(events.contains("\"action\":\"kept\"") && events.contains("\"port\":3000"), "{events:?}");
        assert!(f.sh.state.lock().allocation(3000).is_some_and(|a| a.confirmed), "the DONE was heard");
    }

    #[test]
    fn a_kept_bind_is_journaled_before_its_answer_then_confirmed_and_logged() {
        let f = Fixture::new("kept");
        let journal = f.dir.join("daemon-journal.jsonl");
        let (got, journaled) = f.exchange(move |s| {
            send(&s, &ask(KEEP, 3000, 0, b"s1"));
            let a = answer(&s);
            // the answer is out: its grant must be on disk already
            let journaled = std::fs::read_to_string(&journal).unwrap_or_default();
            send(&s, &ask(DONE, 3000, 0, b"s1"));
            (a, journaled)
        });
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

    #[test]
    fn a_supervisor_asks_for_a_descendant_of_its_own_and_no_other_process() {
        let f = Fixture::new("for-child");
        let (child, me) = (f.binder.id(), std::process::id());
        let for_pid = |pid: u32, port: u16| {
            let plain = ask(KEEP, port, 0, b"s1");
            let keep = Ask { flags: MAY_MOVE | hookproto::FOR_CHILD, comm: b"binder", ..Ask::decode(&plain).unwrap() };
            [&keep.encode().unwrap()[..], &pid.to_le_bytes()].concat()
        };
        let (got, done_vars) = (for_pid(child, 3000), f.dir.join("sup-events.jsonl"));
        let got = f.exchange_as(me, move |s| {
            send(&s, &got);
            let a = answer(&s);
            let done = [&ask(DONE, 3000, 0, b"s1")[..], format!("STYXY_PRELOAD_LOG={}\0", done_vars.display()).as_bytes()].concat();
            send(&s, &done);
            a
        });
        assert_eq!(got.map(|a| a.status), Some(GRANTED));
        let owners = f.sh.state.lock().allocation(3000).map(|a| a.owners.iter().map(|o| o.pid).collect::<Vec<_>>());
        assert_eq!(owners, Some(vec![child]), "the child's grant, not the asker's");
        let events = std::fs::read_to_string(f.dir.join("sup-events.jsonl")).unwrap_or_default();
        assert!(events.contains(&format!("\"pid\":{child}")) && events.contains("\"action\":\"kept\""), "{events}");
        // a process that is neither its descendant nor of the session (an orphan, whose
        // parent is gone): declined, nothing granted
        let out = Command::new("sh").args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"]).output().unwrap();
        let orphan: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let stranger = for_pid(orphan, 3001);
        let refused = f.exchange_as(me, move |s| {
            send(&s, &stranger);
            answer(&s)
        });
        assert_eq!(refused.map(|a| a.status), Some(DECLINED));
        // SAFETY: kill(2) of the orphan this test started.
        unsafe { libc::kill(orphan as i32, libc::SIGKILL) };
        assert!(f.sh.state.lock().allocation(3001).is_none());
        // what a child that has exited did, only logged: logged with its pid; a bind it
        // would own by now (NOTE_STUCK): not taken
        let mut gone = Command::new("true").spawn().unwrap();
        let gone_pid = gone.id();
        gone.wait().unwrap();
        let note = |kind_note: u8, port: u16| {
            let plain = ask(NOTE, port, 0, b"s1");
            let n = Ask { flags: hookproto::FOR_CHILD, note: kind_note, origin: port, comm: b"true", ..Ask::decode(&plain).unwrap() };
            let vars = format!("STYXY_PRELOAD_LOG={}\0", f.dir.join("gone.jsonl").display());
            [&n.encode().unwrap()[..], &gone_pid.to_le_bytes(), vars.as_bytes()].concat()
        };
        for msg in [note(hookproto::NOTE_SINGLE, 11434), note(hookproto::NOTE_STUCK, 3005)] {
            f.exchange_as(me, move |s| send(&s, &msg));
        }
        let logged = std::fs::read_to_string(f.dir.join("gone.jsonl")).unwrap_or_default();
        assert_eq!(logged.lines().count(), 1, "{logged}");
        assert!(logged.contains(&format!("\"pid\":{gone_pid}")) && logged.contains("single-instance"), "{logged}");
        assert!(f.sh.state.lock().allocation(3005).is_none());
        // a FOR_CHILD ask too short for its pid: declined
        let short =
            [&Ask { flags: hookproto::FOR_CHILD, ..Ask::decode(&ask(KEEP, 3002, 0, b"s1")).unwrap() }.encode().unwrap()[..], &[1, 2]]
                .concat();
        let got = f.exchange_as(me, move |s| {
            send(&s, &short);
            answer(&s)
        });
        assert_eq!(got.map(|a| a.status), Some(DECLINED));
    }

    #[test]
    fn who_asks_is_read_once_answered_when_the_ask_names_it() {
        let f = Fixture::new("named");
        let got = f.exchange(|s| {
            let named =
                Ask { kind: KEEP, port: 3000, family: 4, errno: 0, flags: 0, origin: 0, session: b"s1", note: 0, comm: b"named-by-shim" };
            send(&s, &named.encode().unwrap());
            let a = answer(&s);
            send(&s, &ask(DONE, 3000, 0, b"s1"));
            a
        });
        assert_eq!(got.map(|a| a.status), Some(GRANTED));
        let st = f.sh.state.lock();
        let a = st.allocation(3000).expect("granted");
        // the name the ask carried, and the start time and directory read after the answer
        assert_eq!((a.comm.as_deref(), a.service_name.starts_with("named-by-shim")), (Some("named-by-shim"), true), "{a:?}");
        let start = procinfo::start_time(f.binder.id()).expect("the binder runs");
        assert_eq!(a.owners, [Owner { pid: f.binder.id(), start }]);
        assert_eq!(a.project_path, procinfo::cwd(f.binder.id()));
        assert!(a.project_path.is_some());
    }

    #[test]
    fn a_grant_whose_asker_is_gone_by_its_done_keeps_no_owner_known_by_pid_only() {
        let mut f = Fixture::new("gone");
        let pid = f.binder.id();
        let got = f.exchange(move |s| {
            let named = Ask { kind: KEEP, port: 3000, family: 4, errno: 0, flags: 0, origin: 0, session: b"s1", note: 0, comm: b"sleep" };
            send(&s, &named.encode().unwrap());
            let a = answer(&s);
            // SAFETY: the fixture's own child, killed and reaped: its pid no longer runs
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
                libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
            }
            send(&s, &ask(DONE, 3000, 0, b"s1"));
            a
        });
        // reaped here: the fixture's end kills a child of its own, not whoever has the pid now
        f.binder = Command::new("true").spawn().unwrap();
        assert_eq!(got.map(|a| a.status), Some(GRANTED));
        let st = f.sh.state.lock();
        let a = st.allocation(3000).expect("the grant stands while a socket of the user's holds the port");
        // a pid-only owner would pass for whoever reuses the pid
        assert!(a.owners.is_empty(), "{a:?}");
    }

    #[test]
    fn a_failed_bind_withdraws_its_grant_and_says_why() {
        let f = Fixture::new("withdrawn");
        let got = f.exchange(keep_then_done(3000, b"s1", EADDRINUSE));
        assert_eq!(got.map(|a| a.status), Some(GRANTED));
        assert!(f.sh.state.lock().is_empty(), "withdrawn");
        let ev = eventlog::parse_lines(f.events().as_bytes());
        let why = ev.iter().map(|e| (e.action, e.port, e.reason.as_deref())).collect::<Vec<_>>();
        assert_eq!(why, [(Action::Error, 3000, Some("bind to granted port 3000 failed: Address already in use (os error 98)"))]);
        assert_eq!(f.sh.hook_pending.load(Ordering::Acquire), 0);
    }

    #[test]
    fn another_sessions_port_and_an_uncoordinated_one_are_declined_changing_nothing() {
        let f = Fixture::new("declined");
        assert_eq!(f.exchange(keep_then_done(3000, b"a", 0)).map(|a| a.status), Some(GRANTED));
        let declined = Some(Answer { status: DECLINED, port: 0, existing: false });
        assert_eq!(f.exchange(keep_then_done(3000, b"b", 0)), declined, "a's port: b's would be a remap");
        assert_eq!(f.exchange(keep_then_done(22, b"b", 0)), declined, "not a coordinated port");
        let st = f.sh.state.lock();
        assert_eq!(st.len(), 1);
        assert_eq!(st.allocation(3000).and_then(|a| a.session.as_deref()), Some("a"));
        drop(st);
        assert_eq!(f.journal().lines().count(), 1, "one grant, one line");
    }

    #[test]
    fn a_shim_that_may_move_gets_another_port_and_the_remap_is_logged() {
        let f = Fixture::new("moved");
        assert_eq!(f.exchange(keep_then_done(3000, b"a", 0)).map(|a| a.status), Some(GRANTED));
        let may_move = |session: &'static [u8], errno: i32| {
            move |s: Socket| {
                let ask_move = Ask { kind: KEEP, port: 3000, family: 4, errno: 0, flags: MAY_MOVE, origin: 0, session, note: 0, comm: b"" };
                send(&s, &ask_move.encode().unwrap());
                let a = answer(&s);
                if let Some(a) = a {
                    send(&s, &ask(DONE, a.port, errno, session));
                }
                a
            }
        };
        let got = f.exchange(may_move(b"b", 0)).expect("an answer");
        assert_eq!((got.status, got.existing), (MOVED, false));
        assert_ne!(got.port, 3000);
        let b = f.sh.state.lock().allocation(got.port).map(|a| (a.session.clone(), a.requested_port, a.confirmed));
        assert_eq!(b, Some((Some("b".to_string()), Some(3000), true)));
        let events = f.events();
        let remap = events.lines().find(|l| l.contains("\"action\":\"remapped\"")).unwrap_or_else(|| panic!("{events}"));
        assert!(remap.contains("\"requested_port\":3000") && remap.contains("port 3000 is taken by sleep"), "{remap}");
        // withdrawn when the bind of the other port fails
        let got = f.exchange(may_move(b"c", EADDRINUSE)).expect("an answer");
        assert_eq!(got.status, MOVED);
        assert!(f.sh.state.lock().allocation(got.port).is_none(), "withdrawn");
    }

    #[test]
    fn a_bind_to_the_sessions_own_port_told_in_the_mailbox_makes_an_owner_and_is_logged() {
        let f = Fixture::new("stuck");
        let mut lp = f.server();
        let path = f.dir.join(hookproto::MAILBOX);
        // SAFETY: getuid cannot fail.
        lp.mailbox = Some((mailbox(&path).unwrap(), unsafe { libc::getuid() }));
        assert_eq!(f.exchange(keep_then_done(3000, b"a", 0)).map(|a| a.status), Some(GRANTED));
        let moved = Ask { kind: KEEP, port: 3000, family: 4, errno: 0, flags: MAY_MOVE, origin: 0, session: b"b", note: 0, comm: b"" };
        let got = f.exchange(move |s| {
            send(&s, &moved.encode().unwrap());
            let a = answer(&s).expect("an answer");
            send(&s, &ask(DONE, a.port, 0, b"b"));
            a
        });
        assert_eq!(got.status, MOVED);
        // this process, told by its credentials, bound the session's port for 3000 alone
        let log = format!("STYXY_PRELOAD_LOG={}\0", f.dir.join("events.jsonl").display());
        let note = |port: u16, session: &'static [u8]| {
            let stuck =
                Ask { kind: NOTE, note: hookproto::NOTE_STUCK, port, origin: 3000, flags: MAY_MOVE, session, comm: b"again", ..moved };
            let out = std::os::unix::net::UnixDatagram::unbound().unwrap();
            out.send_to(&[&stuck.encode().unwrap()[..], log.as_bytes()].concat(), &path).unwrap();
        };
        let served = |lp: &mut Loop| {
            lp.turn(); // the mailbox is read at least every beat
            let until = Instant::now() + Duration::from_secs(5);
            while f.sh.hook_pending.load(Ordering::Acquire) > 0 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let me = std::process::id();
        note(got.port, b"b");
        served(&mut lp);
        let owners =
            |port| f.sh.state.lock().allocation(port).map(|a| (a.session.clone(), a.owners.iter().map(|o| o.pid).collect::<Vec<_>>()));
        assert!(owners(got.port).is_some_and(|(s, pids)| s.as_deref() == Some("b") && pids.contains(&me)), "{:?}", owners(got.port));
        let events = f.events();
        let line = events.lines().find(|l| l.contains("\"comm\":\"again\"")).unwrap_or_else(|| panic!("{events}"));
        assert!(line.contains("\"action\":\"remapped\"") && line.contains("port 3000 is taken by sleep"), "{line}");
        // freed meanwhile (a sweep between two processes): made again, and journaled
        f.sh.withdraw(got.port);
        note(got.port, b"b");
        served(&mut lp);
        assert!(owners(got.port).is_some_and(|(s, _)| s.as_deref() == Some("b")), "made again");
        assert_eq!(f.journal().lines().filter(|l| l.contains(&format!("\"port\":{}", got.port))).count(), 2, "{}", f.journal());
        // another session's port is not taken over by a note
        note(3000, b"b");
        served(&mut lp);
        assert_eq!(owners(3000).map(|(s, _)| s), Some(Some("a".to_string())));
        assert_eq!(f.sh.metrics.hook_notes[1].load(Ordering::Relaxed), 3);
        // an fd sent along is closed, never kept
        let marked = f.dir.join("passed-fd");
        let kept = || {
            let links = std::fs::read_dir("/proc/self/fd").unwrap().filter_map(|e| std::fs::read_link(e.ok()?.path()).ok());
            links.filter(|l| *l == marked).count()
        };
        let out = std::os::unix::net::UnixDatagram::unbound().unwrap();
        out.connect(&path).unwrap();
        let passed = std::fs::File::create(&marked).unwrap();
        let mut control = [0u64; 4];
        let mut iov = libc::iovec { iov_base: b"x".as_ptr() as *mut libc::c_void, iov_len: 1 };
        // SAFETY: a msghdr over `iov` and `control`, one SCM_RIGHTS message of one fd,
        // built with the CMSG helpers within `control`.
        let sent = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), passed.as_raw_fd());
            libc::sendmsg(out.as_raw_fd(), &msg, 0)
        };
        assert_eq!(sent, 1);
        drop((out, passed));
        served(&mut lp);
        assert_eq!(kept(), 0, "the fd passed along was closed");
    }

    #[test]
    fn a_spooled_bind_to_the_sessions_own_port_is_logged_as_the_note_says() {
        let f = Fixture::new("stuck-spool");
        let base = Ask { kind: NOTE, port: 0, family: 4, errno: 0, flags: MAY_MOVE, origin: 3000, session: b"s", note: 0, comm: b"srv" };
        let logged = |port: u16, note: u8| {
            let e = note_event(&f.sh, 1, &Ask { port, note, ..base }, 5).expect("an event");
            (e.action, e.requested_port, e.port, e.reason, e.service_type)
        };
        let dev = Some("dev".to_string());
        assert_eq!(logged(3007, hookproto::NOTE_STUCK), (Action::Remapped, 3000, 3007, Some("port 3000 is taken".into()), dev.clone()));
        assert_eq!(logged(3000, hookproto::NOTE_STUCK), (Action::Kept, 3000, 3000, None, dev.clone()));
        assert_eq!(logged(3007, hookproto::NOTE_AGAIN), (Action::Observed, 3000, 3007, Some(eventlog::bound_again(3007)), dev));
    }

    #[test]
    fn a_port_found_taken_moves_only_where_the_decision_binds_first() {
        let f = Fixture::new("taken");
        let taken = |port: u16, flags: u8| {
            move |s: Socket| {
                send(
                    &s,
                    &Ask { kind: KEEP, port, family: 4, errno: 0, flags, origin: 0, session: b"t", note: 0, comm: b"" }.encode().unwrap(),
                );
                let a = answer(&s);
                if let Some(a) = a.filter(|a| a.status != DECLINED) {
                    send(&s, &ask(DONE, a.port, 0, b"t"));
                }
                a
            }
        };
        // 12001 is outside every range (on-conflict): another port of its fallback type
        let got = f.exchange(taken(12001, MAY_MOVE | TAKEN)).expect("an answer");
        assert_eq!(got.status, MOVED);
        assert_ne!(got.port, 12001);
        let a = f.sh.state.lock().allocation(got.port).map(|a| (a.session.clone(), a.requested_port));
        assert_eq!(a, Some((Some("t".to_string()), Some(12001))));
        let declined = Some(Answer { status: DECLINED, port: 0, existing: false });
        assert_eq!(f.exchange(taken(12002, TAKEN)), declined, "taken without may-move: nothing to grant");
        assert_eq!(f.exchange(taken(3000, MAY_MOVE | TAKEN)), declined, "a coordinated port is asked about first");
        assert_eq!(f.exchange(taken(11430, MAY_MOVE | TAKEN)), declined, "a single-instance type is never moved");
        assert_eq!(f.exchange(taken(12003, MAY_MOVE)), declined, "an on-conflict port is bound first");
        let shared = f.exchange(taken(12004, MAY_MOVE | SHARES_PORT)).map(|a| (a.status, a.port));
        assert_eq!(shared, Some((GRANTED, 12004)), "… unless it may be shared: then asked first");
        assert_eq!(f.sh.state.lock().len(), 2);
    }

    #[test]
    fn a_refusal_is_told_and_logged_only_for_another_sessions_port() {
        let f = Fixture::new("refused");
        assert_eq!(f.exchange(keep_then_done(3000, b"a", 0)).map(|a| a.status), Some(GRANTED));
        let refuse = |port: u16, session: &'static [u8]| {
            move |s: Socket| {
                send(&s, &ask(REFUSED, port, 0, session));
                let mut buf = [std::mem::MaybeUninit::new(0u8); hookproto::TOLD_MAX];
                let n = s.recv(&mut buf).expect("an answer or the end");
                // SAFETY: recv initialised the first n bytes (all were initialised anyway).
                let bytes: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
                Answer::told_line(&bytes).map(|l| String::from_utf8_lossy(l).into_owned())
            }
        };
        // the session id as the hooks' logic names it
        let line = f.exchange(refuse(3000, b"my session")).expect("told");
        assert!(line.starts_with("connect to port 3000 refused: it is session a's server (sleep, pid "), "{line}");
        assert!(line.contains("session my_session has no server on 3000"), "{line}");
        assert_eq!(f.exchange(refuse(3000, b"a")), None, "the session's own server: nothing to tell");
        assert_eq!(f.exchange(refuse(3999, b"b")), None, "nobody holds it: nothing to tell");
        let events = f.events();
        let isolated: Vec<&str> = events.lines().filter(|l| l.contains("\"action\":\"isolated\"")).collect();
        assert_eq!(isolated.len(), 1, "{events}");
        assert!(isolated[0].contains("\"session\":\"my_session\"") && isolated[0].contains("\"call\":\"connect\""), "{events}");
    }

    #[test]
    fn a_binder_gone_before_done_is_logged_where_its_done_says() {
        let mut f = Fixture::new("gone");
        let elsewhere = f.dir.join("elsewhere.jsonl");
        let log_var = format!("STYXY_PRELOAD_LOG={}\0", elsewhere.display());
        // the binder's name is read while it waits for the answer; it exits right after
        let pid = f.binder.id();
        let _ = f.binder.kill();
        let got = f.exchange(move |s| {
            send(&s, &ask(KEEP, 3000, 0, b"s1"));
            let a = answer(&s);
            let _ = std::process::Command::new("true").status(); // time for the exit to land
            let mut done = ask(DONE, 3000, 0, b"s1").to_vec();
            done.extend_from_slice(log_var.as_bytes());
            done.extend_from_slice(b"PATH=/bin\0");
            send(&s, &done);
            a
        });
        assert_eq!(got.map(|a| a.status), Some(GRANTED));
        let _ = f.binder.wait();
        assert!(!std::path::Path::new(&format!("/proc/{pid}/environ")).exists() || procinfo::environ(pid).is_empty());
        let events = std::fs::read_to_string(&elsewhere).unwrap_or_default();
        assert!(events.contains("\"action\":\"kept\"") && events.contains("\"comm\":\"sleep\""), "{events:?}");
        assert_eq!(f.events(), "", "not where /proc would have said");
    }

    #[test]
    fn garbage_or_an_early_close_ends_the_exchange() {
        let f = Fixture::new("garbage");
        let mut bad = ask(KEEP, 3000, 0, b"s1");
        bad[0] ^= 1; // another layout
        let got = f.exchange(move |s| {
            send(&s, &bad);
            answer(&s)
        });
        assert_eq!(got, None, "closed unanswered");
        assert!(f.sh.state.lock().is_empty());
        // granted, then the shim is gone before DONE (it gave up): the grant is withdrawn,
        // and nothing is logged
        let got = f.exchange(|s| {
            send(&s, &ask(KEEP, 3000, 0, b"s1"));
            answer(&s)
        });
        assert_eq!(got.map(|a| a.status), Some(GRANTED));
        assert!(f.sh.state.lock().allocation(3000).is_none(), "withdrawn");
        // a DONE for another port is no DONE: withdrawn too
        let got = f.exchange(|s| {
            send(&s, &ask(KEEP, 3001, 0, b"s2"));
            let a = answer(&s);
            send(&s, &ask(DONE, 4000, 0, b"s2"));
            a
        });
        assert_eq!(got.map(|a| a.status), Some(GRANTED));
        assert!(f.sh.state.lock().is_empty());
        assert_eq!(f.events(), "");
        assert_eq!(f.sh.hook_pending.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_silent_client_holds_up_no_other_and_is_closed_at_its_deadline() {
        let f = Fixture::new("silent");
        let mut lp = f.server();
        let silent = f.connect(&mut lp, f.binder.id());
        let talking = f.connect(&mut lp, f.binder.id());
        let peer = std::thread::spawn(move || keep_then_done(3000, b"s1", 0)(talking));
        let until = Instant::now() + Duration::from_secs(5);
        while lp.conns.len() > 1 && Instant::now() < until {
            lp.turn();
        }
        assert_eq!(peer.join().unwrap().map(|a| a.status), Some(GRANTED), "served while the other is silent");
        assert!(f.sh.state.lock().allocation(3000).is_some_and(|a| a.confirmed));
        assert_eq!(lp.conns.len(), 1, "the silent one still waits for its KEEP");
        while !lp.conns.is_empty() && Instant::now() < until {
            lp.turn();
        }
        assert_eq!(answer(&silent), None, "closed unanswered at its deadline");
    }

    #[test]
    fn the_server_answers_its_own_users_processes_and_stops() {
        let f = Fixture::new("server");
        let path = f.dir.join("hook.sock");
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        let server = {
            let _rt = f.rt.enter();
            Server::start(f.sh.clone(), listen(&path).unwrap(), None, uid).unwrap()
        };
        let s = Socket::new(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.connect(&socket2::SockAddr::unix(&path).unwrap()).unwrap();
        // the peer is this process, as the kernel says: its grant, then its failed bind
        send(&s, &ask(KEEP, 3000, 0, b"s1"));
        assert_eq!(answer(&s), Some(Answer { status: GRANTED, port: 3000, existing: false }));
        let owners = f.sh.state.lock().allocation(3000).map(|a| a.owners.iter().map(|o| o.pid).collect::<Vec<_>>());
        assert_eq!(owners, Some(vec![std::process::id()]));
        send(&s, &ask(DONE, 3000, EADDRINUSE, b"s1"));
        assert_eq!(answer(&s), None, "closed once the grant is withdrawn");
        assert!(f.sh.state.lock().is_empty());
        server.stop();
    }

    #[test]
    fn a_spool_of_ours_is_logged_once_and_a_linked_one_never() {
        let f = Fixture::new("spool");
        let record = |port: u16| {
            let ask = Ask {
                kind: NOTE,
                port,
                family: 4,
                errno: 0,
                flags: 0,
                origin: 0,
                session: b"s1",
                note: hookproto::NOTE_NO_COORDINATOR,
                comm: b"vite",
            };
            let vars = format!("STYXY_PRELOAD_LOG={}\0", f.dir.join("events.jsonl").display());
            let mut buf = vec![0u8; hookproto::SPOOL_HEAD];
            buf.extend_from_slice(&ask.encode().unwrap());
            buf.extend_from_slice(vars.as_bytes());
            let n = hookproto::spool_record(4242, 1_700_000_000_000, buf.len() - hookproto::SPOOL_HEAD, &mut buf);
            buf.truncate(n);
            buf
        };
        let spool = f.dir.join(hookproto::SPOOL);
        std::fs::write(&spool, [record(3000), record(3001)].concat()).unwrap();
        drain_spool(&f.sh, &f.dir);
        drain_spool(&f.sh, &f.dir);
        let ev = eventlog::parse_lines(f.events().as_bytes());
        let got: Vec<_> = ev.iter().map(|e| (e.port, e.action, e.reason.as_deref(), e.comm.as_str(), e.ts)).collect();
        let want = |port| (port, Action::Passthrough, Some("no coordinator"), "vite", 1_700_000_000_000);
        assert_eq!(got, [want(3000), want(3001)], "logged once each, as the shim saw it");
        assert!(!spool.exists() && !f.dir.join("hook.spool.draining").exists(), "gone once logged");
        // a spool that is a link to another file of ours is not read (and not followed)
        let other = f.dir.join("other");
        std::fs::write(&other, record(3002)).unwrap();
        std::fs::hard_link(&other, &spool).unwrap();
        drain_spool(&f.sh, &f.dir);
        assert_eq!(eventlog::parse_lines(f.events().as_bytes()).len(), 2, "a linked spool is not logged");
    }

    #[test]
    fn a_grant_that_cannot_be_journaled_is_declined() {
        // the journal's path is a directory: no line can be written
        let f = Fixture::with_journal("unjournaled", |dir| dir.to_path_buf());
        let got = f.exchange(|s| {
            send(&s, &ask(KEEP, 3000, 0, b"s1"));
            answer_and_line(&s)
        });
        let (a, line) = got.expect("answered");
        assert_eq!(a.status, DECLINED);
        assert!(line.starts_with("coordinator answered 503: ") && line.ends_with(hookproto::PASS_THROUGH), "says why: {line}");
        assert!(f.sh.state.lock().is_empty(), "withdrawn");
        let ev = eventlog::parse_lines(f.events().as_bytes());
        assert_eq!(ev.iter().map(|e| (e.action, e.port)).collect::<Vec<_>>(), [(Action::Passthrough, 3000)], "logged");
    }
}
