//! Styxy as the daemon's upstream (docs/ARCHITECTURE.md "One path"): the hooks ask only
//! this daemon, and the daemon keeps the user's Styxy told.
//!
//! - Every grant becomes an allocation in Styxy (the session as `instance_id`, the type,
//!   the client's cwd as `project_path`, `comm-port` as service name), asked with the
//!   granted port as `preferred_port`. When Styxy answers in time with another port of
//!   the type (it holds ours for someone else), its choice wins if that port is free
//!   here; a later answer that differs is given back, and the allocation is a `conflict`
//!   once Styxy's list shows another client holding its port.
//! - Ports Styxy holds for other clients (read from `GET /allocations` whenever Styxy's
//!   count of allocations, polled on the free `GET /status` every second or half
//!   second, differs from ours) are never granted ([`State::held_by_others`]).
//! - Styxy records each allocation's `User-Agent`; ours names this daemon
//!   ([`Config::agent`]). An allocation of ours Styxy holds under a lock we do not know
//!   (an answer that came after our client gave up, a crash) is adopted by the
//!   allocation it belongs to, or released: never counted as another client's.
//! - Styxy is trusted only when this user's uid owns its listening socket, or the user
//!   named it (`STYXY_URL`, `--upstream`): nothing, the token least, goes elsewhere.
//! - A freed allocation's Styxy lock is released within a second or two of the sweep
//!   that freed it; a live one is re-asserted before Styxy's expiry; one Styxy lost (a
//!   restart) is allocated again.
//! - Styxy allows 100 requests a minute for all local clients: the worker keeps to its
//!   own [`Budget`], honours `Retry-After`, and never makes a bind wait on Styxy beyond
//!   [`GRANT_WAIT`] ([`STALE_WAIT`] when its view of Styxy is not confirmed): what it
//!   cannot do now it reconciles later.
//!
//! The facts about Styxy this relies on are in docs/STYXY.md. One worker thread does
//! the talking, with blocking HTTP on kept connections (`common::http::Kept`, each checked
//! when made: [`trusted`]), and a second one the releases; the grant path only hands the
//! worker a job and waits, bounded, on a oneshot channel.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::portcheck;
use parking_lot::Mutex;
use serde::Serialize;
use styxy_preload_common::api::{self, AllocateReply, AllocationsReply};
use styxy_preload_common::discovery;
use styxy_preload_common::http::{self, Endpoint, Timeouts};
use styxy_preload_common::{paths, procinfo};
use tokio::sync::oneshot;

use crate::state::{Allocation, Claim, Standing, State, Todo};
use crate::{now_ms, Shared};

/// How long a grant waits for Styxy's answer before it is made locally, when Styxy's
/// count of allocations confirmed our view of it within [`FRESH_MS`].
pub const GRANT_WAIT: Duration = Duration::from_millis(100);
/// How long it waits otherwise: as long as the hooks' budget (200 ms a bind) allows.
pub const STALE_WAIT: Duration = Duration::from_millis(160);
/// A view of Styxy's allocations confirmed this recently is current enough for a grant.
const FRESH_MS: u64 = 1_500;
/// Styxy's own answers get this long (a DELETE right after an allocate takes ~1 s).
const CALL: Timeouts = Timeouts { connect: Duration::from_millis(300), total: Duration::from_secs(3), max_body: 8 << 20 };
/// `GET /status`, polled: a Styxy silent this long is busy (its port observer freezes it).
const POLL: Timeouts = Timeouts { connect: Duration::from_millis(300), total: Duration::from_millis(500), max_body: 64 << 10 };
/// The worker's heartbeat: releases, polls and due refreshes are looked at this often.
const TICK: Duration = Duration::from_millis(250);
/// `GET /status` is polled this often while binds happen, and when all is quiet.
const POLL_ACTIVE_MS: u64 = 500;
const POLL_IDLE_MS: u64 = 1_000;
/// A Styxy silent this long is taken for gone: its freezes last seconds, not minutes.
const BUSY_GONE_MS: u64 = 60_000;
/// `GET /config` is read again this often (and whenever Styxy restarts).
const CONFIG_EVERY_MS: u64 = 60_000;

#[derive(Debug, Clone)]
pub struct Config {
    pub endpoint: Endpoint,
    /// The user named this Styxy (`STYXY_URL`, `--upstream`): trusted whoever listens.
    pub named: bool,
    /// Our `User-Agent`, which Styxy records with each allocation: it tells ours apart.
    pub agent: String,
    /// Styxy forgets an allocation this long after it was made (30 min); live ones are
    /// re-asserted at three fifths of it.
    pub expiry: Duration,
    /// Requests per minute the daemon allows itself (Styxy: 100 for every local client).
    pub per_minute: u32,
    /// How often Styxy's allocations are read while binds happen, and when all is quiet.
    pub refresh_active: Duration,
    pub refresh_idle: Duration,
}

impl Config {
    pub fn new(endpoint: Endpoint) -> Config {
        Config::with_expiry(endpoint, Duration::from_secs(30 * 60))
    }

    /// Refreshes often enough to re-assert every live allocation in time.
    pub fn with_expiry(endpoint: Endpoint, expiry: Duration) -> Config {
        Config {
            endpoint,
            named: false,
            agent: agent(),
            expiry,
            per_minute: 80,
            refresh_active: Duration::from_secs(3).min(expiry / 10),
            refresh_idle: Duration::from_secs(30).min(expiry / 10),
        }
    }
}

/// This daemon's `User-Agent` towards Styxy: one per runtime directory (one daemon each).
pub fn agent() -> String {
    format!("styxy-preload-daemon ({})", paths::runtime_dir().display())
}

/// Whether `ep` may be told our token and believed: the user named it, or every socket
/// listening where a connection to it goes is this user's ([`portcheck::listener_uids`];
/// `/proc/net/tcp*` where the kernel's socket diagnostics cannot be asked).
/// `Err(None)`: nothing listens there; `Err(Some(why))`: another user does.
pub fn trusted(ep: &Endpoint, named: bool) -> Result<(), Option<String>> {
    let Endpoint::Tcp { addr, .. } = ep else { return Ok(()) };
    if named {
        return Ok(());
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let uids = portcheck::listener_uids(*addr).unwrap_or_else(|| procinfo::tcp_listener_uids(*addr));
    match uids.iter().find(|u| **u != me) {
        _ if uids.is_empty() => Err(None),
        Some(other) => Err(Some(format!(
            "{addr} is listened on by uid {other}, not by this user: not trusted, never sent the token (set STYXY_URL=http://{addr} to trust it)"
        ))),
        None => Ok(()),
    }
}

/// The check of each new connection to Styxy ([`trusted`]), which `status` shows when it
/// fails: nothing is sent on a connection another user's socket accepted.
fn vet(cfg: &Config, up: Arc<Upstream>) -> http::Vet {
    let (endpoint, named) = (cfg.endpoint.clone(), cfg.named);
    Arc::new(move || {
        let verdict = trusted(&endpoint, named);
        up.health.lock().untrusted = verdict.clone().err().flatten();
        verdict.map_err(|why| why.unwrap_or_else(|| "nothing listens there".into()))
    })
}

/// What `status` shows of the upstream.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Health {
    pub url: String,
    pub reachable: bool,
    /// Styxy runs but its last answer did not come in time (its port observer freezes it).
    pub busy: bool,
    /// Why Styxy is not trusted: another user listens where it is expected.
    pub untrusted: Option<String>,
    /// Styxy refused the token (401): nothing is mirrored until that is fixed.
    pub refused: bool,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
    pub last_429_ms: Option<u64>,
    /// No request until then (Styxy's `Retry-After`).
    #[serde(skip)]
    blocked_until_ms: u64,
    pub last_refresh_ms: Option<u64>,
    /// When Styxy's count of allocations last matched our view of them.
    #[serde(skip)]
    view_confirmed_ms: u64,
    /// Since when Styxy has not answered in time.
    #[serde(skip)]
    busy_since_ms: Option<u64>,
}

/// The upstream's part of `GET /status`: its health, and how our allocations stand there.
pub fn report(sh: &Shared) -> Option<serde_json::Value> {
    let health = serde_json::to_value(&*sh.upstream.get()?.health.lock()).ok()?;
    let st = sh.state.lock();
    let count = |f: fn(&Standing) -> bool| st.allocations().filter(|a| f(&a.upstream)).count();
    let mut v = health;
    v["mirrored"] = count(|u| matches!(u, Standing::Mirrored { .. })).into();
    v["served"] = count(|u| *u == Standing::Served).into();
    v["conflicts"] = count(|u| *u == Standing::Conflict).into();
    v["pending"] = count(|u| *u == Standing::Pending).into();
    v["held_by_others"] = st.held_by_others().into();
    v["releases_pending"] = st.releases_pending().len().into();
    Some(v)
}

/// Styxy's answer to one allocate, as the grant path and the worker apply it.
#[derive(Debug, Clone)]
pub enum StyxyAnswer {
    Allocated { port: u16, lock_id: String },
    Failed,
}

enum Job {
    /// Mirror the new allocation at this port; the answer goes back if still awaited.
    Mirror {
        port: u16,
        reply: oneshot::Sender<StyxyAnswer>,
    },
    Stop,
}

/// The grant path's handle on the worker.
pub struct Upstream {
    jobs: Mutex<mpsc::Sender<Job>>,
    pub health: Mutex<Health>,
}

impl Upstream {
    /// Starts the worker thread.
    pub fn start(
        cfg: Config,
        first: &Probe,
        shared: std::sync::Weak<Shared>,
    ) -> std::io::Result<(Arc<Upstream>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let mut health = Health { url: cfg.endpoint.to_string(), ..Health::default() };
        match first {
            Probe::Silent(why) => {
                health.last_error = Some(why.clone());
                health.last_error_ms = Some(now_ms());
            }
            _ => health.reachable = true,
        }
        let up = Arc::new(Upstream { jobs: Mutex::new(tx), health: Mutex::new(health) });
        let worker = Worker::new(cfg, shared, up.clone());
        let handle = std::thread::Builder::new().name("upstream".into()).spawn(move || worker.run(rx))?;
        Ok((up, handle))
    }

    pub fn stop(&self) {
        let _ = self.jobs.lock().send(Job::Stop);
    }

    /// Whether a grant may wait for Styxy now: it answered last time, is busy (frozen,
    /// still holding what it held) or was never tried yet, and is trusted, not refusing
    /// us and not rate limiting.
    pub(crate) fn usable(&self) -> bool {
        let h = self.health.lock();
        (h.reachable || h.busy || h.last_error_ms.is_none()) && !h.refused && h.untrusted.is_none() && now_ms() >= h.blocked_until_ms
    }

    /// How long a grant waits for Styxy: longer when our view of it is not confirmed.
    fn grant_wait(&self) -> Duration {
        let h = self.health.lock();
        if !h.busy && now_ms().saturating_sub(h.view_confirmed_ms) <= FRESH_MS {
            GRANT_WAIT
        } else {
            STALE_WAIT
        }
    }
}

/// What the daemon's start learned of Styxy (`GET /config`, asked once within a wait so
/// that the first grants already know a user's own types): its types, that it answered
/// without them, or why nothing answered. The worker starts from it: until its first try,
/// a Styxy that did not answer at the start is not waited for by the first binds.
pub enum Probe {
    Config(serde_json::Value),
    Answered,
    Silent(String),
}

pub fn probe(cfg: &Config, wait: Duration) -> Probe {
    if let Err(why) = trusted(&cfg.endpoint, cfg.named) {
        return match why {
            None => Probe::Silent(format!("nothing listens at {}", cfg.endpoint)),
            Some(_) => Probe::Answered, // the worker says why it is not trusted
        };
    }
    let t = Timeouts { connect: wait, total: wait, max_body: 1 << 20 };
    match http::call_as(&cfg.endpoint, &cfg.agent, "GET", "/config", None, t) {
        Err(e) => Probe::Silent(e.to_string()),
        Ok(r) => match r.json().ok().filter(|_| r.status == 200) {
            Some(v) => Probe::Config(v),
            None => Probe::Answered,
        },
    }
}

/// Mirrors the new allocation at `port` in Styxy, waiting at most [`GRANT_WAIT`] or
/// [`STALE_WAIT`] (`Upstream::grant_wait`). Returns
/// the port to grant instead when Styxy chose another one that is free here.
pub async fn mirror_grant(sh: &Shared, port: u16) -> Option<u16> {
    let up = sh.upstream.get()?;
    if !up.usable() || sh.state.lock().allocation(port).is_none_or(|a| a.upstream != Standing::Pending) {
        return None; // granted locally (the worker reconciles when it can), or Styxy's hook's lock adopted
    }
    let (tx, mut rx) = oneshot::channel();
    up.jobs.lock().send(Job::Mirror { port, reply: tx }).ok()?;
    let answer = match tokio::time::timeout(up.grant_wait(), &mut rx).await {
        Ok(Ok(a)) => a,
        _ => {
            // too late: from now on the worker applies the answer itself
            rx.close();
            rx.try_recv().ok()?
        }
    };
    let moved = apply(&mut sh.state.lock(), port, answer, true);
    sh.persist();
    moved
}

/// Records Styxy's answer for the allocation at `port` ([`State::adopt_answer`]).
/// `in_time`: the client has not been answered yet. Returns the port to grant instead.
fn apply(st: &mut State, port: u16, answer: StyxyAnswer, in_time: bool) -> Option<u16> {
    let StyxyAnswer::Allocated { port: theirs, lock_id } = answer else {
        return None;
    };
    st.adopt_answer(port, theirs, lock_id, in_time, now_ms())
}

/// Our own share of Styxy's fixed-window rate limit, and its `Retry-After`.
#[derive(Default)]
struct Budget {
    window_start_ms: u64,
    used: u32,
    blocked_until_ms: u64,
}

impl Budget {
    fn take(&mut self, per_minute: u32, now: u64) -> bool {
        if now < self.blocked_until_ms {
            return false;
        }
        if now.saturating_sub(self.window_start_ms) >= 60_000 {
            self.window_start_ms = now;
            self.used = 0;
        }
        if self.used >= per_minute {
            return false;
        }
        self.used += 1;
        true
    }
}

/// What the worker and the releaser share: how to reach Styxy, our budget there, and
/// Styxy's count of allocations as our view has it.
struct Client {
    cfg: Config,
    /// The endpoint, with the token as last read (a 401 reads it again).
    endpoint: Mutex<Endpoint>,
    /// The connections to Styxy, kept between requests; each new one is [`trusted`] first.
    http: http::Kept,
    shared: std::sync::Weak<Shared>,
    up: Arc<Upstream>,
    budget: Mutex<Budget>,
    /// Styxy's count of allocations as our view has it (its list, then our own
    /// allocates and releases): another count on `/status` means the view is stale.
    count: Mutex<Option<u64>>,
}

/// The thread that asks Styxy everything but releases.
struct Worker {
    client: Arc<Client>,
    next_refresh_ms: u64,
    next_poll_ms: u64,
    next_config_ms: u64,
    last_grant_ms: u64,
    /// When Styxy started, by its uptime at the last poll: another start means it
    /// restarted (and forgot).
    started_ms: Option<u64>,
}

/// How Styxy failed to answer.
#[derive(PartialEq, Eq)]
enum Silent {
    /// A timeout: it runs but is frozen (its port observer), holding what it held.
    Busy,
    /// Nothing accepts the connection (or an untrusted listener does): it holds nothing.
    Gone,
    /// Something answered, not with HTTP we understand.
    Garbled,
}

enum Failure {
    /// Not counted, nothing happened on Styxy's side (unreachable, over our budget).
    Skipped,
    /// Styxy answered with an error, or the call failed.
    Failed,
}

impl Worker {
    fn new(cfg: Config, shared: std::sync::Weak<Shared>, up: Arc<Upstream>) -> Worker {
        let endpoint = Mutex::new(cfg.endpoint.clone());
        let http = http::Kept::new(&cfg.endpoint, &cfg.agent, CALL.connect, vet(&cfg, up.clone()));
        let client = Client { cfg, endpoint, http, shared, up, budget: Mutex::new(Budget::default()), count: Mutex::new(None) };
        Worker { client: Arc::new(client), next_refresh_ms: 0, next_poll_ms: 0, next_config_ms: 0, last_grant_ms: 0, started_ms: None }
    }

    /// Runs the worker, and the releaser beside it (a release can take Styxy a second or
    /// more, which an allocate for a bind in progress must not wait for).
    fn run(self, rx: mpsc::Receiver<Job>) {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let releaser = {
            let (client, stop) = (self.client.clone(), stop.clone());
            std::thread::Builder::new().name("upstream-release".into()).spawn(move || client.releaser(&stop))
        };
        self.serve(rx);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Ok(r) = releaser {
            let _ = r.join();
        }
    }

    fn serve(mut self, rx: mpsc::Receiver<Job>) {
        let mut first = true;
        loop {
            // the first round runs at once: Styxy's holdings are known before most binds
            match if first { Err(mpsc::RecvTimeoutError::Timeout) } else { rx.recv_timeout(TICK) } {
                Ok(Job::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(Job::Mirror { port, reply }) => self.mirror(port, reply),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            first = false;
            let Some(sh) = self.client.shared.upgrade() else { break };
            if now_ms() >= self.next_poll_ms {
                self.poll(&sh);
            }
            if now_ms() >= self.next_refresh_ms {
                self.reconcile(&sh);
            }
        }
    }

    fn active(&self, now: u64) -> bool {
        now.saturating_sub(self.last_grant_ms) < 60_000
    }

    /// `GET /status` (free: neither counted nor authenticated): is Styxy there, did it
    /// restart, and does its count of allocations still match our view?
    fn poll(&mut self, sh: &Shared) {
        let now = now_ms();
        self.next_poll_ms = now + if self.active(now) { POLL_ACTIVE_MS } else { POLL_IDLE_MS };
        let Ok(r) = self.client.call_within("GET", "/status", None, POLL) else {
            if !self.client.up.health.lock().busy {
                self.started_ms = None; // not a frozen Styxy: its types are read again when it answers
            }
            return;
        };
        let Ok(v) = r.json::<serde_json::Value>() else { return };
        // when it started, from Node's process.uptime() (seconds, with a fraction) as of
        // its answer, which comes right after it was computed
        let now = now_ms();
        let started = v["uptime"].as_f64().map(|u| now.saturating_sub((u * 1000.0) as u64));
        let restarted = match (self.started_ms, started) {
            (Some(a), Some(b)) => a.abs_diff(b) > 250,
            _ => true,
        };
        if restarted || now >= self.next_config_ms {
            // there for the first time, back, or restarted: its types may be new
            self.read_config(sh);
            self.next_refresh_ms = now;
        }
        self.started_ms = started;
        if v["allocations"].as_u64() != *self.client.count.lock() {
            self.next_refresh_ms = now;
        } else {
            self.client.up.health.lock().view_confirmed_ms = now;
        }
    }

    /// Styxy's service types (`GET /config`), taken as far as a coordinator may set them.
    fn read_config(&mut self, sh: &Shared) {
        self.next_config_ms = now_ms() + CONFIG_EVERY_MS;
        let Ok(r) = self.client.call("GET", "/config", None) else { return };
        let Ok(cfg) = r.json::<serde_json::Value>() else { return };
        let mut st = sh.state.lock();
        if st.apply_config(&cfg) {
            crate::publish_policy(&st);
        }
    }

    fn mirror(&mut self, port: u16, reply: oneshot::Sender<StyxyAnswer>) {
        let Some(sh) = self.client.shared.upgrade() else { return };
        self.last_grant_ms = now_ms();
        self.next_refresh_ms = self.next_refresh_ms.min(now_ms() + self.client.cfg.refresh_active.as_millis() as u64);
        let Some(a) = sh.state.lock().allocation(port).filter(|a| a.upstream == Standing::Pending).cloned() else { return };
        let answer = self.client.allocate(&a);
        let answer = self.reserved_by_hook(&sh, &a, answer);
        if let Err(late) = reply.send(answer) {
            self.apply_late(&sh, port, late);
        }
    }

    /// Styxy answered another port than `a`'s: if its list shows `a`'s port reserved by
    /// Styxy's hook for this very command (reserved after the daemon last read the list),
    /// that reservation is the answer, and Styxy's other port is given back.
    fn reserved_by_hook(&mut self, sh: &Shared, a: &Allocation, answer: StyxyAnswer) -> StyxyAnswer {
        let StyxyAnswer::Allocated { port: theirs, lock_id } = &answer else { return answer };
        if *theirs == a.port {
            return answer;
        }
        let Ok(list) =
            self.client.call("GET", "/allocations", None).and_then(|r| r.json::<AllocationsReply>().map_err(|_| Failure::Failed))
        else {
            return answer;
        };
        let claim = Claim::new(a.request(), a.owners.first().cloned());
        let agent = &self.client.cfg.agent;
        let found = list.allocations.into_iter().find(|t| {
            t.port == a.port && t.user_agent.as_deref() != Some(agent) && crate::styxy_hook::reserved_for(t, &claim, &a.service_type)
        });
        match found {
            Some(t) => {
                sh.state.lock().give_back(lock_id.clone());
                StyxyAnswer::Allocated { port: a.port, lock_id: t.lock_id }
            }
            None => answer,
        }
    }

    /// An answer nobody waits for any more: recorded; one that differs from the port
    /// granted has Styxy's list read at once (whose is the port?).
    fn apply_late(&mut self, sh: &Shared, port: u16, answer: StyxyAnswer) {
        if matches!(&answer, StyxyAnswer::Allocated { port: p, .. } if *p != port) {
            self.next_refresh_ms = now_ms();
        }
        apply(&mut sh.state.lock(), port, answer, false);
        sh.persist();
    }

    /// Reads Styxy's allocations and brings both sides together.
    fn reconcile(&mut self, sh: &Shared) {
        let now = now_ms();
        let every = if self.active(now) { self.client.cfg.refresh_active } else { self.client.cfg.refresh_idle };
        self.next_refresh_ms = now + every.as_millis() as u64;
        let theirs = match self.client.call("GET", "/allocations", None) {
            Ok(r) if r.status == 200 => match r.json::<AllocationsReply>() {
                Ok(v) => v.allocations,
                Err(_) => return,
            },
            _ => {
                self.next_refresh_ms = now + 2_000;
                return;
            }
        };
        *self.client.count.lock() = Some(theirs.len() as u64);
        {
            let mut h = self.client.up.health.lock();
            h.last_refresh_ms = Some(now);
            h.view_confirmed_ms = now;
        }
        let todo = sh.state.lock().reconcile(&theirs, now, self.reassert_after(), &self.client.cfg.agent);
        self.carry_out(sh, todo);
        sh.persist();
    }

    /// Allocates and re-asserts what [`plan`] found, until Styxy fails or the budget ends.
    fn carry_out(&mut self, sh: &Shared, todo: Vec<Todo>) {
        for t in todo {
            let (port, old) = match t {
                Todo::Allocate(p) => (p, None),
                Todo::Reassert(p, lock) => (p, Some(lock)),
            };
            if let Some(old) = old {
                if !self.client.release(&old) {
                    break;
                }
                sh.state.lock().unmirror(port);
            }
            let Some(a) = sh.state.lock().allocation(port).cloned() else { continue };
            let answer = self.client.allocate(&a);
            if matches!(answer, StyxyAnswer::Failed) {
                self.next_refresh_ms = now_ms() + 2_000;
                break;
            }
            self.apply_late(sh, port, answer);
        }
    }

    fn reassert_after(&self) -> u64 {
        self.client.cfg.expiry.as_millis() as u64 * 3 / 5
    }
}

impl Client {
    /// Releases the locks of freed allocations every tick, until `stop`.
    fn releaser(&self, stop: &std::sync::atomic::AtomicBool) {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(TICK);
            let Some(sh) = self.shared.upgrade() else { return };
            self.release_freed(&sh);
        }
    }

    /// One request to Styxy, within our budget; notes reachability, 401 and 429.
    fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<http::Response, Failure> {
        self.call_within(method, path, body, CALL)
    }

    fn call_within(&self, method: &str, path: &str, body: Option<&[u8]>, t: Timeouts) -> Result<http::Response, Failure> {
        let now = now_ms();
        let endpoint = self.endpoint.lock().clone();
        // while Styxy is not reached, who listens is looked at before anything is tried: a
        // Styxy that is not there costs no budget, and another user's listener no handshake
        let reached = self.up.health.lock().reachable;
        if !reached {
            if let Err(why) = trusted(&endpoint, self.cfg.named) {
                self.gone(why.clone().unwrap_or_else(|| "nothing listens there".into()), Silent::Gone);
                self.up.health.lock().untrusted = why;
                return Err(Failure::Skipped);
            }
        }
        if path != "/status" && !self.budget.lock().take(self.cfg.per_minute, now) {
            return Err(Failure::Skipped);
        }
        let res = self.http.call(&endpoint, method, path, body, t);
        let mut h = self.up.health.lock();
        match res {
            Err(e) => {
                drop(h);
                let state = match e {
                    http::Error::Timeout => Silent::Busy,
                    http::Error::Unreachable(_) => Silent::Gone,
                    http::Error::Protocol(_) => Silent::Garbled,
                };
                self.gone(e.to_string(), state);
                Err(Failure::Failed)
            }
            Ok(r) => {
                h.reachable = true;
                h.busy = false;
                h.busy_since_ms = None;
                h.refused = r.status == 401;
                if h.refused {
                    // the token may have changed (Styxy writes a new one when its file is bad)
                    *self.endpoint.lock() = endpoint.with_token(discovery::styxy_token());
                }
                if r.status == 429 {
                    let secs = r.retry_after.unwrap_or(60).max(1);
                    h.blocked_until_ms = now + secs * 1000;
                    self.budget.lock().blocked_until_ms = h.blocked_until_ms;
                    h.last_429_ms = Some(now);
                }
                if r.status >= 400 {
                    h.last_error = Some(format!("{method} {path}: HTTP {} {}", r.status, error_text(&r)));
                    h.last_error_ms = Some(now);
                }
                Ok(r)
            }
        }
    }

    /// Styxy did not answer (see [`Silent`]). A gone Styxy (or one silent for
    /// [`BUSY_GONE_MS`]) holds nothing for anyone (a restart forgets everything): its last
    /// list no longer keeps ports from being granted.
    fn gone(&self, why: String, how: Silent) {
        let now = now_ms();
        let mut h = self.up.health.lock();
        h.reachable = false;
        h.busy = how == Silent::Busy;
        h.busy_since_ms = if h.busy { h.busy_since_ms.or(Some(now)) } else { None };
        let silent_too_long = h.busy_since_ms.is_some_and(|t| now.saturating_sub(t) > BUSY_GONE_MS);
        h.view_confirmed_ms = 0;
        h.last_error = Some(why);
        h.last_error_ms = Some(now);
        drop(h);
        if how == Silent::Gone || silent_too_long {
            *self.count.lock() = None;
            if let Some(sh) = self.shared.upgrade() {
                sh.state.lock().styxy_forgot();
            }
        }
    }

    fn allocate(&self, a: &Allocation) -> StyxyAnswer {
        let Ok(body) = serde_json::to_vec(&a.request()) else { return StyxyAnswer::Failed };
        let asked = std::time::Instant::now();
        let Ok(r) = self.call("POST", "/allocate", Some(&body)) else { return StyxyAnswer::Failed };
        if let Some(sh) = self.shared.upgrade() {
            sh.metrics.observe_styxy(asked.elapsed());
        }
        let reply = r.json::<AllocateReply>().ok().filter(|_| r.status == 200);
        match reply.as_ref().and_then(|g| g.port_and_lock().map(|(p, l)| (p, l.map(str::to_string), g.existing == Some(true)))) {
            Some((port, Some(lock_id), existing)) => {
                if !existing {
                    let mut count = self.count.lock();
                    *count = count.map(|c| c + 1);
                }
                StyxyAnswer::Allocated { port, lock_id }
            }
            _ => StyxyAnswer::Failed,
        }
    }

    /// `DELETE /allocate/:lock`. Styxy's fresh-install quirk answers 400 ENOENT although it
    /// released, and "not found" means it forgot the lock already: both count as released.
    fn release(&self, lock_id: &str) -> bool {
        let Ok(r) = self.call("DELETE", &format!("/allocate/{lock_id}"), None) else { return false };
        let text = error_text(&r);
        let released = r.status == 200 || (r.status == 400 && text.contains("ENOENT"));
        if released {
            let mut count = self.count.lock();
            *count = count.map(|c| c.saturating_sub(1));
        }
        released || (r.status == 400 && text.contains("not found"))
    }

    fn release_freed(&self, sh: &Shared) {
        let todo: Vec<String> = sh.state.lock().releases_pending().to_vec();
        let mut done = Vec::new();
        for lock in todo {
            if !self.release(&lock) {
                break; // unreachable or over budget: the rest waits for the next tick
            }
            done.push(lock);
        }
        if !done.is_empty() {
            sh.state.lock().released(&done);
            sh.persist();
        }
    }
}

fn error_text(r: &http::Response) -> String {
    r.json::<api::ErrorReply>().map(|e| e.error).unwrap_or_else(|_| String::from_utf8_lossy(&r.body).chars().take(200).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Os, Owner};
    use styxy_preload_common::api::AllocateRequest;
    use styxy_preload_common::policy::Policy;

    fn state_with(session: &str, port: u16) -> State {
        let os = Os { in_use: |_| false, styxy_sees: |_| false, sockets: |_, _| Some(vec![]) };
        let mut st = State::new(Policy::default(), None, 60_000).with_os(os);
        let asked = AllocateRequest { instance_id: Some(session.into()), ..AllocateRequest::for_port("dev", port) };
        let req = Claim::new(asked, Owner::of(std::process::id()));
        assert_eq!(st.allocate(&req, 0).unwrap().port, port);
        st
    }

    fn info(port: u16, lock: &str, instance: &str, agent: &str) -> api::AllocationInfo {
        api::AllocationInfo {
            port,
            lock_id: lock.into(),
            service_type: "dev".into(),
            instance_id: Some(instance.into()),
            user_agent: Some(agent.into()),
            ..Default::default()
        }
    }

    #[test]
    fn an_answer_outside_the_types_range_never_moves_a_grant() {
        let mut st = state_with("s", 3000);
        let answer = StyxyAnswer::Allocated { port: 45123, lock_id: "l1".into() };
        assert_eq!(apply(&mut st, 3000, answer, true), None);
        assert!(st.allocation(3000).is_some() && st.allocation(45123).is_none());
        assert_eq!(st.releases_pending(), ["l1"], "given back");
        assert_eq!(st.allocation(3000).unwrap().upstream, Standing::Pending, "no conflict without Styxy's list saying whose 3000 is");
        // a late answer of another port of the type (the server died meanwhile, say): no conflict either
        let late = StyxyAnswer::Allocated { port: 3006, lock_id: "l2".into() };
        assert_eq!(apply(&mut st, 3000, late, false), None);
        assert_eq!(st.allocation(3000).unwrap().upstream, Standing::Pending);
        assert_eq!(st.releases_pending(), ["l1", "l2"]);
    }

    #[test]
    fn styxys_allocations_under_our_name_are_adopted_or_released_never_someone_elses() {
        let mut st = state_with("s", 3000);
        let theirs = [
            info(3000, "late", "s", "us"),      // an answer that came too late: adopted
            info(3002, "stray", "s", "us"),     // an allocation of ours with no allocation here: released
            info(3005, "other", "x", "curl/8"), // another client's
        ];
        let todo = st.reconcile(&theirs, 10_000, 1_000_000, "us");
        assert!(todo.is_empty());
        assert_eq!(st.allocation(3000).unwrap().upstream.lock_id(), Some("late"));
        assert_eq!(st.releases_pending(), ["stray"]);
        assert_eq!(st.held_by_others(), 1, "3005 is another client's");
    }
}

#[cfg(test)]
mod worker_tests {
    //! The worker against a scripted Styxy: an HTTP server on a loopback port that
    //! answers each request with a canned answer in Styxy's shapes (docs/STYXY.md) and
    //! keeps what it was asked. The worker's steps run here, one after the other, as its
    //! thread would run them: nothing waits on a clock.
    use std::net::SocketAddr;
    use std::path::PathBuf;

    use axum::response::IntoResponse;
    use serde_json::{json, Value};
    use styxy_preload_common::api::AllocateRequest;

    use super::*;
    use crate::state::{Os, Owner};

    /// One canned answer: to the first request with this method and path prefix.
    #[derive(Clone)]
    struct Canned {
        method: &'static str,
        path: &'static str,
        status: u16,
        retry_after: Option<u64>,
        body: Value,
    }

    fn canned(method: &'static str, path: &'static str, status: u16, body: Value) -> Canned {
        Canned { method, path, status, retry_after: None, body }
    }

    /// What the scripted Styxy was asked.
    #[derive(Debug, Clone)]
    struct Asked {
        method: String,
        path: String,
        agent: String,
        auth: String,
        body: Value,
    }

    struct Styxy {
        addr: SocketAddr,
        asked: Arc<Mutex<Vec<Asked>>>,
        stop: Option<oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Styxy {
        fn start(script: Vec<Canned>) -> Styxy {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let asked: Arc<Mutex<Vec<Asked>>> = Arc::default();
            let (stop, stopped) = oneshot::channel::<()>();
            let log = asked.clone();
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    let app = axum::Router::new().fallback(move |req: axum::extract::Request| answer(req, script.clone(), log.clone()));
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    let stopped = async {
                        let _ = stopped.await;
                    };
                    axum::serve(listener, app).with_graceful_shutdown(stopped).await.unwrap();
                });
            });
            Styxy { addr, asked, stop: Some(stop), thread: Some(thread) }
        }

        fn asked(&self) -> Vec<Asked> {
            self.asked.lock().clone()
        }
    }

    impl Drop for Styxy {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    async fn answer(req: axum::extract::Request, script: Vec<Canned>, log: Arc<Mutex<Vec<Asked>>>) -> axum::response::Response {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        log.lock().push(Asked {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            agent: header("user-agent"),
            auth: header("authorization"),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
        let found = script.iter().find(|c| c.method == parts.method.as_str() && parts.uri.path().starts_with(c.path));
        let Some(c) = found else { return axum::http::StatusCode::NOT_FOUND.into_response() };
        let mut r = (axum::http::StatusCode::from_u16(c.status).unwrap(), axum::Json(c.body.clone())).into_response();
        if let Some(secs) = c.retry_after {
            r.headers_mut().insert("retry-after", secs.into());
        }
        r
    }

    /// The daemon's state, with one pending allocation of port 3000 for session `s`,
    /// and a worker for the Styxy at `addr`.
    struct Daemon {
        dir: PathBuf,
        sh: Arc<Shared>,
        up: Arc<Upstream>,
        worker: Worker,
    }

    const AGENT: &str = "styxy-preload-daemon (test)";

    impl Daemon {
        fn new(name: &str, addr: SocketAddr) -> Daemon {
            Daemon::with(name, addr, true)
        }

        /// As [`Daemon::new`], with a Styxy the user `named` or one found by its port.
        fn with(name: &str, addr: SocketAddr, named: bool) -> Daemon {
            let dir = std::env::temp_dir().join(format!("styxy-upstream-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let os = Os { in_use: |_| false, styxy_sees: |_| false, sockets: |_, _| Some(vec![]) };
            let sh = Shared::for_tests(os, dir.join("daemon-journal.jsonl"));
            let mut cfg = Config::new(Endpoint::Tcp { addr, token: Some("secret".into()) });
            cfg.named = named;
            cfg.agent = AGENT.into();
            let (jobs, _) = mpsc::channel();
            let up = Arc::new(Upstream { jobs: Mutex::new(jobs), health: Mutex::new(Health::default()) });
            let _ = sh.upstream.set(up.clone());
            let worker = Worker::new(cfg, Arc::downgrade(&sh), up.clone());
            let d = Daemon { dir, sh, up, worker };
            d.grant("s", 3000);
            d
        }

        fn grant(&self, session: &str, port: u16) {
            let asked = AllocateRequest { instance_id: Some(session.into()), ..AllocateRequest::for_port("dev", port) };
            let claim = Claim::new(asked, Owner::of(std::process::id()));
            assert_eq!(self.sh.state.lock().allocate(&claim, now_ms()).unwrap().port, port);
        }

        /// The grant path's mirror of `port`, answered in time: the worker asks Styxy,
        /// the answer is applied as `mirror_grant` applies it. The port to grant instead.
        fn mirror_in_time(&mut self, port: u16) -> (StyxyAnswer, Option<u16>) {
            let (tx, mut rx) = oneshot::channel();
            self.worker.mirror(port, tx);
            let answer = rx.try_recv().expect("the worker answered");
            (answer.clone(), apply(&mut self.sh.state.lock(), port, answer, true))
        }

        fn standing(&self, port: u16) -> Option<Standing> {
            self.sh.state.lock().allocation(port).map(|a| a.upstream.clone())
        }
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn granted(port: u16, lock: &str) -> Value {
        json!({"success": true, "port": port, "lock_id": lock, "message": format!("Port {port} allocated for dev service")})
    }

    #[test]
    fn a_grant_is_mirrored_under_styxys_lock() {
        let styxy = Styxy::start(vec![canned("POST", "/allocate", 200, granted(3000, "lock-1"))]);
        let mut d = Daemon::new("mirrored", styxy.addr);
        let (_, moved) = d.mirror_in_time(3000);
        assert_eq!(moved, None);
        assert_eq!(d.standing(3000).and_then(|s| s.lock_id().map(str::to_string)).as_deref(), Some("lock-1"));
        let asked = styxy.asked();
        assert_eq!(asked.len(), 1, "{asked:?}");
        let a = &asked[0];
        assert_eq!((a.method.as_str(), a.path.as_str(), a.agent.as_str(), a.auth.as_str()), ("POST", "/allocate", AGENT, "Bearer secret"));
        assert_eq!(
            (a.body["service_type"].as_str(), a.body["preferred_port"].as_u64(), a.body["instance_id"].as_str()),
            (Some("dev"), Some(3000), Some("s"))
        );
        assert!(d.up.health.lock().reachable && d.up.usable());
    }

    #[test]
    fn styxys_other_port_is_granted_in_time_and_given_back_when_late() {
        let styxy = Styxy::start(vec![
            canned("POST", "/allocate", 200, granted(3005, "lock-2")),
            canned("GET", "/allocations", 200, json!({"allocations": []})),
        ]);
        let mut d = Daemon::new("other-port", styxy.addr);
        // in time: Styxy's choice (a port of the type, free here) is the grant
        let (_, moved) = d.mirror_in_time(3000);
        assert_eq!(moved, Some(3005));
        assert_eq!(d.standing(3000), None);
        assert_eq!(d.standing(3005).and_then(|s| s.lock_id().map(str::to_string)).as_deref(), Some("lock-2"));
        // late (the client has its answer): the grant stays, Styxy's lock goes back
        d.grant("t", 3001);
        let (tx, rx) = oneshot::channel();
        drop(rx); // nobody waits any more
        d.worker.mirror(3001, tx);
        assert_eq!(d.standing(3001), Some(Standing::Pending));
        assert_eq!(d.sh.state.lock().releases_pending(), ["lock-2"]);
    }

    #[test]
    fn a_429_blocks_every_request_until_retry_after() {
        let busy = json!({"success": false, "error": "Too many requests"});
        let styxy = Styxy::start(vec![Canned { retry_after: Some(30), ..canned("POST", "/allocate", 429, busy) }]);
        let mut d = Daemon::new("429", styxy.addr);
        let before = now_ms();
        let (answer, _) = d.mirror_in_time(3000);
        assert!(matches!(answer, StyxyAnswer::Failed));
        assert_eq!(d.standing(3000), Some(Standing::Pending), "to mirror later");
        let h = d.up.health.lock().clone();
        assert!(h.blocked_until_ms >= before + 30_000 && h.last_429_ms.is_some(), "{h:?}");
        assert!(!d.up.usable(), "grants do not wait for a Styxy that said to wait");
        // the worker's own next request is not even sent
        let a = d.sh.state.lock().allocation(3000).cloned().unwrap();
        assert!(matches!(d.worker.client.allocate(&a), StyxyAnswer::Failed));
        assert_eq!(styxy.asked().len(), 1);
    }

    #[test]
    fn a_401_is_noted_and_nothing_is_mirrored() {
        let refused = json!({"success": false, "error": "Invalid API key"});
        let styxy = Styxy::start(vec![canned("POST", "/allocate", 401, refused)]);
        let mut d = Daemon::new("401", styxy.addr);
        let (answer, _) = d.mirror_in_time(3000);
        assert!(matches!(answer, StyxyAnswer::Failed));
        assert_eq!(d.standing(3000), Some(Standing::Pending));
        let h = d.up.health.lock().clone();
        assert!(h.refused && h.last_error.as_deref().is_some_and(|e| e.contains("401")), "{h:?}");
        assert!(!d.up.usable());
    }

    /// A daemon whose Styxy is found by its port (not named), where nothing listens.
    fn unnamed_gone(name: &str) -> Daemon {
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        Daemon::with(name, addr, false)
    }

    #[test]
    fn a_styxy_that_is_not_there_costs_no_budget_and_is_not_called_untrusted() {
        let d = unnamed_gone("gone-budget");
        d.up.health.lock().untrusted = Some("127.0.0.1:9876 is listened on by uid 1234".into());
        for _ in 0..100 {
            let _ = d.worker.client.release("lock");
        }
        assert_eq!(d.worker.client.budget.lock().used, 0, "budget spent on a Styxy that is not there");
        let h = d.up.health.lock().clone();
        assert_eq!((h.untrusted, h.reachable), (None, false), "{:?}", h.last_error);
    }

    #[test]
    fn an_unreachable_styxy_holds_nothing_and_grants_go_on_alone() {
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone); // nothing listens there now
        let mut d = Daemon::new("unreachable", addr);
        // what Styxy's last list said it holds for others
        let theirs = api::AllocationInfo { port: 3005, lock_id: "x".into(), service_type: "dev".into(), ..Default::default() };
        d.sh.state.lock().reconcile(&[theirs], now_ms(), u64::MAX, AGENT);
        assert_eq!(d.sh.state.lock().held_by_others(), 1);
        let (answer, _) = d.mirror_in_time(3000);
        assert!(matches!(answer, StyxyAnswer::Failed));
        assert_eq!(d.standing(3000), Some(Standing::Pending));
        assert_eq!(d.sh.state.lock().held_by_others(), 0, "a Styxy that is gone holds nothing");
        let h = d.up.health.lock().clone();
        assert!(!h.reachable && !h.busy && h.last_error.is_some(), "{h:?}");
        assert!(!d.up.usable());
    }
}
