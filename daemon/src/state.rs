//! Allocation state: who holds which port, for which session and requested port, and
//! the rules for granting one. Pure bookkeeping under the daemon's lock; the OS is
//! consulted through `procinfo` (processes) and `portcheck` (ports) only.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use styxy_preload_common::api::{AllocateRequest, AllocationInfo, Holder};
use styxy_preload_common::eventlog::{self, Action, Event};
use styxy_preload_common::policy::{self, Decision, Policy, ServiceType};
use styxy_preload_common::portmap::PortMap;
use styxy_preload_common::{procinfo, session};

use crate::portcheck::{self, PortSocket, Which};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    /// Start time in clock ticks since boot, against pid reuse (0: unknown).
    pub start: u64,
}

impl Owner {
    pub fn of(pid: u32) -> Option<Owner> {
        procinfo::start_time(pid).map(|start| Owner { pid, start })
    }

    /// An owner known by pid only: its start time is read when it is recorded.
    pub fn pid(pid: u32) -> Owner {
        Owner { pid, start: 0 }
    }

    fn resolved(&self) -> Option<Owner> {
        if self.start != 0 {
            Some(self.clone())
        } else {
            Owner::of(self.pid)
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Allocation {
    pub lock_id: String,
    pub port: u16,
    pub service_type: String,
    pub service_name: String,
    pub session: Option<String>,
    pub project_path: Option<String>,
    pub requested_port: Option<u16>,
    pub comm: Option<String>,
    pub owners: Vec<Owner>,
    pub allocated_at_ms: u64,
    /// Its standing in the upstream Styxy, when the daemon has one.
    #[serde(default)]
    pub upstream: Standing,
    /// A grant for a bind in progress is confirmed by the client's `listen()` (or by its
    /// port being bound): one its client gave up on (a timeout) expires unconfirmed.
    #[serde(default = "confirmed_by_default")]
    pub confirmed: bool,
    /// Granted for a bind: it stands while a socket of an owner's (or of an owner's
    /// child's) holds its port, and is freed when that socket is gone. Other grants
    /// (an API client's, `exec --port`'s) stand while an owner lives.
    #[serde(default)]
    pub bind: bool,
}

fn confirmed_by_default() -> bool {
    true
}

/// How long a grant may stay unconfirmed while nothing binds its port.
pub const UNCONFIRMED_MS: u64 = 500;

/// An allocation's standing in the upstream Styxy (docs/ARCHITECTURE.md "One path").
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Standing {
    /// Not in Styxy: there is no upstream, or it has not been asked yet.
    #[default]
    Pending,
    /// Styxy holds it under this lock, (re)granted then: Styxy forgets every lock ~30 min
    /// after its allocate.
    Mirrored { lock_id: String, asserted_at_ms: u64 },
    /// Styxy will not register it because its test-bind of 127.0.0.1 sees the server on
    /// it; that same test-bind keeps Styxy from handing the port to anyone else.
    Served,
    /// Styxy holds it for another client.
    Conflict,
    /// A type of our own (`policy::local_type`): never sent to Styxy.
    Local,
}

impl Standing {
    pub fn lock_id(&self) -> Option<&str> {
        match self {
            Standing::Mirrored { lock_id, .. } => Some(lock_id),
            _ => None,
        }
    }
}

impl Allocation {
    /// The request that asks Styxy for this allocation: its port preferred, under its
    /// session, named after its process and the port that process asked for.
    pub fn request(&self) -> AllocateRequest {
        let comm = self.comm.as_deref().unwrap_or("process");
        AllocateRequest {
            service_name: Some(styxy_preload_common::api::service_name(comm, self.requested_port.unwrap_or(self.port))),
            instance_id: self.session.clone(),
            project_path: self.project_path.clone(),
            pid: self.owners.first().map(|o| o.pid),
            requested_port: self.requested_port,
            comm: self.comm.clone(),
            ..AllocateRequest::for_port(&self.service_type, self.port)
        }
    }

    /// Whether the allocation stands ([`Judged`]).
    fn live(&self, now_ms: u64, look: &Look) -> bool {
        self.judged(now_ms, look) != Judged::Gone
    }

    /// How the allocation stands (docs/ARCHITECTURE.md "The built-in daemon"). With no
    /// live owner: while a socket of the user's own holds the port (a server that outlived
    /// the process that asked for it: a daemon forked off); the sweep finds it
    /// [`Judged::Unheld`] when none does, as the kernel's list can miss a socket that
    /// starts listening while it is walked. A grant for a bind: while an
    /// owner's socket holds the port ([`Judged::Unheld`] when none does); unconfirmed and
    /// not yet bound, for [`UNCONFIRMED_MS`]. Any other grant: while an owner lives. A
    /// quick look (choosing a port to grant) takes a bind grant of a live owner as standing
    /// when it is confirmed or its port is listened on: the sweep looks at its sockets.
    fn judged(&self, now_ms: u64, look: &Look) -> Judged {
        let stands = |yes: bool| if yes { Judged::Stands } else { Judged::Gone };
        let alive: Vec<u32> = self.owners.iter().filter(|o| procinfo::alive(o.pid, o.start)).map(|o| o.pid).collect();
        let young = !self.confirmed && now_ms.saturating_sub(self.allocated_at_ms) <= UNCONFIRMED_MS;
        if alive.is_empty() {
            return match young || look.held_by_user(self.port) {
                true => Judged::Stands,
                false if look.close => Judged::Unheld,
                false => Judged::Gone,
            };
        }
        let quick = !look.close;
        // a quick look: a confirmed grant, or a port something listens on, stands until
        // the sweep looks closer
        if !self.bind || young || (quick && (self.confirmed || (look.os.in_use)(self.port))) {
            return Judged::Stands;
        }
        match look.held_by(self.port, &alive) {
            Some(true) => Judged::Stands,
            Some(false) => Judged::Unheld,
            // not to be told from here (another network namespace, no socket diagnostics):
            // as a bind was judged before, by its owners and the test bind
            None => stands(self.confirmed || (look.os.in_use)(self.port)),
        }
    }
}

/// How an allocation stands when it is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judged {
    Stands,
    /// Held by no socket it needs: freed when the sweep before found it so too
    /// ([`State::sweep_apply`]). A grant for a bind whose live owners hold no socket on
    /// its port: a probe closed its socket and the program binds the port again in a
    /// moment (get-port, then the server), and its shim binds what it kept without
    /// asking again, so the grant must still be there. One without a live owner that no
    /// socket of the user's holds: the kernel lists the sockets listening, then the ones
    /// bound and nothing more, and a socket that starts listening in between (a forked
    /// child's `listen` after its parent exited) is in neither list.
    Unheld,
    Gone,
}

/// What the daemon asks the OS about ports (fakes in tests).
#[derive(Clone, Copy)]
pub struct Os {
    /// Does a test bind of the port fail ([`portcheck::port_in_use`]).
    pub in_use: fn(u16) -> bool,
    /// Whether Styxy's own test-bind (127.0.0.1) would find the port taken.
    pub styxy_sees: fn(u16) -> bool,
    /// The TCP sockets on a port, or all of them, listening or in any state
    /// ([`portcheck::sockets`]).
    pub sockets: fn(Option<u16>, Which) -> Option<Vec<PortSocket>>,
}

impl Os {
    /// The machine's own answers.
    pub const REAL: Os = Os { in_use: portcheck::port_in_use, styxy_sees: portcheck::styxy_sees, sockets: portcheck::sockets };
}

/// How closely allocations are looked at: a quick look asks about one port when it must;
/// the sweep looks at every one against snapshots of the sockets, each taken once when
/// first needed. Either looks at the listening sockets first: they settle most grants (a
/// server listens), and only the rest need every socket, which costs the kernel a walk of
/// all its connections ([`Which`]).
pub struct Look {
    os: Os,
    /// The sweep's: the sockets are read once, not per port.
    close: bool,
    /// The sweep's snapshots (`None` in them: the kernel could not be asked).
    listening: std::cell::OnceCell<Option<Vec<PortSocket>>>,
    any: std::cell::OnceCell<Option<Vec<PortSocket>>>,
    /// Socket inodes of the processes looked at so far (a server holds several ports).
    inodes: std::cell::RefCell<std::collections::HashMap<u32, Vec<u64>>>,
}

impl Look {
    fn quick(os: Os) -> Look {
        Look { os, close: false, listening: Default::default(), any: Default::default(), inodes: Default::default() }
    }

    fn close(os: Os) -> Look {
        Look { close: true, ..Look::quick(os) }
    }

    /// Whether one of `pid`'s sockets is among `sockets`.
    fn has_one_of(&self, pid: u32, sockets: &[PortSocket]) -> bool {
        let mut cache = self.inodes.borrow_mut();
        let inodes = cache.entry(pid).or_insert_with(|| procinfo::socket_inodes(pid));
        inodes.iter().any(|i| sockets.iter().any(|s| s.inode == *i))
    }

    fn sockets_on(&self, port: u16, which: Which) -> Option<Vec<PortSocket>> {
        if !self.close {
            return (self.os.sockets)(Some(port), which);
        }
        let snapshot = if which == Which::Listening { &self.listening } else { &self.any };
        let all = snapshot.get_or_init(|| (self.os.sockets)(None, which)).as_ref()?;
        Some(all.iter().filter(|s| s.port == port).copied().collect())
    }

    /// A socket of `pids` or of their descendants holds `port`. `None` when it cannot be
    /// told: no socket diagnostics, or a process in another network namespace than the
    /// daemon's, whose sockets the daemon does not see.
    fn held_by(&self, port: u16, pids: &[u32]) -> Option<bool> {
        // an owner listening on it settles it at a glance
        if self.sockets_on(port, Which::Listening).is_some_and(|l| pids.iter().any(|p| self.has_one_of(*p, &l))) {
            return Some(true);
        }
        let sockets = self.sockets_on(port, Which::Any)?;
        if sockets.is_empty() && pids.iter().all(|p| same_netns(*p)) {
            return Some(false);
        }
        let mut unseen = false;
        let mut holds = |pid: u32| {
            unseen |= !same_netns(pid);
            self.has_one_of(pid, &sockets)
        };
        // the owners first; their descendants (workers that inherited the socket) only then
        if pids.iter().any(|p| holds(*p)) || family(pids).into_iter().skip(pids.len()).any(&mut holds) {
            return Some(true);
        }
        (!unseen).then_some(false)
    }

    /// A socket of the daemon's user (the user's own) holds `port`.
    fn held_by_user(&self, port: u16) -> bool {
        // SAFETY: geteuid(2) cannot fail.
        let me = unsafe { libc::geteuid() };
        let mine = |sockets: &Vec<PortSocket>| sockets.iter().any(|s| s.uid == me);
        if self.sockets_on(port, Which::Listening).as_ref().is_some_and(mine) {
            return true;
        }
        match self.sockets_on(port, Which::Any) {
            Some(sockets) => mine(&sockets),
            None => (self.os.in_use)(port),
        }
    }
}

/// `pids` and their descendants, at most 256 processes.
fn family(pids: &[u32]) -> Vec<u32> {
    let mut all = pids.to_vec();
    let mut i = 0;
    while i < all.len() && all.len() < 256 {
        let kids = procinfo::children(all[i]);
        all.extend(kids.into_iter().filter(|k| !all.contains(k)).collect::<Vec<_>>());
        i += 1;
    }
    all.truncate(256);
    all
}

/// Whether `pid` shares the daemon's network namespace (its sockets are the ones the
/// daemon's socket diagnostics list).
fn same_netns(pid: u32) -> bool {
    let mine = procinfo::netns(procinfo::SELF);
    mine.is_some() && procinfo::netns(pid) == mine
}

/// A sweep's view of the allocations, judged without the daemon's lock.
pub struct SweepPlan {
    allocs: Vec<Allocation>,
    os: Os,
}

/// What a sweep found: the allocations that no longer stand, those held by nothing they
/// need, and unconfirmed ones found bound (taken after all).
#[derive(Default)]
pub struct Verdicts {
    dead: Vec<Judging>,
    unheld: Vec<Judging>,
    confirmed: Vec<Judging>,
}

/// An allocation as a sweep judged it. Its verdict is carried out only on the same
/// allocation with the same owners: one a process became an owner of meanwhile (a
/// forked child's `listen`) was judged without it.
#[derive(Clone, PartialEq, Eq)]
struct Judging {
    port: u16,
    lock_id: String,
    owners: Vec<Owner>,
}

impl SweepPlan {
    /// Looks at every allocation closely, against snapshots of the sockets ([`Look`]).
    pub fn judge(self, now_ms: u64) -> Verdicts {
        let look = Look::close(self.os);
        let mut v = Verdicts::default();
        for a in self.allocs {
            let judged = a.judged(now_ms, &look);
            let seen = Judging { port: a.port, lock_id: a.lock_id, owners: a.owners };
            match judged {
                Judged::Gone => v.dead.push(seen),
                Judged::Unheld => v.unheld.push(seen),
                Judged::Stands if !a.confirmed && now_ms.saturating_sub(a.allocated_at_ms) > UNCONFIRMED_MS => v.confirmed.push(seen),
                Judged::Stands => {}
            }
        }
        v
    }
}

/// A session's last mapping, remembered for the grace period after it was freed.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Recent {
    pub session: String,
    pub requested: u16,
    pub port: u16,
    pub freed_at_ms: u64,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Snapshot {
    pub saved_at_ms: u64,
    pub allocations: Vec<Allocation>,
    pub recent: Vec<Recent>,
    /// Styxy locks still to release.
    #[serde(default)]
    pub upstream_releases: Vec<String>,
}

/// A service name for a request that gave none (Styxy's own).
pub const UNNAMED: &str = "unnamed-service";

/// A claim on a port: an allocate request as it comes over the wire (the one request
/// type, [`AllocateRequest`], checked by the server or made by `hook.sock`'s `KEEP`), who
/// will own the grant, and how strictly the preferred port is meant.
#[derive(Debug, Clone, Default)]
pub struct Claim {
    pub req: AllocateRequest,
    /// The caller, or the pid it named (checked by the server).
    pub owner: Option<Owner>,
    /// The preferred port or nothing: another port is not granted (`NotExactly`), and
    /// nothing changes (the shim's `KEEP`: one look at the port, not a dry run and then
    /// the grant).
    pub exactly: bool,
    /// The owner is recorded by pid, and its start time (and the request's project path)
    /// filled in after the answer ([`State::owner_read`]).
    pub owner_later: bool,
}

impl Claim {
    pub fn new(req: AllocateRequest, owner: Option<Owner>) -> Claim {
        Claim { req, owner, exactly: false, owner_later: false }
    }

    /// Its session: the instance id, but Styxy's `default` one, which is no session.
    pub fn session(&self) -> Option<&str> {
        self.req.instance_id.as_deref().filter(|s| *s != "default")
    }

    pub fn service_name(&self) -> &str {
        self.req.service_name.as_deref().unwrap_or(UNNAMED)
    }

    /// The port the client asked for: its requested port, else its preferred one.
    pub fn requested(&self) -> Option<u16> {
        self.req.requested_port.or(self.req.preferred_port)
    }
}

#[derive(Debug)]
pub struct Grant {
    pub port: u16,
    pub lock_id: String,
    /// The session already held this requested port (idempotent answer).
    pub existing: bool,
    /// Who holds the preferred port, when another port was granted.
    pub holder: Option<Holder>,
}

#[derive(Debug, PartialEq)]
pub enum AllocError {
    UnknownType(String),
    Exhausted {
        ty: String,
        range: (u16, u16),
        allocated: Vec<u16>,
    },
    /// `exactly` was asked, and the preferred port cannot be granted.
    NotExactly,
    /// A preferred or requested port the policy does not give this type (22, 9876, 1).
    NotOfType {
        port: u16,
        ty: String,
    },
    /// The session, or everyone together, holds as many ports as allowed.
    Quota {
        who: String,
        limit: usize,
    },
}

/// How many ports above the one asked for a remap tries first.
pub const NEAR: u16 = 9;

/// Ports one session may hold at once, and all sessions together.
pub const SESSION_QUOTA: usize = 256;
pub const TOTAL_QUOTA: usize = 4096;

/// The allocations and the rules that keep them. Its fields are its own: every change
/// goes through a method named for what happens (a grant, a confirmation, a release, a
/// sweep, Styxy's answer or list), which also publishes it in the port map and notes the
/// Styxy locks to give back; others read through the accessors.
pub struct State {
    allocs: BTreeMap<u16, Allocation>,
    recent: Vec<Recent>,
    policy: Policy,
    map: Option<Arc<PortMap>>,
    grace_ms: u64,
    os: Os,
    /// Ports the upstream Styxy holds for other clients, with Styxy's record of each:
    /// never granted here, but to the command Styxy's hook reserved one for.
    upstream_held: BTreeMap<u16, AllocationInfo>,
    /// Styxy locks of freed allocations, for the upstream worker to release.
    upstream_releases: Vec<String>,
    /// Grants the last sweep found [`Judged::Unheld`] (port → lock id).
    unheld: BTreeMap<u16, String>,
}

impl State {
    pub fn new(policy: Policy, map: Option<Arc<PortMap>>, grace_ms: u64) -> State {
        State {
            allocs: BTreeMap::new(),
            recent: Vec::new(),
            policy,
            map,
            grace_ms,
            os: Os::REAL,
            upstream_held: BTreeMap::new(),
            upstream_releases: Vec::new(),
            unheld: BTreeMap::new(),
        }
    }

    /// The same state asking `os` about ports instead of the machine (tests).
    pub fn with_os(self, os: Os) -> State {
        State { os, ..self }
    }

    fn os(&self) -> Os {
        self.os
    }

    /// The allocations, by port.
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocs.values()
    }

    pub fn allocation(&self, port: u16) -> Option<&Allocation> {
        self.allocs.get(&port)
    }

    /// How many allocations stand.
    pub fn len(&self) -> usize {
        self.allocs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.allocs.is_empty()
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The shared port map this state publishes to, when there is one.
    pub fn port_map(&self) -> Option<Arc<PortMap>> {
        self.map.clone()
    }

    /// Takes Styxy's service types (`GET /config`); whether the types changed.
    pub fn apply_config(&mut self, cfg: &serde_json::Value) -> bool {
        let before = self.policy.types.clone();
        self.policy.apply_config(cfg) && self.policy.types != before
    }

    /// Whether `pid` of `session` already owns the allocation at `port` (it binds again).
    pub fn owned_by(&self, port: u16, session: &str, pid: u32) -> bool {
        self.allocs.get(&port).is_some_and(|a| a.session.as_deref() == Some(session) && a.owners.iter().any(|o| o.pid == pid))
    }

    /// The grant `claim` asks for, made in the state (and the port map). The daemon
    /// grants through `Shared::grant` (`record.rs`), which journals, saves and counts it.
    pub(crate) fn allocate(&mut self, claim: &Claim, now_ms: u64) -> Result<Grant, AllocError> {
        let ty = self
            .policy
            .service_type(&claim.req.service_type)
            .cloned()
            .ok_or_else(|| AllocError::UnknownType(claim.req.service_type.clone()))?;
        if let Some(grant) = self.held_by_session(claim) {
            return grant;
        }
        self.check(claim, &ty)?;
        let port = self.choose(claim, &ty, now_ms)?;
        let holder = match claim.req.preferred_port {
            Some(p) if p != port => Some(self.holder_of(p)),
            _ => None,
        };
        if claim.exactly && claim.req.preferred_port != Some(port) {
            return Err(AllocError::NotExactly);
        }
        if claim.req.dry_run {
            return Ok(Grant { port, lock_id: uuid::Uuid::new_v4().to_string(), existing: false, holder });
        }
        Ok(self.insert(claim, &ty, port, holder, now_ms))
    }

    /// `port`, which the claim's process bound as its session's own for the port it asked
    /// (the shim read the port map: docs/ARCHITECTURE.md "Session stickiness"): the
    /// session's allocation there, or one made again when a sweep freed it meanwhile —
    /// the session's last mapping of that port, within the state's limits, no port Styxy
    /// reserved, and `runs` says the process still does. Else a grant of nothing
    /// (`existing` with no lock: the bind is only logged). `None` when another session's
    /// allocation holds the port (that session's next bind there fails and moves).
    pub(crate) fn adopt(&mut self, claim: &Claim, port: u16, now_ms: u64, runs: impl FnOnce() -> bool) -> Option<Grant> {
        let requested = claim.requested().unwrap_or(port);
        let holder = (requested != port).then(|| self.holder_of(requested));
        if let Some(a) = self.allocs.get(&port) {
            return (a.session.as_deref() == claim.session()).then(|| Grant { port, lock_id: a.lock_id.clone(), existing: true, holder });
        }
        let nothing = Grant { port, lock_id: String::new(), existing: true, holder: holder.clone() };
        let had = |r: &Recent| Some(r.session.as_str()) == claim.session() && r.requested == requested && r.port == port;
        let Some(ty) = self.policy.service_type(&claim.req.service_type).cloned() else { return Some(nothing) };
        if !self.recent.iter().any(had) || self.upstream_held.contains_key(&port) || self.check(claim, &ty).is_err() || !runs() {
            return Some(nothing);
        }
        Some(self.insert(claim, &ty, port, holder, now_ms))
    }

    /// A new allocation of `port` for `claim`, in the state and the port map.
    fn insert(&mut self, claim: &Claim, ty: &ServiceType, port: u16, holder: Option<Holder>, now_ms: u64) -> Grant {
        let lock_id = uuid::Uuid::new_v4().to_string();
        // a type of our own is never Styxy's; the port Styxy's hook reserved for this very
        // command: its lock becomes ours
        let upstream = match self.upstream_held.remove(&port) {
            _ if policy::local_type(&ty.name) => Standing::Local,
            Some(r) => Standing::Mirrored { lock_id: r.lock_id, asserted_at_ms: now_ms },
            None => Standing::Pending,
        };
        let a = Allocation {
            lock_id: lock_id.clone(),
            port,
            service_type: ty.name.clone(),
            service_name: claim.service_name().to_string(),
            session: claim.session().map(str::to_string),
            project_path: claim.req.project_path.clone(),
            requested_port: claim.requested(),
            comm: claim.req.comm.clone(),
            owners: claim.owner.as_ref().and_then(|o| if claim.owner_later { Some(o.clone()) } else { o.resolved() }).into_iter().collect(),
            allocated_at_ms: now_ms,
            upstream,
            confirmed: !claim.req.bind,
            bind: claim.req.bind,
        };
        self.publish(&a);
        self.allocs.insert(port, a);
        Grant { port, lock_id, existing: false, holder }
    }

    /// The session already holds this requested port, or holds the port itself (a tool
    /// handed it by `exec --port` binds it): the same allocation, shared with the asking
    /// owner.
    fn held_by_session(&mut self, claim: &Claim) -> Option<Result<Grant, AllocError>> {
        let (s, r) = (claim.session()?, claim.requested()?);
        let mine = |a: &&Allocation| a.session.as_deref() == Some(s);
        let found = match self.allocs.values().filter(mine).find(|a| a.requested_port == Some(r)) {
            Some(a) => Some(a.port),
            None => self.allocs.get(&r).filter(mine).map(|a| a.port),
        };
        let a = found.and_then(|p| self.allocs.get_mut(&p)).filter(|a| !claim.req.exclude.contains(&a.port))?;
        if claim.exactly && claim.req.preferred_port != Some(a.port) {
            return Some(Err(AllocError::NotExactly)); // the session maps it elsewhere
        }
        // a bind in progress becomes an owner once it is confirmed (its listen(), or its
        // bind's DONE): one that fails with EADDRINUSE never does. The common case (the
        // same process binding again) reads nothing from /proc.
        let new_owner = claim.owner.as_ref().filter(|o| !claim.req.bind && !a.owners.iter().any(|x| x.pid == o.pid));
        if let Some(o) = new_owner.and_then(Owner::resolved) {
            a.owners.push(o);
        }
        Some(Ok(Grant { port: a.port, lock_id: a.lock_id.clone(), existing: true, holder: None }))
    }

    /// The port to grant: the one the session had within the grace period, the preferred
    /// one, for a tool's default outside the type's range the ones just above it
    /// ([`NEAR`]), the type's preferred ones, then its range — other tools' default ports
    /// only when nothing else of the type is free.
    fn choose(&mut self, claim: &Claim, ty: &ServiceType, now_ms: u64) -> Result<u16, AllocError> {
        let requested = claim.requested();
        self.recent.retain(|r| now_ms.saturating_sub(r.freed_at_ms) < self.grace_ms);
        let remembered = match (claim.session(), requested) {
            (Some(s), Some(r)) => self.recent.iter().rev().find(|x| x.session == s && x.requested == r).map(|x| x.port),
            _ => None,
        };
        if claim.exactly {
            // the preferred port or nothing: only it is looked at (a port the session had
            // within the grace period is the hooks' logic's to grant)
            return match claim.req.preferred_port {
                Some(p)
                    if remembered.is_none_or(|r| r == p)
                        && !claim.req.exclude.contains(&p)
                        && self.free_for(claim, &ty.name, p, now_ms) =>
                {
                    Ok(p)
                }
                _ => Err(AllocError::NotExactly),
            };
        }
        let near = self.near(requested.filter(|r| Some(*r) != remembered), ty);
        let candidates = || {
            remembered
                .into_iter()
                .chain(claim.req.preferred_port)
                .chain(near.iter().copied())
                .chain(ty.preferred.iter().copied())
                .chain(ty.range.0..=ty.range.1)
        };
        let wanted = |p: u16| Some(p) == remembered || Some(p) == claim.req.preferred_port || near.contains(&p) || !policy::tool_default(p);
        for port in candidates().filter(|p| wanted(*p)).chain(candidates()) {
            if port != 0 && !claim.req.exclude.contains(&port) && self.free_for(claim, &ty.name, port, now_ms) {
                return Ok(port);
            }
        }
        Err(AllocError::Exhausted {
            ty: ty.name.clone(),
            range: ty.range,
            allocated: self.allocs.keys().copied().filter(|p| (ty.range.0..=ty.range.1).contains(p)).collect(),
        })
    }

    /// For a port outside its type's range (a tool's default: Vite's 5173, Jupyter's
    /// 8888), the ports just above it that the policy gives the same type, where the tool
    /// itself would look next when its port is taken (Vite 5173 → 5174…). Inside the
    /// range the type's own order applies: the neighbours there are other servers' ports.
    fn near(&self, requested: Option<u16>, ty: &ServiceType) -> Vec<u16> {
        let Some(r) = requested.filter(|r| !(ty.range.0..=ty.range.1).contains(r)) else { return Vec::new() };
        (r.saturating_add(1)..=r.saturating_add(NEAR)).filter(|p| self.policy.decide(*p).service_type() == Some(ty.name.as_str())).collect()
    }

    /// The policy as the calling process sees it: with the `STYXY_PRELOAD_PORTS` rules of
    /// its own environment (a rule may give a privileged port a type, README "Which ports
    /// are coordinated"). Read only for a port the daemon's own policy does not give the
    /// type, and only of an owner the server checked is the caller, its parent or child.
    fn callers_policy(&self, claim: &Claim) -> Option<Policy> {
        self.policy_of(claim.owner.as_ref()?.pid)
    }

    /// The policy as process `pid` sees it: with the `STYXY_PRELOAD_PORTS` rules of its
    /// environment; `None` when it has none (or cannot be read).
    pub(crate) fn policy_of(&self, pid: u32) -> Option<Policy> {
        let spec = procinfo::environ(pid).into_iter().find(|(k, _)| k == styxy_preload_common::envvars::PORTS)?.1.into_string().ok()?;
        let mut p = self.policy.clone();
        p.rules.clear();
        let _ = p.add_rules(&spec); // the rules up to a bad entry, as the process itself reads them
        Some(p)
    }

    /// A new allocation's ports must be ones the policy gives its type, and its session
    /// (and everyone) must be under quota.
    fn check(&self, claim: &Claim, ty: &ServiceType) -> Result<(), AllocError> {
        let of_type = |policy: &Policy, p: u16| policy.decide(p).service_type() == Some(ty.name.as_str());
        let callers = std::cell::OnceCell::new();
        let mine = |p: u16| {
            (ty.range.0..=ty.range.1).contains(&p)
                || of_type(&self.policy, p)
                || callers.get_or_init(|| self.callers_policy(claim)).as_ref().is_some_and(|c| of_type(c, p))
        };
        for p in claim.req.preferred_port.into_iter().chain(claim.req.requested_port) {
            if !mine(p) && !matches!(self.policy.decide(p), Decision::OnConflict(_)) {
                return Err(AllocError::NotOfType { port: p, ty: ty.name.clone() });
            }
        }
        if let Some(pref) = claim.req.preferred_port.filter(|p| !mine(*p)) {
            return Err(AllocError::NotOfType { port: pref, ty: ty.name.clone() });
        }
        if claim.req.dry_run {
            return Ok(());
        }
        if self.allocs.len() >= TOTAL_QUOTA {
            return Err(AllocError::Quota { who: "all sessions together".into(), limit: TOTAL_QUOTA });
        }
        let s = claim.session();
        if s.is_some() && self.allocs.values().filter(|a| a.session.as_deref() == s).count() >= SESSION_QUOTA {
            return Err(AllocError::Quota { who: format!("session {}", s.unwrap_or_default()), limit: SESSION_QUOTA });
        }
        Ok(())
    }

    /// A port is free if no live allocation holds it, the upstream Styxy does not hold it
    /// for another client, and nothing is bound to it. An allocation whose owners are all
    /// gone (and whose port nobody serves) is freed here.
    fn free(&mut self, port: u16, now_ms: u64) -> bool {
        !self.upstream_held.contains_key(&port) && self.free_here(port, now_ms)
    }

    /// [`State::free`] for this request: a port Styxy's hook reserved for the very
    /// command asking counts as free for it (docs/STYXY.md "The PreToolUse hook").
    fn free_for(&mut self, claim: &Claim, ty: &str, port: u16, now_ms: u64) -> bool {
        match self.upstream_held.get(&port) {
            None => self.free_here(port, now_ms),
            Some(r) => crate::styxy_hook::reserved_for(r, claim, ty) && self.free_here(port, now_ms),
        }
    }

    /// Free here: no live allocation, nothing bound.
    fn free_here(&mut self, port: u16, now_ms: u64) -> bool {
        if let Some(a) = self.allocs.get(&port) {
            if a.live(now_ms, &Look::quick(self.os())) {
                return false;
            }
            self.remove(port, now_ms);
        }
        !(self.os.in_use)(port)
    }

    fn holder_of(&self, port: u16) -> Holder {
        match self.allocs.get(&port) {
            Some(a) => Holder { session: a.session.clone(), pid: a.owners.first().map(|o| o.pid), comm: a.comm.clone() },
            None => Holder { session: None, pid: None, comm: None },
        }
    }

    fn publish(&self, a: &Allocation) {
        if let Some(map) = &self.map {
            let tag = a.session.as_deref().map(session::tag).unwrap_or(0);
            map.set_held(a.port, tag);
            if let Some(r) = a.requested_port.filter(|_| tag != 0) {
                map.insert(tag, r, a.port);
            }
        }
    }

    fn unpublish(&self, a: &Allocation) {
        if let Some(map) = &self.map {
            map.set_held(a.port, 0);
            if let (Some(s), Some(r)) = (&a.session, a.requested_port) {
                let tag = session::tag(s);
                if map.lookup(tag, r) == Some(a.port) {
                    map.remove(tag, r);
                }
            }
        }
    }

    /// Drops the allocation at `port`, remembering the session's mapping.
    pub(crate) fn remove(&mut self, port: u16, now_ms: u64) -> Option<Allocation> {
        let a = self.allocs.remove(&port)?;
        self.unpublish(&a);
        if let Some(l) = a.upstream.lock_id() {
            self.upstream_releases.push(l.to_string());
        }
        if let (Some(s), Some(r)) = (&a.session, a.requested_port) {
            self.recent.retain(|x| !(&x.session == s && x.requested == r));
            self.recent.push(Recent { session: s.clone(), requested: r, port, freed_at_ms: now_ms });
        }
        Some(a)
    }

    /// Moves the allocation at `from` to the free port `to` (the upstream's own choice,
    /// before the client has its answer).
    fn relocate(&mut self, from: u16, to: u16) -> bool {
        let Some(mut a) = self.allocs.remove(&from) else {
            return false;
        };
        self.unpublish(&a);
        a.port = to;
        self.publish(&a);
        self.allocs.insert(to, a);
        true
    }

    pub(crate) fn release(&mut self, lock_id: &str, now_ms: u64) -> Option<Allocation> {
        let port = self.allocs.values().find(|a| a.lock_id == lock_id)?.port;
        self.remove(port, now_ms)
    }

    /// Frees every allocation that no longer stands ([`Allocation::live`], looked at
    /// closely). Returns how many were freed. The daemon's own sweep goes in three steps
    /// instead ([`State::sweep_plan`], [`SweepPlan::judge`], [`State::sweep_apply`]), so
    /// that its lock is not held while `/proc` is read.
    pub fn sweep(&mut self, now_ms: u64) -> usize {
        let verdicts = self.sweep_plan().judge(now_ms);
        self.sweep_apply(verdicts, now_ms)
    }

    /// What a sweep looks at: a copy of the allocations (taken under the lock).
    pub fn sweep_plan(&self) -> SweepPlan {
        SweepPlan { allocs: self.allocs.values().cloned().collect(), os: self.os() }
    }

    /// Carries out a sweep's verdicts: frees the allocations found dead, or unheld by
    /// this sweep and the one before, and confirms the ones found bound; each only if it
    /// is still as judged ([`Judging`]).
    pub(crate) fn sweep_apply(&mut self, v: Verdicts, now_ms: u64) -> usize {
        let same = |st: &State, j: &Judging| st.allocs.get(&j.port).is_some_and(|a| a.lock_id == j.lock_id && a.owners == j.owners);
        for c in &v.confirmed {
            if same(self, c) {
                if let Some(a) = self.allocs.get_mut(&c.port) {
                    a.confirmed = true;
                }
            }
        }
        // found unheld twice in a row, it is freed; once, it waits
        let unheld: BTreeMap<u16, String> = v.unheld.into_iter().filter(|u| same(self, u)).map(|u| (u.port, u.lock_id)).collect();
        let twice = |(p, l): (&u16, &String)| self.unheld.get(p) == Some(l);
        let mut dead: Vec<u16> = unheld.iter().filter(|u| twice(*u)).map(|(p, _)| *p).collect();
        self.unheld = unheld.into_iter().filter(|(p, _)| !dead.contains(p)).collect();
        dead.extend(v.dead.iter().filter(|d| same(self, d)).map(|d| d.port));
        for p in &dead {
            self.remove(*p, now_ms);
        }
        dead.len()
    }

    pub(crate) fn clear(&mut self, now_ms: u64) -> usize {
        let ports: Vec<u16> = self.allocs.keys().copied().collect();
        for p in &ports {
            self.remove(*p, now_ms);
        }
        ports.len()
    }

    /// Who owns the grant `lock` at `port`, recorded by `pid` only ([`Claim::owner_later`]):
    /// its start time and project path; when it is gone (`None`), no pid-only owner stays
    /// (a reused pid would pass for it), and the grant stands as one without a live owner.
    pub(crate) fn owner_read(&mut self, port: u16, lock: &str, pid: u32, owner: Option<&Owner>, project_path: Option<String>) {
        let Some(a) = self.allocs.get_mut(&port).filter(|a| a.lock_id == lock) else { return };
        match owner {
            Some(owner) => {
                for o in a.owners.iter_mut().filter(|o| o.pid == pid && o.start == 0) {
                    o.start = owner.start;
                }
            }
            None => a.owners.retain(|o| o.pid != pid || o.start != 0),
        }
        if a.project_path.is_none() {
            a.project_path = project_path;
        }
    }

    /// Adds `owner` to the allocation at `port` (a `listen()` confirmation).
    pub(crate) fn confirm(&mut self, port: u16, owner: Owner) -> bool {
        match self.allocs.get_mut(&port) {
            Some(a) => {
                if !a.owners.contains(&owner) {
                    a.owners.push(owner);
                }
                a.confirmed = true;
                true
            }
            None => false,
        }
    }

    pub fn snapshot(&self, now_ms: u64) -> Snapshot {
        Snapshot {
            saved_at_ms: now_ms,
            allocations: self.allocs.values().cloned().collect(),
            recent: self.recent.clone(),
            upstream_releases: self.upstream_releases.clone(),
        }
    }

    /// Reloads a snapshot, keeping only allocations that are still live (an owner
    /// alive and the same process, or the port still served). Returns (kept, dropped).
    pub fn restore(&mut self, snap: Snapshot, now_ms: u64) -> (usize, usize) {
        let (mut kept, mut dropped) = (0, 0);
        self.recent = snap.recent;
        self.upstream_releases = snap.upstream_releases;
        let look = Look::close(self.os());
        for mut a in snap.allocations {
            // an owner known by pid alone (its grant's `DONE` never came before the stop)
            // could be anyone by now: the grant stands as one without a live owner
            a.owners.retain(|o| o.start != 0);
            if a.live(now_ms, &look) && !self.allocs.contains_key(&a.port) {
                self.publish(&a);
                self.allocs.insert(a.port, a);
                kept += 1;
            } else {
                dropped += 1;
                if let Some(l) = a.upstream.lock_id() {
                    self.upstream_releases.push(l.to_string());
                }
                if let (Some(s), Some(r)) = (&a.session, a.requested_port) {
                    self.recent.push(Recent { session: s.clone(), requested: r, port: a.port, freed_at_ms: now_ms });
                }
            }
        }
        (kept, dropped)
    }

    pub fn types(&self) -> &[ServiceType] {
        &self.policy.types
    }

    /// Free ports of a type, without reserving them (`/suggest`).
    pub fn suggest(&mut self, ty: &ServiceType, count: usize, now_ms: u64) -> Vec<u16> {
        let mut out = Vec::new();
        for p in ty.preferred.iter().copied().chain(ty.range.0..=ty.range.1) {
            if out.len() >= count {
                break;
            }
            if !out.contains(&p) && self.free(p, now_ms) {
                out.push(p);
            }
        }
        out
    }
}

/// What a reconciliation with Styxy's list found to do for one of our allocations.
#[derive(Debug, PartialEq, Eq)]
pub enum Todo {
    /// Not in Styxy (never mirrored, or Styxy lost it): allocate it.
    Allocate(u16),
    /// In Styxy, but close to its expiry: release and allocate again.
    Reassert(u16, String),
}

/// The allocations' standing in the upstream Styxy (docs/ARCHITECTURE.md "One path"):
/// what the worker learns is recorded here, and what it must do is read from here.
impl State {
    /// The Styxy locks of freed allocations, still to release.
    pub fn releases_pending(&self) -> &[String] {
        &self.upstream_releases
    }

    /// How many ports Styxy holds for other clients.
    pub fn held_by_others(&self) -> usize {
        self.upstream_held.len()
    }

    /// A Styxy lock that is not ours to keep (an answer nobody needs): to release.
    pub fn give_back(&mut self, lock_id: String) {
        self.upstream_releases.push(lock_id);
    }

    /// These locks are released in Styxy.
    pub fn released(&mut self, locks: &[String]) {
        self.upstream_releases.retain(|l| !locks.contains(l));
    }

    /// Styxy holds nothing for anyone any more (gone, or silent too long): its last list
    /// no longer keeps ports from being granted.
    pub fn styxy_forgot(&mut self) {
        self.upstream_held.clear();
    }

    /// The allocation at `port` is no longer in Styxy (its lock was released to be
    /// asserted again).
    pub fn unmirror(&mut self, port: u16) {
        if let Some(a) = self.allocs.get_mut(&port) {
            a.upstream = Standing::Pending;
        }
    }

    /// Records Styxy's answer `theirs` (under `lock_id`) for the allocation at `port`.
    /// `in_time`: the client has not been answered yet, so Styxy's other choice may
    /// replace ours (only a port of the allocation's type, free here). Returns the new
    /// port then.
    pub fn adopt_answer(&mut self, port: u16, theirs: u16, lock_id: String, in_time: bool, now: u64) -> Option<u16> {
        let mirrored = Standing::Mirrored { lock_id: lock_id.clone(), asserted_at_ms: now };
        let Some(ty) = self.allocs.get(&port).filter(|a| a.upstream.lock_id().is_none()).map(|a| a.service_type.clone()) else {
            self.upstream_releases.push(lock_id); // freed meanwhile, or mirrored already
            return None;
        };
        if theirs == port {
            self.set_standing(port, mirrored);
            return None;
        }
        let of_type = self.policy.service_type(&ty).is_some_and(|t| (t.range.0..=t.range.1).contains(&theirs));
        if in_time && of_type && self.free(theirs, now) && self.relocate(port, theirs) {
            self.set_standing(theirs, mirrored);
            return Some(theirs);
        }
        // not the port the client has: give it back; Styxy's list says who holds ours
        self.upstream_releases.push(lock_id);
        let served = (self.os.styxy_sees)(port);
        let held = self.upstream_held.get(&port).map(|h| h.instance_id.clone().unwrap_or_default());
        if let Some(a) = self.allocs.get_mut(&port) {
            match held {
                Some(other) => a.conflict(&format!("Styxy holds {port} for another client ({other})")),
                None if served => a.upstream = Standing::Served,
                None => {} // still pending: the next reading of Styxy's list finds out
            }
        }
        None
    }

    fn set_standing(&mut self, port: u16, standing: Standing) {
        if let Some(a) = self.allocs.get_mut(&port) {
            a.upstream = standing;
        }
    }

    /// Compares Styxy's allocations with ours: adopts or releases what Styxy holds of
    /// ours (`agent`) under locks we do not know, notes the ports it holds for others,
    /// marks conflicts, and lists what to allocate or re-assert.
    pub fn reconcile(&mut self, theirs: &[AllocationInfo], now: u64, reassert_after: u64, agent: &str) -> Vec<Todo> {
        let known: std::collections::BTreeSet<String> = self
            .allocs
            .values()
            .filter_map(|a| a.upstream.lock_id().map(str::to_string))
            .chain(self.upstream_releases.iter().cloned())
            .collect();
        let ours = |t: &AllocationInfo| t.user_agent.as_deref() == Some(agent);
        for t in theirs.iter().filter(|t| ours(t) && !known.contains(&t.lock_id)) {
            self.adopt_or_release(t, now.saturating_sub(reassert_after));
        }
        let by_lock: BTreeMap<&str, u16> = theirs.iter().map(|t| (t.lock_id.as_str(), t.port)).collect();
        self.upstream_held = theirs.iter().filter(|t| !ours(t) && !known.contains(&t.lock_id)).map(|t| (t.port, t.clone())).collect();
        let (held, sees) = (&self.upstream_held, self.os.styxy_sees);
        let mut todo = Vec::new();
        for a in self.allocs.values_mut() {
            match &a.upstream {
                Standing::Mirrored { lock_id, asserted_at_ms } if by_lock.get(lock_id.as_str()) == Some(&a.port) => {
                    // a server Styxy's test-bind sees could not be registered again: its lock stays until Styxy expires it
                    if now.saturating_sub(*asserted_at_ms) >= reassert_after && !sees(a.port) {
                        todo.push(Todo::Reassert(a.port, lock_id.clone()));
                    }
                }
                Standing::Local => {} // a type of our own: never Styxy's
                _ if held.contains_key(&a.port) => {
                    let other = held[&a.port].instance_id.clone().unwrap_or_default();
                    a.conflict(&format!("Styxy holds {} for another client ({other})", a.port));
                }
                // Styxy's test-bind refuses it while it is served, and protects it meanwhile
                _ if sees(a.port) => a.upstream = Standing::Served,
                // never asked, lost by Styxy (a restart, its expiry), or free again: register it
                _ => {
                    a.upstream = Standing::Pending;
                    todo.push(Todo::Allocate(a.port));
                }
            }
        }
        todo
    }

    /// An allocation Styxy holds under our name and a lock we do not know: the lock of our
    /// allocation of that port and session that has none (Styxy's answer came too late for
    /// it), or else released.
    fn adopt_or_release(&mut self, t: &AllocationInfo, unknown_ms: u64) {
        // no session is Styxy's "default" instance
        let session = |a: &Allocation| a.session.clone().unwrap_or_else(|| "default".into());
        let mine = self.allocs.get_mut(&t.port).filter(|a| Some(session(a)) == t.instance_id && a.upstream.lock_id().is_none());
        let made = t.allocated_at.as_deref().and_then(|s| humantime::parse_rfc3339_weak(s).ok());
        let made_ms = made.and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_millis() as u64);
        match mine {
            // when Styxy made it is when it expires (re-asserted at once if that is not known)
            Some(a) => a.upstream = Standing::Mirrored { lock_id: t.lock_id.clone(), asserted_at_ms: made_ms.unwrap_or(unknown_ms) },
            None => self.upstream_releases.push(t.lock_id.clone()),
        }
    }
}

impl Allocation {
    /// Marks it as conflicting with Styxy and logs a `conflict` event, once.
    fn conflict(&mut self, why: &str) {
        if self.upstream == Standing::Conflict {
            return;
        }
        self.upstream = Standing::Conflict;
        let ev = Event {
            ts: eventlog::now_ms(),
            session: self.session.clone(),
            pid: self.owners.first().map(|o| o.pid).unwrap_or(0),
            comm: self.comm.clone().unwrap_or_default(),
            call: "upstream".into(),
            requested_port: self.requested_port.unwrap_or(self.port),
            port: self.port,
            family: "ipv4".into(),
            service_type: Some(self.service_type.clone()),
            action: Action::Conflict,
            reason: Some(why.to_string()),
            latency_us: 0,
            backend: Some("styxy".into()),
            retries: 0,
        };
        let _ = eventlog::Log::own().append(&ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_os(_: u16) -> bool {
        false
    }

    fn state() -> State {
        let mut s = State::new(Policy::default(), None, 60_000);
        s.os.in_use = no_os;
        s.os.sockets = |_, _| Some(vec![]);
        s
    }

    fn me() -> Option<Owner> {
        Owner::of(std::process::id())
    }

    fn req(session: &str, port: u16) -> Claim {
        let asked =
            AllocateRequest { service_name: Some("t".into()), instance_id: Some(session.into()), ..AllocateRequest::for_port("dev", port) };
        Claim::new(asked, me())
    }

    fn of_type(ty: &str, mut c: Claim) -> Claim {
        c.req.service_type = ty.into();
        c
    }

    fn for_bind(mut c: Claim) -> Claim {
        c.req.bind = true;
        c
    }

    #[test]
    fn an_owner_known_by_pid_alone_is_not_trusted_after_a_restart() {
        let mut s = state();
        let me = Owner::pid(std::process::id());
        let later = Claim { owner: Some(me.clone()), owner_later: true, ..for_bind(req("b", 3000)) };
        s.allocate(&later, 0).unwrap();
        assert_eq!(s.allocs[&3000].owners, [me], "recorded by pid until its DONE");
        let mut restarted = state();
        assert_eq!(restarted.restore(s.snapshot(0), 100), (1, 0), "a young grant stands");
        assert!(restarted.allocs[&3000].owners.is_empty(), "the pid could be anyone's by now");
    }

    #[test]
    fn exactly_grants_the_preferred_port_or_changes_nothing() {
        let mut s = state();
        let exactly = |session: &str| Claim { exactly: true, ..req(session, 3000) };
        assert_eq!(s.allocate(&exactly("a"), 0).unwrap().port, 3000);
        let before = s.allocs.len();
        assert_eq!(s.allocate(&exactly("b"), 0).unwrap_err(), AllocError::NotExactly);
        assert_eq!(s.allocs.len(), before, "nothing granted to b");
        let again = s.allocate(&exactly("a"), 0).unwrap();
        assert_eq!((again.port, again.existing), (3000, true), "a's own port again");
        // b's mapping of 3000 is 3001: exactly 3000 is not b's
        assert_eq!(s.allocate(&req("b", 3000), 0).unwrap().port, 3001);
        assert_eq!(s.allocate(&exactly("b"), 0).unwrap_err(), AllocError::NotExactly);
        assert!(s.allocs[&3000].session.as_deref() == Some("a"));
    }

    #[test]
    fn grants_requested_then_others_and_is_idempotent_per_session() {
        let mut s = state();
        let a = s.allocate(&req("a", 3000), 0).unwrap();
        assert_eq!((a.port, a.existing), (3000, false));
        let b = s.allocate(&req("b", 3000), 0).unwrap();
        assert_eq!(b.port, 3001);
        assert_eq!(b.holder.unwrap().session.as_deref(), Some("a"));
        let b2 = s.allocate(&req("b", 3000), 0).unwrap();
        assert_eq!((b2.port, b2.existing, b2.lock_id), (3001, true, b.lock_id));
        let mut ex = req("b", 3000);
        ex.req.exclude = vec![3001];
        assert_ne!(s.allocate(&ex, 0).unwrap().port, 3001);
    }

    #[test]
    fn a_remap_avoids_other_tools_defaults_while_the_type_has_other_ports() {
        let mut s = state();
        assert_eq!(s.allocate(&req("a", 5173), 0).unwrap().port, 5173);
        // the second Vite: where Vite itself would go (5174), not 3000 (Next, Express…)
        assert_eq!(s.allocate(&req("b", 5173), 0).unwrap().port, 5174);
        assert_eq!(s.allocate(&req("d", 5173), 0).unwrap().port, 5175);
        // a second Next: 3001; a debugger: its own type's range, never another debugger's port
        assert_eq!(s.allocate(&req("a", 3000), 0).unwrap().port, 3000);
        assert_eq!(s.allocate(&req("b", 3000), 0).unwrap().port, 3001);
        let debug = |session: &str, port| of_type("debug", req(session, port));
        assert_eq!(s.allocate(&debug("a", 9229), 0).unwrap().port, 9229);
        assert_eq!(s.allocate(&debug("b", 9229), 0).unwrap().port, 5680);
        assert_eq!(s.allocs[&5680].upstream, Standing::Local, "never sent to Styxy");
        // asked for by name, a default is granted as usual
        assert_eq!(s.allocate(&req("c", 4321), 0).unwrap().port, 4321);
    }

    /// The one socket `fake_sockets` reports on any port: (inode, uid), 0 for none.
    static FAKE: std::sync::Mutex<(u64, u32)> = std::sync::Mutex::new((0, 0));

    fn fake_sockets(port: Option<u16>, which: Which) -> Option<Vec<PortSocket>> {
        let (inode, uid) = *FAKE.lock().unwrap();
        // a socket bound, never listening
        Some(if inode == 0 || which == Which::Listening { vec![] } else { vec![PortSocket { port: port.unwrap_or(3000), inode, uid }] })
    }

    fn socket_inode(s: &socket2::Socket) -> u64 {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd())).unwrap().ino()
    }

    #[test]
    fn a_bind_grant_stands_while_its_owners_socket_holds_the_port_and_no_longer() {
        let mut s = state();
        s.os.sockets = fake_sockets;
        // SAFETY: geteuid(2) cannot fail.
        let me_uid = unsafe { libc::geteuid() };
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap(); // bound, never listening
        *FAKE.lock().unwrap() = (socket_inode(&sock), me_uid);
        let bind = for_bind(req("b", 3000));
        assert_eq!(s.allocate(&bind, 0).unwrap().port, 3000);
        assert_eq!(s.sweep(60_000), 0, "bound a minute before its listen(): it stands");
        assert!(s.allocs[&3000].confirmed);
        // the socket is another process's (same inode number, not among our fds): freed by
        // the second sweep that finds it so (a probe closed, the server binds again between two)
        *FAKE.lock().unwrap() = (u64::MAX, me_uid);
        assert_eq!(s.sweep(60_001), 0, "unheld once: it waits a sweep");
        *FAKE.lock().unwrap() = (socket_inode(&sock), me_uid);
        assert_eq!(s.sweep(61_001), 0, "held again: it stands");
        *FAKE.lock().unwrap() = (u64::MAX, me_uid);
        assert_eq!(s.sweep(62_001), 0, "unheld once more: it waits again");
        assert_eq!(s.sweep(63_001), 1, "unheld twice in a row: freed");
        // an owner gone: only a socket of the user's own keeps it (a server that outlived
        // the process that asked), never another user's
        let dead = Claim { owner: Some(Owner { pid: std::process::id(), start: 1 }), ..bind.clone() };
        s.allocate(&dead, 70_000).unwrap();
        *FAKE.lock().unwrap() = (u64::MAX, me_uid.wrapping_add(1));
        assert_eq!(s.sweep(80_000), 0, "unheld once: it waits a sweep");
        assert_eq!(s.sweep(81_000), 1, "another user's socket on the port keeps nothing alive");
        s.allocate(&dead, 90_000).unwrap();
        *FAKE.lock().unwrap() = (u64::MAX, me_uid);
        assert_eq!(s.sweep(100_000), 0);
        // an API client's grant stands while its owner lives, bound or not
        s.clear(0);
        *FAKE.lock().unwrap() = (0, 0);
        s.allocate(&req("c", 3000), 0).unwrap();
        assert_eq!(s.sweep(60_000), 0);
        drop(sock);
    }

    /// What the fake below was asked for: listening sockets, every socket.
    static ASKED: std::sync::Mutex<(u32, u32)> = std::sync::Mutex::new((0, 0));
    static LISTENER: std::sync::Mutex<u64> = std::sync::Mutex::new(0);

    /// A machine where [`LISTENER`] listens on ports 3000 and 3001; it counts what
    /// it is asked for in [`ASKED`].
    fn counting_sockets(port: Option<u16>, which: Which) -> Option<Vec<PortSocket>> {
        let mut asked = ASKED.lock().unwrap();
        match which {
            Which::Listening => asked.0 += 1,
            Which::Any => asked.1 += 1,
        }
        // SAFETY: geteuid(2) cannot fail.
        let uid = unsafe { libc::geteuid() };
        let inode = *LISTENER.lock().unwrap();
        Some(port.map_or(vec![3000, 3001], |p| vec![p]).into_iter().map(|port| PortSocket { port, inode, uid }).collect())
    }

    #[test]
    fn a_server_s_grant_is_judged_from_the_listeners_without_walking_every_connection() {
        let mut s = state();
        s.os.sockets = counting_sockets;
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        *LISTENER.lock().unwrap() = socket_inode(&socket2::Socket::from(server.try_clone().unwrap()));
        s.allocate(&for_bind(req("a", 3000)), 0).unwrap();
        s.allocate(&for_bind(req("b", 3001)), 0).unwrap();
        assert_eq!(s.sweep(60_000), 0, "both stand: their owner (this process) listens");
        assert_eq!(*ASKED.lock().unwrap(), (1, 0), "one look at the listeners for both, none at every socket");
        *LISTENER.lock().unwrap() = u64::MAX; // another process's socket now
        assert_eq!(s.sweep(60_001), 0, "unheld once: it waits a sweep");
        assert_eq!(*ASKED.lock().unwrap(), (2, 1), "every socket looked at once, for both");
    }

    /// A daemonizing server: its parent kept the port, forked and exited; the child's
    /// `listen()` makes it an owner while a sweep judges the grant without it.
    #[test]
    fn a_grant_whose_owner_is_gone_waits_a_sweep_and_is_kept_by_an_owner_added_meanwhile() {
        let mut s = state();
        s.os.sockets = |_, _| Some(vec![]); // no socket the sweep can see (it missed one)
        let parent = Claim { owner: Some(Owner { pid: std::process::id(), start: 1 }), ..for_bind(req("a", 3000)) };
        s.allocate(&parent, 0).unwrap();
        assert_eq!(s.sweep(59_000), 0, "unheld once: it waits a sweep");
        let judged = s.sweep_plan().judge(60_000); // and twice
        let child = Owner::of(std::process::id()).unwrap();
        assert!(s.confirm(3000, child.clone()));
        assert_eq!(s.sweep_apply(judged, 60_000), 0, "judged without the child: not carried out");
        assert_eq!(s.allocs[&3000].owners.len(), 2);
        // the child gone too: freed by the second sweep that finds nothing holds it
        s.allocs.get_mut(&3000).unwrap().owners.retain(|o| *o != child);
        assert_eq!(s.sweep(62_000), 0, "unheld once: it waits a sweep");
        assert_eq!(s.sweep(63_000), 1, "unheld twice: freed");
    }

    #[test]
    fn dead_owner_is_freed_and_grace_gives_the_port_back() {
        let mut s = state();
        s.allocate(&req("a", 3000), 0).unwrap();
        let mut dead = req("b", 3000);
        dead.owner = Some(Owner { pid: std::process::id(), start: 1 }); // not this process's start time
        assert_eq!(s.allocate(&dead, 0).unwrap().port, 3001);
        assert_eq!(s.sweep(10), 0, "found unheld once");
        assert_eq!(s.sweep(11), 1, "and twice: freed");
        assert_eq!(s.allocs.len(), 1);
        s.remove(3000, 10); // session a is gone too: 3000 is free again
                            // within the grace period, session b gets 3001 back although 3000 is free
        assert_eq!(s.allocate(&req("b", 3000), 20).unwrap().port, 3001);
        s.remove(3001, 40);
        // after the grace period the memory is gone and the requested port wins
        assert_eq!(s.allocate(&req("b", 3000), 100_000).unwrap().port, 3000);
    }

    #[test]
    fn os_bound_ports_are_skipped_and_exhaustion_is_an_error() {
        let mut s = state();
        s.os.in_use = |p| p == 8000;
        let mut r = req("a", 8000);
        r.req.service_type = "api".into();
        assert_eq!(s.allocate(&r, 0).unwrap().port, 8001);
        let mut ports = vec![8001];
        for i in 0..98 {
            let mut r = req(&format!("s{i}"), 8000);
            r.req.service_type = "api".into();
            ports.push(s.allocate(&r, 0).unwrap().port);
        }
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 99);
        let mut r = req("last", 8000);
        r.req.service_type = "api".into();
        assert!(matches!(s.allocate(&r, 0), Err(AllocError::Exhausted { .. })));
        r.req.service_type = "nope".into();
        assert_eq!(s.allocate(&r, 0).unwrap_err(), AllocError::UnknownType("nope".into()));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Alloc { ty: usize, session: u8, port: Option<u16>, dry: bool },
        Release(usize),
        Sweep,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..4, 0u8..6, proptest::option::of(prop_oneof![2990u16..3110, 8000u16..8100, 1u16..65535]), any::<bool>())
                .prop_map(|(ty, session, port, dry)| Op::Alloc { ty, session, port, dry }),
            1 => (0usize..64).prop_map(Op::Release),
            1 => Just(Op::Sweep),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Any sequence of allocations and releases: a granted port is never held by a
        /// second allocation, and a session asking again for its requested port gets
        /// the same one.
        #[test]
        fn never_grants_one_port_twice(ops in prop::collection::vec(op(), 1..80)) {
            let mut st = State::new(Policy::default(), None, 60_000);
            st.os.in_use = |_| false;
            st.os.sockets = |_, _| Some(vec![]);
            let me = Owner::of(std::process::id());
            let types = ["dev", "api", "storybook", "ai"];
            let mut locks = Vec::new();
            for o in ops {
                match o {
                    Op::Alloc { ty, session, port, dry } => {
                        let held: BTreeSet<u16> = st.allocs.keys().copied().collect();
                        let asked = AllocateRequest {
                            service_type: types[ty].into(),
                            service_name: Some("f".into()),
                            preferred_port: port,
                            requested_port: port,
                            instance_id: Some(format!("s{session}")),
                            dry_run: dry,
                            ..Default::default()
                        };
                        let req = Claim::new(asked, me.clone());
                        if let Ok(g) = st.allocate(&req, 0) {
                            if g.existing {
                                let a = &st.allocs[&g.port];
                                prop_assert_eq!(a.session.as_deref(), req.session());
                            } else {
                                prop_assert!(!held.contains(&g.port), "port {} granted twice", g.port);
                                if !dry { locks.push(g.lock_id); }
                            }
                        }
                    }
                    Op::Release(i) => if let Some(l) = locks.get(i % locks.len().max(1)).cloned() { st.release(&l, 0); },
                    Op::Sweep => { st.sweep(0); }
                }
            }
        }
    }

    use std::collections::BTreeSet;
}
