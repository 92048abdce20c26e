//! The shim's socket (docs/ARCHITECTURE.md "Hook ↔ daemon protocol"): `hook.sock`, a
//! `SOCK_SEQPACKET` Unix socket beside `daemon.sock`, speaking the fixed layout of
//! `styxy_preload_common::hookproto`. It answers one question — which port may this
//! process bind for the one it asked for? — so that a process's coordinated bind, kept or
//! remapped, costs one round trip and no library load. The rest (fallback mode, Styxy
//! upstream, a retry after a failed bind) is `DECLINED` and goes the HTTP way through the
//! hooks' logic.
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

use styxy_preload_common::api::{service_name, valid_instance_id};
use styxy_preload_common::eventlog::{self, Action, Event, Log};
use styxy_preload_common::hookproto::{Answer, Ask, ASK_LEN, DECLINED, DONE, GRANTED, KEEP, MAY_MOVE, MOVED};
use styxy_preload_common::policy::Decision;
use styxy_preload_common::procinfo;
use tokio::io::unix::AsyncFd;

use crate::state::{AllocRequest, Owner};
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
/// Who asked is read from `/proc` (its name, directory and log) before the answer, while
/// the process waits for it (a short-lived one is gone soon after), on a blocking thread:
/// a client's path never holds up this thread, which answers every hook and every HTTP
/// request. A new grant whose `DONE` says the bind failed, or whose client closed without
/// one, is withdrawn.
async fn exchange(sh: Arc<Shared>, conn: OwnedFd, pid: u32) {
    let Some(fd) = watch(conn) else { return };
    let mut buf = [0u8; ASK_LEN + 1];
    let started = Instant::now();
    let Ok(n) = recv(&fd, &mut buf).await else { return };
    let Some(ask) = Ask::decode(&buf[..n]).filter(|a| a.kind == KEEP) else { return };
    let Some(grant) = keep(&sh, pid, &ask) else {
        send(&fd, &Answer { status: DECLINED, port: 0, existing: false }.encode());
        return;
    };
    let _pending = Pending::new(&sh.hook_pending);
    let (port, family, existing) = (grant.port, ask.family, grant.existing);
    let described = tokio::task::spawn_blocking({
        let sh = sh.clone();
        move || describe(&sh, grant)
    })
    .await;
    let status = if port == ask.port { GRANTED } else { MOVED };
    send(&fd, &Answer { status, port, existing }.encode());
    let mut done = [0u8; ASK_LEN + 1];
    let heard = recv(&fd, &mut done).await;
    let reported = heard.as_ref().ok().and_then(|n| Ask::decode(&done[..*n])).filter(|a| a.kind == DONE && a.port == port);
    match (reported, described) {
        (Some(done), Ok(grant)) if done.errno == 0 => {
            // bound: confirmed, and the binder an owner, as a listen would
            if let Some(owner) = Owner::of(grant.pid) {
                sh.state.lock().confirm(port, owner);
            }
            let _ = tokio::task::spawn_blocking(move || log_event(&grant, port, family, started)).await;
        }
        // no word in time: the grant stands while its owner's socket holds the port
        _ if existing || heard.is_err() => {}
        // the bind failed, or the client closed without a word (it gave up): a new grant
        // is withdrawn (the hooks' logic takes it from here)
        _ => {
            sh.state.lock().remove(port, now_ms());
            sh.persist();
        }
    }
}

/// Who asked, read from /proc while it waits for the answer: its name, directory and
/// log, into the grant and a new allocation, which is then saved.
fn describe(sh: &Shared, mut grant: Granted) -> Granted {
    let port = grant.port;
    grant.comm = procinfo::comm(grant.pid).unwrap_or_else(|| "?".into());
    grant.log = log_of(grant.pid);
    if grant.existing {
        return grant;
    }
    let cwd = procinfo::cwd(grant.pid);
    if let Some(a) = sh.state.lock().allocs.get_mut(&port) {
        a.service_name = service_name(&grant.comm, port);
        a.comm = Some(grant.comm.clone());
        a.project_path = cwd;
    }
    sh.persist();
    grant
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
struct Granted {
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
    log: Log,
}

/// Grants `ask.port` to `pid`, or another port when the ask [`MAY_MOVE`], as the hooks'
/// logic would: a coordinated port, no Styxy answering (a grant would wait for it).
fn keep(sh: &Shared, pid: u32, ask: &Ask) -> Option<Granted> {
    sh.last_activity.store(now_ms(), Ordering::Relaxed);
    if sh.upstream.get().is_some_and(|u| u.usable()) {
        return None; // Styxy answers: the hooks' logic waits for its word on the port
    }
    let session = std::str::from_utf8(ask.session).ok().filter(|s| !s.is_empty() && *s != "default");
    if session.is_some_and(|s| !valid_instance_id(s)) {
        return None;
    }
    let started = Instant::now();
    let mut st = sh.state.lock();
    let Decision::Coordinated(ty) = st.policy.decide(ask.port) else { return None };
    let ty = ty.to_string();
    let req = AllocRequest {
        service_type: ty.clone(),
        service_name: service_name("process", ask.port), // named once the shim binds
        preferred_port: Some(ask.port),
        session: session.map(str::to_string),
        project_path: None,
        dry_run: false,
        requested_port: Some(ask.port),
        comm: None,
        exclude: vec![],
        owner: Some(Owner::pid(pid)),
        bind: true,
        exactly: ask.flags & MAY_MOVE == 0,
    };
    let g = st.allocate(&req, now_ms()).ok()?;
    // the process had bound this grant before (a twin, a probe): one start
    let again = g.existing && st.allocs.get(&g.port).is_some_and(|a| a.owners.iter().any(|o| o.pid == pid));
    drop(st);
    if !g.existing && crate::server::journaled(sh, g.port).is_err() {
        return None; // not granted (and said); the hooks' logic hears why over HTTP
    }
    sh.metrics.observe_allocate(started.elapsed(), true);
    Some(Granted {
        pid,
        port: g.port,
        asked: ask.port,
        holder: g.holder.as_ref().map(styxy_preload_common::api::Holder::describe).unwrap_or_default(),
        existing: g.existing,
        again,
        service_type: ty,
        session: session.map(str::to_string),
        comm: String::new(),
        log: Log::default(),
    })
}

/// The event the process would have logged (a blocking thread's work: the client names
/// the file).
fn log_event(g: &Granted, port: u16, family: u8, started: Instant) {
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
    let _ = g.log.append(&ev);
}

/// The event log of `pid`: where its own environment says (`paths::event_log_path`).
fn log_of(pid: u32) -> Log {
    let env = procinfo::environ(pid);
    Log::of(&|k| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()))
}
