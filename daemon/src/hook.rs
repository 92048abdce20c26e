//! The shim's socket (docs/ARCHITECTURE.md "Hook ↔ daemon protocol"): `hook.sock`, a
//! `SOCK_SEQPACKET` Unix socket beside `daemon.sock`, speaking the fixed layout of
//! `styxy_preload_common::hookproto`. It answers one question — may this process bind
//! exactly the port it asked for? — so that a process's first coordinated bind costs one
//! round trip and no library load. Everything else (a remap, fallback mode, Styxy
//! upstream) is `DECLINED` and goes the HTTP way through the hooks' logic.
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
use styxy_preload_common::hookproto::{Answer, Ask, ASK_LEN, DECLINED, DONE, GRANTED, KEEP};
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
/// What touches the client's files (its `/proc` entries, the log its environment names)
/// runs on a blocking thread: a client's path never holds up this thread, which answers
/// every hook and every HTTP request.
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
    send(&fd, &Answer { status: GRANTED, port: ask.port, existing: grant.existing }.encode());
    let (port, family) = (ask.port, ask.family);
    let described = tokio::task::spawn_blocking({
        let sh = sh.clone();
        move || describe(&sh, grant, port)
    });
    let mut done = [0u8; ASK_LEN + 1];
    let heard = recv(&fd, &mut done).await;
    let Ok(grant) = described.await else { return };
    let Ok(n) = heard else { return };
    match Ask::decode(&done[..n]).filter(|a| a.kind == DONE && a.port == port) {
        Some(done) if done.errno == 0 => {
            // bound: confirmed, and the binder an owner, as a listen would
            if let Some(owner) = Owner::of(grant.pid) {
                sh.confirm(port, owner);
            }
            let _ = tokio::task::spawn_blocking(move || log_event(&grant, port, family, started)).await;
        }
        // the bind failed: a new grant is withdrawn; the hooks' logic takes it from here
        Some(_) if !grant.existing => sh.withdraw(port),
        _ => {}
    }
}

/// Who asked, read from /proc while the shim binds (off the answer's path): its name,
/// directory and log, into the grant and a new allocation, which is then saved.
fn describe(sh: &Shared, mut grant: KeptBind, port: u16) -> KeptBind {
    grant.comm = procinfo::comm(grant.pid).unwrap_or_else(|| "?".into());
    grant.log = log_of(grant.pid);
    if grant.existing {
        return grant;
    }
    sh.describe(port, &grant.comm, procinfo::cwd(grant.pid));
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
struct KeptBind {
    pid: u32,
    existing: bool,
    /// The process had bound this port before (a dual-stack twin, a probe).
    again: bool,
    service_type: String,
    session: Option<String>,
    comm: String,
    log: Log,
}

/// Grants exactly `ask.port` to `pid` when the hooks' logic would keep it too: a
/// coordinated port, no Styxy answering (a grant would wait for it), and free for this session.
async fn keep(sh: &Shared, pid: u32, ask: &Ask<'_>) -> Option<KeptBind> {
    sh.last_activity.store(now_ms(), Ordering::Relaxed);
    if sh.upstream.get().is_some_and(|u| u.usable()) {
        return None; // Styxy answers: the hooks' logic waits for its word on the port
    }
    let session = std::str::from_utf8(ask.session).ok().filter(|s| !s.is_empty() && *s != "default");
    if session.is_some_and(|s| !valid_instance_id(s)) {
        return None;
    }
    let (ty, again) = {
        let st = sh.state.lock();
        let Decision::Coordinated(ty) = st.policy().decide(ask.port) else { return None };
        (ty.to_string(), session.is_some_and(|s| st.owned_by(ask.port, s, pid)))
    };
    let asked = AllocateRequest {
        service_name: Some(service_name("process", ask.port)), // named once the shim binds
        instance_id: session.map(str::to_string),
        bind: true,
        ..AllocateRequest::for_port(&ty, ask.port)
    };
    let claim = Claim { exactly: true, ..Claim::new(asked, Some(Owner::pid(pid))) };
    // another port (a remap) is not granted here: the hooks' logic tells the person; a
    // grant that cannot be journaled is not made (and said): it hears why over HTTP
    let g = sh.grant(&claim).await.ok().filter(|g| g.port == ask.port)?;
    Some(KeptBind {
        pid,
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
fn log_event(g: &KeptBind, port: u16, family: u8, started: Instant) {
    let (action, reason) = if g.again { (Action::Observed, Some(eventlog::bound_again(port))) } else { (Action::Kept, None) };
    let ev = Event {
        ts: eventlog::now_ms(),
        session: g.session.clone(),
        pid: g.pid,
        comm: g.comm.clone(),
        call: "bind".into(),
        requested_port: port,
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
