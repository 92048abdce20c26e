//! The built-in coordinator: a Styxy-compatible HTTP API on a Unix socket (and
//! optionally TCP) for machines without Styxy, and the reference the tests run against.
//!
//! Unlike Styxy it records the client's pid and start time, frees an allocation when
//! its owners are gone, never hands out a port bound at OS level, persists its state
//! atomically and re-validates it on start, and publishes the shared port map that
//! lets `connect()` follow a session's remaps.

/// One line in the daemon's log (its stderr), timestamped. A line that cannot be written
/// (the log's disk is full) is lost, never a panic (as `eprintln!` would).
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("{} styxy-preload daemon: {}\n", humantime::format_rfc3339_seconds(std::time::SystemTime::now()), format!($($arg)*));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

pub mod activation;
pub mod beat;
pub mod hook;
pub mod journal;
pub mod metrics;
pub mod portcheck;
pub mod record;
pub mod server;
pub mod state;
pub mod styxy_hook;
pub mod upstream;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;
use styxy_preload_common::blocklinks::{self, BlockLinks};
use styxy_preload_common::mapview;
use styxy_preload_common::paths;
use styxy_preload_common::policy::Policy;
use styxy_preload_common::policymap;
use styxy_preload_common::portmap::PortMap;
use styxy_preload_common::procinfo;
use tokio::net::{TcpListener, UnixListener};

use crate::server::Peer;
use crate::state::{Snapshot, State};

pub fn now_ms() -> u64 {
    styxy_preload_common::eventlog::now_ms()
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Exit after this long without requests while holding no allocation (None: never).
    pub idle_exit: Option<Duration>,
    /// Also serve TCP here, with the bearer token from the token file.
    pub http: Option<SocketAddr>,
    /// How long a session's freed mapping is remembered for a restarting server.
    pub grace: Duration,
    /// How often dead owners are swept.
    pub sweep_every: Duration,
    /// Styxy, when the daemon fronts it: every grant is mirrored there.
    pub upstream: Option<upstream::Config>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            idle_exit: Some(Duration::from_secs(600)),
            http: None,
            grace: Duration::from_secs(120),
            sweep_every: Duration::from_secs(1),
            upstream: None,
        }
    }
}

/// Everything the handlers share.
pub struct Shared {
    pub state: Mutex<State>,
    pub instances: Mutex<HashMap<String, Value>>,
    pub started: Instant,
    pub last_activity: AtomicU64,
    pub token: Option<String>,
    pub metrics: metrics::Metrics,
    /// The upstream Styxy's worker, when there is one.
    pub upstream: std::sync::OnceLock<Arc<upstream::Upstream>>,
    /// Processes (an `env` shell, an `exec`) whose sessions may still ask: the daemon
    /// does not idle-exit while one of them lives.
    pub anchors: Mutex<Vec<state::Owner>>,
    /// Shim binds granted whose result (and event) has not arrived yet (`/flush`).
    pub hook_pending: std::sync::atomic::AtomicUsize,
    /// `/flush`'s asks that the hook server read its mailbox (each a new number), the
    /// last one it read it after, and how it is woken for that now.
    pub mail_asked: AtomicU64,
    pub mail_read: AtomicU64,
    pub hook_ring: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Grants since the last snapshot on disk.
    pub journal: journal::Journal,
    persist_tx: Mutex<mpsc::Sender<Persist>>,
    /// A change since the writer last took the state (it has been asked to save).
    dirty: std::sync::atomic::AtomicBool,
    /// Serialises snapshot writes (the writer thread and the final one at exit).
    write_lock: Mutex<()>,
}

enum Persist {
    Save,
    Stop,
}

impl Shared {
    /// Whether a process that anchored a session still runs (dead anchors are dropped).
    pub fn anchored(&self) -> bool {
        let mut a = self.anchors.lock();
        a.retain(|o| procinfo::alive(o.pid, o.start));
        !a.is_empty()
    }

    /// Asks the writer thread to save the state; the answer does not wait for the disk.
    /// Only the first change after a save wakes the writer (a wake-up is a futex and a
    /// context switch per grant otherwise); later ones ride on the save it is preparing.
    pub fn persist(&self) {
        if !self.dirty.swap(true, Ordering::AcqRel) && !owed_here() {
            let _ = self.persist_tx.lock().send(Persist::Save);
        }
    }

    /// From here on, this thread's [`persist`](Shared::persist) owes the writer its wake-up
    /// until [`pay_wakes`](Shared::pay_wakes): the hook server's thread answers first, and
    /// only then wakes another thread (on a virtual machine, a wake-up of an idle CPU costs
    /// its sender tens of microseconds, which a waiting shim would pay).
    pub fn owe_wakes(&self) {
        WAKE_OWED.with(|owed| owed.set(Some(false)));
    }

    /// Wakes the writer if this thread's changes since the last call owe it a wake-up.
    pub fn pay_wakes(&self) {
        if WAKE_OWED.with(|owed| owed.replace(Some(false))) == Some(true) {
            let _ = self.persist_tx.lock().send(Persist::Save);
        }
    }
}

thread_local! {
    /// On a thread that [owes wakes](Shared::owe_wakes): `Some(true)` once a change asked
    /// for a save that was not sent yet.
    static WAKE_OWED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// On a thread that owes wakes, the writer's wake-up is owed (true) instead of sent now.
fn owed_here() -> bool {
    WAKE_OWED.with(|owed| {
        let owes = owed.get().is_some();
        if owes {
            owed.set(Some(true));
        }
        owes
    })
}

#[derive(Debug)]
pub enum RunError {
    AlreadyRunning,
    Io(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::AlreadyRunning => {
                write!(f, "another styxy-preload daemon already runs for this user ({})", paths::runtime_dir().display())
            }
            RunError::Io(e) => write!(f, "{e}"),
        }
    }
}

fn ioe(what: &str, path: &std::path::Path) -> impl FnOnce(io::Error) -> RunError {
    let what = format!("{what} {}", path.display());
    move |e| RunError::Io(format!("{what}: {e}"))
}

/// Writes the policy map the shim reads, and the block links that say it too (without
/// this process's own `STYXY_PRELOAD_PORTS` rules, which are not every process's).
pub fn publish_policy(st: &State) {
    let shared = Policy { rules: vec![], ..st.policy().clone() };
    let classes = policymap::classes(&shared);
    let path = paths::policymap_path();
    if let Err(e) = policymap::write(&path, &classes) {
        log!("cannot write {}: {e}; a warm process asks the daemon about every port 1024-32767", path.display());
    }
    let map = st.port_map();
    if let Some(Err(e)) = map.as_deref().and_then(PortMap::block_links).map(|l| l.set_classes(&classes)) {
        log!("cannot write the block links in {}: {e}; fresh processes read the maps' files", paths::block_links_dir().display());
    }
}

/// Lifts the soft limit on open files to the hard one: every connection is an fd.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut r = std::mem::zeroed::<libc::rlimit>();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Holds the per-user lock for the daemon's lifetime: one daemon per runtime directory.
fn take_lock(dir: &std::path::Path) -> Result<std::fs::File, RunError> {
    let path = dir.join("daemon.lock");
    let f = paths::open_regular(std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600), &path)
        .map_err(ioe("cannot open", &path))?;
    // SAFETY: flock on a valid fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(RunError::AlreadyRunning);
    }
    Ok(f)
}

fn load_state(st: &mut State, journal: &journal::Journal) {
    let path = paths::daemon_state_path();
    let data = match paths::read_regular(&path, 256 << 20) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => b"{}".to_vec(),
        Err(e) => {
            log!("cannot read state {}: {e}; starting empty", path.display());
            return;
        }
    };
    match serde_json::from_slice::<Snapshot>(&data) {
        Ok(mut snap) => {
            // the grants made after it, the newest last: one allocation per port
            let mut by_port: std::collections::BTreeMap<u16, state::Allocation> =
                snap.allocations.drain(..).chain(journal.replay()).map(|a| (a.port, a)).collect();
            snap.allocations = std::mem::take(&mut by_port).into_values().collect();
            let (kept, dropped) = st.restore(snap, now_ms());
            log!("state recovered from {}: {kept} live allocations kept, {dropped} dead ones freed", path.display());
        }
        Err(e) => {
            let aside = path.with_extension(format!("corrupt-{}", now_ms()));
            let moved = std::fs::rename(&path, &aside);
            log!(
                "state file {} is corrupt ({e}); moved aside to {} ({}); starting empty",
                path.display(),
                aside.display(),
                if moved.is_ok() { "ok" } else { "move failed" }
            );
        }
    }
}

fn read_or_create_token() -> Result<String, RunError> {
    let path = paths::token_path();
    if let Some(t) = styxy_preload_common::discovery::read_token(&path) {
        if t.len() >= 32 {
            return Ok(t);
        }
    }
    let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    paths::write_atomic(&path, token.as_bytes(), 0o600).map_err(ioe("cannot write token", &path))?;
    Ok(token)
}

/// Runs the daemon until SIGTERM/SIGINT or the idle timeout.
pub fn run(opts: Options) -> Result<(), RunError> {
    let inherited = activation::take().map_err(RunError::Io)?; // before any thread: it edits the environment
    let dir = paths::runtime_dir();
    paths::ensure_private_dir(&dir).map_err(ioe("cannot create", &dir))?;
    let _lock = take_lock(&dir)?;
    raise_fd_limit();
    let state_dir = paths::state_dir();
    paths::ensure_private_dir(&state_dir).map_err(ioe("cannot create", &state_dir))?;
    let (st, journal, probe) = initial_state(&opts);
    let token = match opts.http {
        Some(_) => Some(read_or_create_token()?),
        None => None,
    };
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared::new(st, journal, token, tx));
    let writer = {
        let sh = shared.clone();
        std::thread::Builder::new().name("persist".into()).spawn(move || persist_loop(&sh, rx)).map_err(|e| RunError::Io(e.to_string()))?
    };
    let upstream_worker = start_upstream(&opts, probe.as_ref(), &shared)?;

    let sock = paths::socket_path();
    let std_listener = activation::listener(inherited, &sock).map_err(RunError::Io)?;
    let _released = activation::Released(&sock); // however this function returns
    let pid_path = paths::daemon_pid_path();
    let _ = std::fs::write(&pid_path, format!("{}\n", std::process::id()));

    // One thread: a request is a few microseconds of work under one lock, and a single
    // thread saves a cross-thread wake-up (futex + eventfd) per connection.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| RunError::Io(e.to_string()))?;
    let result = rt.block_on(serve(shared.clone(), std_listener, opts));
    let _ = std::fs::remove_file(&pid_path);
    drop(rt);
    if let (Some(up), Some(h)) = (shared.upstream.get(), upstream_worker) {
        up.stop();
        let _ = h.join();
    }
    let _ = shared.persist_tx.lock().send(Persist::Stop);
    let _ = writer.join();
    write_snapshot(&shared);
    log!("stopped");
    result
}

/// The state the daemon starts from: the policy (the environment's rules, the upstream
/// Styxy's types), the shared port map, and what the last run saved and journaled; and
/// what the start learned of the upstream Styxy, when there is one.
fn initial_state(opts: &Options) -> (State, journal::Journal, Option<upstream::Probe>) {
    let (policy, rule_err) = Policy::from_env();
    if let Some(e) = rule_err {
        log!("STYXY_PRELOAD_PORTS ignored in part: {e}");
    }
    let map = match PortMap::create(&paths::portmap_path()) {
        Ok(m) => Some(Arc::new(m.with_block_links(BlockLinks::new(paths::block_links_dir())))),
        Err(e) => {
            log!("no shared port map ({e}): connect() will not follow remaps");
            blocklinks::remove_links(&paths::block_links_dir());
            None
        }
    };
    let mut st = State::new(policy, map, opts.grace.as_millis() as u64);
    let journal = journal::Journal::open(paths::state_dir().join("daemon-journal.jsonl"));
    let probe = opts.upstream.as_ref().map(|u| upstream::probe(u, Duration::from_millis(500)));
    if let Some(upstream::Probe::Config(cfg)) = &probe {
        st.apply_config(cfg);
    }
    publish_policy(&st);
    load_state(&mut st, &journal);
    (st, journal, probe)
}

impl Shared {
    fn new(st: State, journal: journal::Journal, token: Option<String>, persist_tx: mpsc::Sender<Persist>) -> Shared {
        Shared {
            state: Mutex::new(st),
            instances: Mutex::new(HashMap::new()),
            started: Instant::now(),
            last_activity: AtomicU64::new(now_ms()),
            token,
            metrics: metrics::Metrics::default(),
            upstream: std::sync::OnceLock::new(),
            anchors: Mutex::new(Vec::new()),
            journal,
            hook_pending: std::sync::atomic::AtomicUsize::new(0),
            mail_asked: AtomicU64::new(0),
            mail_read: AtomicU64::new(0),
            hook_ring: std::sync::OnceLock::new(),
            persist_tx: Mutex::new(persist_tx),
            dirty: std::sync::atomic::AtomicBool::new(false),
            write_lock: Mutex::new(()),
        }
    }
}

#[cfg(test)]
impl Shared {
    /// A daemon's shared state for unit tests: the default policy, no port map, the OS
    /// as `os` answers, the journal at `journal`, and no writer (a save is a no-op).
    pub(crate) fn for_tests(os: state::Os, journal: PathBuf) -> Arc<Shared> {
        let st = State::new(Policy::default(), None, 60_000).with_os(os);
        let (tx, _) = mpsc::channel();
        Arc::new(Shared::new(st, journal::Journal::open(journal), None, tx))
    }
}

/// The upstream Styxy's worker thread, when there is one.
fn start_upstream(
    opts: &Options,
    probe: Option<&upstream::Probe>,
    shared: &Arc<Shared>,
) -> Result<Option<std::thread::JoinHandle<()>>, RunError> {
    let (Some(cfg), Some(probe)) = (opts.upstream.clone(), probe) else { return Ok(None) };
    log!("upstream: Styxy at {}", cfg.endpoint);
    let (up, handle) = upstream::Upstream::start(cfg, probe, Arc::downgrade(shared)).map_err(|e| RunError::Io(e.to_string()))?;
    let _ = shared.upstream.set(up);
    Ok(Some(handle))
}

/// What `TcpListener::bind` does, with the bind `exec`'s seccomp filter lets through.
fn tcp_listener(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    portcheck::bind_unsupervised(&s, &addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

async fn serve(shared: Arc<Shared>, std_listener: std::os::unix::net::UnixListener, opts: Options) -> Result<(), RunError> {
    // the liveness beat hooks read in the port map, beaten once before the first hook can ask
    let map = shared.state.lock().port_map();
    let beat = match map.map(beat::Beat::start).transpose() {
        Ok(b) => b,
        Err(e) => return Err(RunError::Io(format!("cannot start the beat thread: {e}"))),
    };
    let app = server::router(shared.clone());
    let dir = std_listener.local_addr().ok().and_then(|a| a.as_pathname().and_then(|p| p.parent()).map(std::path::Path::to_path_buf));
    let unix = UnixListener::from_std(std_listener).map_err(|e| RunError::Io(e.to_string()))?;
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    tokio::spawn(accept_unix(unix, app.clone(), uid));
    // the shim's socket, beside the HTTP one (which may be socket-activated elsewhere)
    let hook_dir = dir.unwrap_or_else(paths::runtime_dir);
    let hook_path = hook_dir.join(styxy_preload_common::hookproto::SOCKET);
    // what the shims did while no daemon answered, logged before they can ask again
    hook::drain_spool(&shared, &hook_dir);
    let mailbox = hook_dir.join(styxy_preload_common::hookproto::MAILBOX);
    let mailbox =
        hook::mailbox(&mailbox).map_err(|e| log!("no mailbox at {} ({e}): notes come on the shim socket", mailbox.display())).ok();
    let hook = match hook::listen(&hook_path).and_then(|fd| hook::Server::start(shared.clone(), fd, mailbox, uid)) {
        Ok(server) => Some(server),
        Err(e) => {
            log!("no shim socket at {} ({e}): hooked binds go as asked", hook_path.display());
            None
        }
    };
    if let Some(addr) = opts.http {
        let tcp = tcp_listener(addr).map_err(|e| RunError::Io(format!("cannot bind {addr}: {e}")))?;
        log!("serving TCP on {addr} (bearer token in {})", paths::token_path().display());
        tokio::spawn(accept_tcp(tcp, app));
    }
    log!("serving on {} (pid {})", paths::socket_path().display(), std::process::id());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| RunError::Io(e.to_string()))?;
    let mut tick = tokio::time::interval(opts.sweep_every);
    let mut turn = tokio::time::interval(Duration::from_millis(mapview::BEAT_EVERY_MS));
    loop {
        tokio::select! {
            _ = turn.tick() => { if let Some(b) = &beat { b.turned() } }
            _ = term.recv() => { log!("SIGTERM"); break; }
            _ = tokio::signal::ctrl_c() => { log!("SIGINT"); break; }
            _ = tick.tick() => {
                let (sh, spool_dir) = (shared.clone(), hook_dir.clone());
                let held = tokio::task::spawn_blocking(move || {
                    sh.sweep();
                    hook::drain_spool(&sh, &spool_dir);
                    sh.state.lock().len()
                }).await.unwrap_or(1);
                if let Some(idle) = opts.idle_exit {
                    let quiet = now_ms().saturating_sub(shared.last_activity.load(Ordering::Relaxed));
                    if held == 0 && quiet > idle.as_millis() as u64 && !shared.anchored() {
                        log!("idle for {}s with no allocations: exiting", quiet / 1000);
                        break;
                    }
                }
            }
        }
    }
    if let Some(b) = &beat {
        b.stop();
    }
    if let Some(h) = hook {
        h.stop();
    }
    let _ = std::fs::remove_file(&hook_path);
    let _ = std::fs::remove_file(hook_dir.join(styxy_preload_common::hookproto::MAILBOX));
    Ok(())
}

// Each listener has its own bound on open connections, so that clients over TCP (which
// anyone on the machine can reach) can never use up what the owner's Unix socket needs;
// a connection over the bound is closed at once.

/// Open connections at once over the Unix socket, and over TCP.
const MAX_UNIX_CONNS: usize = 512;
const MAX_TCP_CONNS: usize = 64;

/// How a server waits after an accept that failed for want of resources (`EMFILE`,
/// `ENFILE`, `ENOMEM`, `ENOBUFS`): the connection stays queued, so accepting again at
/// once fails again, and a loop that never yields would hold the daemon's one thread
/// (no answer, no SIGTERM). It waits 5 ms, doubling to 1 s, while the connections it
/// serves end and give their fds back; one line per run of failures.
#[derive(Default)]
pub(crate) struct Backoff {
    wait: Option<Duration>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MOST: Duration = Duration::from_secs(1);

    pub(crate) async fn after(&mut self, e: &io::Error, server: &str) {
        if let Some(wait) = self.next(e, server) {
            tokio::time::sleep(wait).await;
        }
    }

    /// How long to wait after `e` before accepting again (`None`: at once).
    pub(crate) fn next(&mut self, e: &io::Error, server: &str) -> Option<Duration> {
        if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) {
            return None; // that connection's trouble, not ours
        }
        let wait = match self.wait {
            None => {
                log!("{server}: cannot accept ({e}); waiting before accepting again");
                Self::FIRST
            }
            Some(w) => (w * 2).min(Self::MOST),
        };
        self.wait = Some(wait);
        Some(wait)
    }

    pub(crate) fn reset(&mut self) {
        self.wait = None;
    }
}

async fn accept_unix(listener: UnixListener, app: axum::Router, uid: u32) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_UNIX_CONNS));
    let mut backoff = Backoff::default();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                backoff.after(&e, "daemon.sock").await;
                continue;
            }
        };
        backoff.reset();
        let Ok(cred) = stream.peer_cred() else {
            continue;
        };
        if cred.uid() != uid {
            log!("refused a connection from uid {} (pid {:?})", cred.uid(), cred.pid());
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let peer = Peer { pid: cred.pid().and_then(|p| u32::try_from(p).ok()), tcp: false };
        let app = app.clone();
        tokio::spawn(async move {
            serve_conn(stream, app, peer).await;
            drop(slot);
        });
    }
}

async fn accept_tcp(listener: TcpListener, app: axum::Router) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNS));
    let mut backoff = Backoff::default();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                backoff.after(&e, "TCP").await;
                continue;
            }
        };
        backoff.reset();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            serve_conn(stream, app, Peer { pid: None, tcp: true }).await;
            drop(slot);
        });
    }
}

/// One connection, one request (clients send `Connection: close`; keep-alive off): the
/// headers within 2 s, the whole exchange within 5 s. A stalled client only holds its
/// own task and one of its listener's connection slots.
async fn serve_conn<S>(io: S, app: axum::Router, peer: Peer)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer);
        app.clone().oneshot(req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(2))
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

fn write_snapshot(shared: &Shared) {
    let _serial = shared.write_lock.lock();
    let snap = {
        let st = shared.state.lock();
        shared.journal.rotate();
        st.snapshot(now_ms())
    };
    let path = paths::daemon_state_path();
    match serde_json::to_vec_pretty(&snap) {
        Ok(data) => match paths::write_atomic(&path, &data, 0o600) {
            Ok(()) => shared.journal.retire(),
            Err(e) => log!("cannot save state to {}: {e}", path.display()),
        },
        Err(e) => log!("cannot encode state: {e}"),
    }
}

/// How long the writer waits after a change for more before it writes: a burst of
/// allocations costs one write and one fsync, not one each.
const PERSIST_DEBOUNCE: Duration = Duration::from_millis(50);

/// Saves the state whenever asked, coalescing bursts: one write covers every change
/// made before it started.
fn persist_loop(shared: &Shared, rx: mpsc::Receiver<Persist>) {
    while let Ok(Persist::Save) = rx.recv() {
        let mut stop = false;
        let until = Instant::now() + PERSIST_DEBOUNCE;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(Persist::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    stop = true;
                    break;
                }
                Ok(Persist::Save) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => break,
            }
        }
        // changes from here on ask for another save
        shared.dirty.store(false, Ordering::Release);
        write_snapshot(shared);
        if stop {
            break;
        }
    }
}

/// Where `daemon start` sends the daemon's stderr.
pub fn log_path() -> PathBuf {
    paths::daemon_log_path()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon's shared state whose writer is the test: what it is asked comes out of `rx`.
    fn with_writer() -> (Shared, mpsc::Receiver<Persist>, PathBuf) {
        let (tx, rx) = mpsc::channel();
        let journal = std::env::temp_dir().join(format!("styxy-owed-{}-{:?}.jsonl", std::process::id(), std::thread::current().id()));
        (Shared::new(State::new(Policy::default(), None, 60_000), journal::Journal::open(journal.clone()), None, tx), rx, journal)
    }

    fn saves(rx: &mpsc::Receiver<Persist>) -> usize {
        std::iter::from_fn(|| rx.try_recv().ok()).filter(|p| matches!(p, Persist::Save)).count()
    }

    #[test]
    fn a_change_wakes_the_writer_at_once_or_when_the_thread_that_owes_it_pays() {
        let (sh, rx, journal) = with_writer();
        sh.persist();
        assert_eq!(saves(&rx), 1, "a change wakes the writer at once");
        sh.dirty.store(false, Ordering::Release); // the writer took it
        std::thread::scope(|s| {
            s.spawn(move || {
                sh.owe_wakes(); // the hook server's thread
                sh.persist();
                sh.persist();
                assert_eq!(saves(&rx), 0, "owed while the answers go out");
                sh.pay_wakes();
                assert_eq!(saves(&rx), 1, "two changes, one wake-up, once paid");
                sh.pay_wakes();
                assert_eq!(saves(&rx), 0, "paid once");
            });
        });
        let _ = std::fs::remove_file(journal);
    }
}
