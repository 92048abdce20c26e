//! Styxy as the daemon's upstream (docs/ARCHITECTURE.md "One path"): the hooks ask only
//! this daemon, and the daemon keeps the user's Styxy told.
//!
//! - Every grant becomes an allocation in Styxy (the session as `instance_id`, the type,
//!   the client's cwd as `project_path`, `comm-port` as service name), asked with the
//!   granted port as `preferred_port`. When Styxy answers within [`GRANT_WAIT`] with
//!   another port (it holds ours for someone else), its choice wins if that port is free
//!   here; a later answer that differs is a `conflict`.
//! - Ports Styxy holds for other clients (refreshed from `GET /allocations` every few
//!   seconds while binds happen) are never granted ([`State::upstream_held`]).
//! - A freed allocation's Styxy lock is released within a second or two of the sweep
//!   that freed it; a live one is re-asserted before Styxy's expiry; one Styxy lost (a
//!   restart) is allocated again.
//! - Styxy allows 100 requests a minute for all local clients: the worker keeps to its
//!   own [`Budget`], honours `Retry-After`, and never makes a bind wait on Styxy beyond
//!   [`GRANT_WAIT`]: what it cannot do now it reconciles later.
//!
//! One worker thread does all the talking, with blocking HTTP (`client::http`); the
//! grant path only hands it a job and waits, bounded, on a oneshot channel.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use styxy_preload_common::api::{self, AllocateReply, AllocateRequest, AllocationsReply};
use styxy_preload_common::discovery;
use styxy_preload_common::eventlog::{self, Action, Event};
use styxy_preload_common::http::{self, Endpoint, Timeouts};
use tokio::sync::oneshot;

use crate::state::{Allocation, Standing, State};
use crate::{now_ms, Shared};

/// How long a grant waits for Styxy's answer before it is made locally.
pub const GRANT_WAIT: Duration = Duration::from_millis(100);
/// Styxy's own answers get this long (a DELETE right after an allocate takes ~1 s).
const CALL: Timeouts = Timeouts { connect: Duration::from_millis(300), total: Duration::from_secs(3), max_body: 8 << 20 };
/// The worker's heartbeat: releases and due refreshes are looked at this often.
const TICK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct Config {
    pub endpoint: Endpoint,
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
            expiry,
            per_minute: 80,
            refresh_active: Duration::from_secs(3).min(expiry / 10),
            refresh_idle: Duration::from_secs(30).min(expiry / 10),
        }
    }
}

/// What `status` shows of the upstream.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Health {
    pub url: String,
    pub reachable: bool,
    /// Styxy refused the token (401): nothing is mirrored until that is fixed.
    pub refused: bool,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
    pub last_429_ms: Option<u64>,
    /// No request until then (Styxy's `Retry-After`).
    #[serde(skip)]
    blocked_until_ms: u64,
    pub last_refresh_ms: Option<u64>,
}

/// The upstream's part of `GET /status`: its health, and how our allocations stand there.
pub fn report(sh: &Shared) -> Option<serde_json::Value> {
    let health = serde_json::to_value(&*sh.upstream.get()?.health.lock()).ok()?;
    let st = sh.state.lock();
    let count = |f: fn(&Standing) -> bool| st.allocs.values().filter(|a| f(&a.upstream)).count();
    let mut v = health;
    v["mirrored"] = count(|u| matches!(u, Standing::Mirrored { .. })).into();
    v["served"] = count(|u| *u == Standing::Served).into();
    v["conflicts"] = count(|u| *u == Standing::Conflict).into();
    v["pending"] = count(|u| *u == Standing::Pending).into();
    v["held_by_others"] = st.upstream_held.len().into();
    v["releases_pending"] = st.upstream_releases.len().into();
    Some(v)
}

/// Styxy's answer to one allocate, as the grant path and the worker apply it.
#[derive(Debug, Clone)]
pub enum Answer {
    Granted { port: u16, lock_id: String },
    Failed,
}

enum Job {
    /// Mirror the new allocation at this port; the answer goes back if still awaited.
    Mirror {
        port: u16,
        reply: oneshot::Sender<Answer>,
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
    pub fn start(cfg: Config, shared: std::sync::Weak<Shared>) -> std::io::Result<(Arc<Upstream>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let up =
            Arc::new(Upstream { jobs: Mutex::new(tx), health: Mutex::new(Health { url: cfg.endpoint.to_string(), ..Health::default() }) });
        let worker = Worker { cfg, shared, up: up.clone(), budget: Budget::default(), next_refresh_ms: 0, last_grant_ms: 0 };
        let handle = std::thread::Builder::new().name("upstream".into()).spawn(move || worker.run(rx))?;
        Ok((up, handle))
    }

    pub fn stop(&self) {
        let _ = self.jobs.lock().send(Job::Stop);
    }

    /// Whether a grant may wait for Styxy now: it answered last time (or was never
    /// tried yet) and is not refusing us or rate limiting.
    pub(crate) fn usable(&self) -> bool {
        let h = self.health.lock();
        (h.reachable || h.last_error_ms.is_none()) && !h.refused && now_ms() >= h.blocked_until_ms
    }
}

/// Styxy's service types (`GET /config`), asked once at the daemon's start within
/// `wait` so that the first grants already know a user's own types.
pub fn config(cfg: &Config, wait: Duration) -> Option<serde_json::Value> {
    let t = Timeouts { connect: wait, total: wait, max_body: 1 << 20 };
    let r = http::call(&cfg.endpoint, "GET", "/config", None, t).ok().filter(|r| r.status == 200)?;
    r.json().ok()
}

/// Mirrors the new allocation at `port` in Styxy, waiting at most [`GRANT_WAIT`]. Returns
/// the port to grant instead when Styxy chose another one that is free here.
pub async fn mirror_grant(sh: &Shared, port: u16) -> Option<u16> {
    let up = sh.upstream.get()?;
    if !up.usable() {
        return None; // granted locally; the worker reconciles when it can
    }
    let (tx, mut rx) = oneshot::channel();
    up.jobs.lock().send(Job::Mirror { port, reply: tx }).ok()?;
    let answer = match tokio::time::timeout(GRANT_WAIT, &mut rx).await {
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

/// Records Styxy's answer for the allocation at `port`. `in_time`: the client has not
/// been answered yet, so Styxy's other choice may replace ours. Returns the new port then.
fn apply(st: &mut State, port: u16, answer: Answer, in_time: bool) -> Option<u16> {
    let Answer::Granted { port: theirs, lock_id } = answer else {
        return None;
    };
    let now = now_ms();
    let mirrored = Standing::Mirrored { lock_id: lock_id.clone(), asserted_at_ms: now };
    let waiting = st.allocs.get(&port).is_some_and(|a| a.upstream.lock_id().is_none());
    if !waiting {
        st.upstream_releases.push(lock_id); // freed meanwhile, or mirrored already
        return None;
    }
    if theirs == port {
        if let Some(a) = st.allocs.get_mut(&port) {
            a.upstream = mirrored;
        }
        return None;
    }
    if in_time && st.free(theirs, now) && st.relocate(port, theirs) {
        if let Some(a) = st.allocs.get_mut(&theirs) {
            a.upstream = mirrored;
        }
        return Some(theirs);
    }
    // not the port the client has: give it back, and say why Styxy would not grant ours
    st.upstream_releases.push(lock_id);
    let served = !st.upstream_held.contains(&port) && (st.port_in_use)(port);
    if !served {
        st.upstream_held.insert(port);
    }
    if let Some(a) = st.allocs.get_mut(&port) {
        if served {
            a.upstream = Standing::Served;
        } else {
            mark_conflict(a, &format!("Styxy holds {port} for another client (it offered {theirs})"));
        }
    }
    None
}

/// Marks `a` as conflicting with Styxy and logs a `conflict` event, once.
fn mark_conflict(a: &mut Allocation, why: &str) {
    if a.upstream == Standing::Conflict {
        return;
    }
    a.upstream = Standing::Conflict;
    let ev = Event {
        ts: now_ms(),
        session: a.session.clone(),
        pid: a.owners.first().map(|o| o.pid).unwrap_or(0),
        comm: a.comm.clone().unwrap_or_default(),
        call: "upstream".into(),
        requested_port: a.requested_port.unwrap_or(a.port),
        port: a.port,
        family: "ipv4".into(),
        service_type: Some(a.service_type.clone()),
        action: Action::Conflict,
        reason: Some(why.to_string()),
        latency_us: 0,
        backend: Some("styxy".into()),
        retries: 0,
    };
    let _ = eventlog::Log::own().append(&ev);
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

/// What a reconciliation found to do for one of our allocations.
enum Todo {
    /// Not in Styxy (never mirrored, or Styxy lost it): allocate it.
    Allocate(u16),
    /// In Styxy, but close to its expiry: release and allocate again.
    Reassert(u16, String),
}

struct Worker {
    cfg: Config,
    shared: std::sync::Weak<Shared>,
    up: Arc<Upstream>,
    budget: Budget,
    next_refresh_ms: u64,
    last_grant_ms: u64,
}

enum Failure {
    /// Not counted, nothing happened on Styxy's side (unreachable, over our budget).
    Skipped,
    /// Styxy answered with an error, or the call failed.
    Failed,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut first = true;
        loop {
            // the first round runs at once: Styxy's holdings are known before most binds
            match if first { Err(mpsc::RecvTimeoutError::Timeout) } else { rx.recv_timeout(TICK) } {
                Ok(Job::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(Job::Mirror { port, reply }) => self.mirror(port, reply),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            first = false;
            let Some(sh) = self.shared.upgrade() else { break };
            self.release_freed(&sh);
            if now_ms() >= self.next_refresh_ms {
                self.reconcile(&sh);
            }
        }
    }

    /// One request to Styxy, within our budget; notes reachability, 401 and 429.
    fn call(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Result<http::Response, Failure> {
        let now = now_ms();
        if path != "/status" && !self.budget.take(self.cfg.per_minute, now) {
            return Err(Failure::Skipped);
        }
        let res = http::call(&self.cfg.endpoint, method, path, body, CALL);
        let mut h = self.up.health.lock();
        match res {
            Err(e) => {
                h.reachable = false;
                h.last_error = Some(e.to_string());
                h.last_error_ms = Some(now);
                Err(Failure::Failed)
            }
            Ok(r) => {
                h.reachable = true;
                h.refused = r.status == 401;
                if h.refused {
                    // the token may have changed (Styxy writes a new one when its file is bad)
                    self.cfg.endpoint = self.cfg.endpoint.clone().with_token(discovery::styxy_token());
                }
                if r.status == 429 {
                    let secs = r.retry_after.unwrap_or(60).max(1);
                    self.budget.blocked_until_ms = now + secs * 1000;
                    h.blocked_until_ms = self.budget.blocked_until_ms;
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

    fn allocate(&mut self, a: &Allocation) -> Answer {
        let req = AllocateRequest {
            service_type: a.service_type.clone(),
            service_name: Some(api::service_name(a.comm.as_deref().unwrap_or("process"), a.requested_port.unwrap_or(a.port))),
            preferred_port: Some(a.port),
            instance_id: a.session.clone(),
            project_path: a.project_path.clone(),
            pid: a.owners.first().map(|o| o.pid),
            requested_port: a.requested_port,
            comm: a.comm.clone(),
            ..Default::default()
        };
        let Ok(body) = serde_json::to_vec(&req) else { return Answer::Failed };
        match self.call("POST", "/allocate", Some(&body)) {
            Ok(r) if r.status == 200 => {
                match r.json::<AllocateReply>().ok().and_then(|g| g.granted().map(|(p, l)| (p, l.map(str::to_string)))) {
                    Some((port, Some(lock_id))) => Answer::Granted { port, lock_id },
                    _ => Answer::Failed,
                }
            }
            _ => Answer::Failed,
        }
    }

    /// `DELETE /allocate/:lock`. Styxy's fresh-install quirk answers 400 ENOENT although it
    /// released, and "not found" means it forgot the lock already: both count as released.
    fn release(&mut self, lock_id: &str) -> bool {
        match self.call("DELETE", &format!("/allocate/{lock_id}"), None) {
            Ok(r) => r.status == 200 || (r.status == 400 && ["ENOENT", "not found"].iter().any(|k| error_text(&r).contains(k))),
            Err(_) => false,
        }
    }

    fn mirror(&mut self, port: u16, reply: oneshot::Sender<Answer>) {
        let Some(sh) = self.shared.upgrade() else { return };
        self.last_grant_ms = now_ms();
        self.next_refresh_ms = self.next_refresh_ms.min(now_ms() + self.cfg.refresh_active.as_millis() as u64);
        let Some(a) = sh.state.lock().allocs.get(&port).filter(|a| a.upstream == Standing::Pending).cloned() else { return };
        let answer = self.allocate(&a);
        if let Err(late) = reply.send(answer) {
            apply(&mut sh.state.lock(), port, late, false);
            sh.persist();
        }
    }

    fn release_freed(&mut self, sh: &Shared) {
        let todo: Vec<String> = sh.state.lock().upstream_releases.clone();
        let mut done = Vec::new();
        for lock in todo {
            if !self.release(&lock) {
                break; // unreachable or over budget: the rest waits for the next tick
            }
            done.push(lock);
        }
        if !done.is_empty() {
            sh.state.lock().upstream_releases.retain(|l| !done.contains(l));
            sh.persist();
        }
    }

    /// Reads Styxy's allocations and brings both sides together.
    fn reconcile(&mut self, sh: &Shared) {
        let now = now_ms();
        let active = now.saturating_sub(self.last_grant_ms) < 60_000;
        let every = if active { self.cfg.refresh_active } else { self.cfg.refresh_idle };
        self.next_refresh_ms = now + every.as_millis() as u64;
        let reachable = self.up.health.lock().reachable;
        if !reachable {
            // /status is neither counted nor authenticated: probe until Styxy answers
            self.next_refresh_ms = now + 2_000;
            if !matches!(self.call("GET", "/status", None), Ok(r) if r.status == 200) {
                return;
            }
            // Styxy is back (or there for the first time): its service types may be the user's own
            if let Ok(r) = self.call("GET", "/config", None) {
                if let Ok(cfg) = r.json::<serde_json::Value>() {
                    let mut st = sh.state.lock();
                    if st.policy.apply_config(&cfg) {
                        crate::publish_policy(&st.policy);
                    }
                }
            }
        }
        let theirs = match self.call("GET", "/allocations", None) {
            Ok(r) if r.status == 200 => match r.json::<AllocationsReply>() {
                Ok(v) => v.allocations,
                Err(_) => return,
            },
            _ => {
                self.next_refresh_ms = now + 2_000;
                return;
            }
        };
        self.up.health.lock().last_refresh_ms = Some(now);
        let todo = plan(&mut sh.state.lock(), &theirs, now, self.reassert_after());
        for t in todo {
            let (port, old) = match t {
                Todo::Allocate(p) => (p, None),
                Todo::Reassert(p, lock) => (p, Some(lock)),
            };
            if let Some(old) = old {
                if !self.release(&old) {
                    break;
                }
                if let Some(a) = sh.state.lock().allocs.get_mut(&port) {
                    a.upstream = Standing::Pending;
                }
            }
            let Some(a) = sh.state.lock().allocs.get(&port).cloned() else { continue };
            let answer = self.allocate(&a);
            let failed = matches!(answer, Answer::Failed);
            apply(&mut sh.state.lock(), port, answer, false);
            if failed {
                self.next_refresh_ms = now_ms() + 2_000;
                break;
            }
        }
        sh.persist();
    }

    fn reassert_after(&self) -> u64 {
        self.cfg.expiry.as_millis() as u64 * 3 / 5
    }
}

/// Compares Styxy's allocations with ours: notes the ports Styxy holds for others, marks
/// conflicts, and lists what to allocate or re-assert.
fn plan(st: &mut State, theirs: &[api::AllocationInfo], now: u64, reassert_after: u64) -> Vec<Todo> {
    let ours: BTreeSet<&str> =
        st.allocs.values().filter_map(|a| a.upstream.lock_id()).chain(st.upstream_releases.iter().map(String::as_str)).collect();
    let by_lock: BTreeMap<&str, u16> = theirs.iter().map(|t| (t.lock_id.as_str(), t.port)).collect();
    let held: BTreeSet<u16> = theirs.iter().filter(|t| !ours.contains(t.lock_id.as_str())).map(|t| t.port).collect();
    let in_use = st.port_in_use;
    let mut todo = Vec::new();
    for a in st.allocs.values_mut() {
        match &a.upstream {
            Standing::Mirrored { lock_id, asserted_at_ms } if by_lock.get(lock_id.as_str()) == Some(&a.port) => {
                if now.saturating_sub(*asserted_at_ms) >= reassert_after {
                    todo.push(Todo::Reassert(a.port, lock_id.clone()));
                }
            }
            _ if held.contains(&a.port) => mark_conflict(a, &format!("Styxy holds {} for another client", a.port)),
            // Styxy's test-bind refuses it while it is served, and protects it meanwhile
            Standing::Served if in_use(a.port) => {}
            // never asked, lost by Styxy (a restart, its expiry), or free again: register it
            _ => {
                a.upstream = Standing::Pending;
                todo.push(Todo::Allocate(a.port));
            }
        }
    }
    st.upstream_held = held;
    todo
}

fn error_text(r: &http::Response) -> String {
    r.json::<api::ErrorReply>().map(|e| e.error).unwrap_or_else(|_| String::from_utf8_lossy(&r.body).chars().take(200).collect())
}
