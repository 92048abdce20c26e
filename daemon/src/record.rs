//! What happens to the allocations, each with every step that goes with it: a grant is
//! mirrored in Styxy, journaled (on disk before its answer leaves, or withdrawn), saved
//! and counted; a confirmation, a withdrawal, a release and a sweep are saved.
//! The HTTP API (`server.rs`) and the shim's socket (`hook.rs`) change the state through
//! these, so that neither can leave a step out.

use std::time::Instant;

use crate::state::{AllocError, Allocation, Claim, Grant, Owner};
use crate::{now_ms, Shared};
use styxy_preload_common::procinfo;

/// Why a grant was not made.
#[derive(Debug)]
pub enum Refusal {
    /// The state's rules refused it.
    State(AllocError),
    /// It could not be journaled (a full disk): withdrawn, since nothing would remember
    /// it after a restart, and another session's remap would then lead nowhere.
    Unjournaled(String),
}

impl Shared {
    /// Grants `claim`: the state's choice, Styxy's word on it when Styxy answers in time
    /// (`upstream::mirror_grant`), the journal line, a save and the metrics, in that
    /// order. A dry run and an existing grant change nothing, so only the metrics see them.
    pub async fn grant(&self, claim: &Claim) -> Result<Grant, Refusal> {
        let started = Instant::now();
        let result = self.state.lock().allocate(claim, now_ms()).map_err(Refusal::State);
        let result = match result {
            Ok(g) if !claim.req.dry_run && !g.existing => self.made(g, !claim.owner_later).await,
            other => other,
        };
        self.metrics.observe_allocate(started.elapsed(), result.is_ok());
        result
    }

    /// A new grant, made in the state: mirrored (`mirror`: unless who owns it is read only
    /// later, when the upstream's worker mirrors it), journaled and saved.
    async fn made(&self, mut g: Grant, mirror: bool) -> Result<Grant, Refusal> {
        let theirs = if mirror { crate::upstream::mirror_grant(self, g.port).await } else { None };
        if let Some(theirs) = theirs {
            g.port = theirs; // Styxy held ours for another client and chose this one
        }
        self.journaled(g.port)?;
        self.persist();
        Ok(g)
    }

    /// `port`, bound by the claim's process as its session's own with no round trip
    /// ([`State::adopt`](crate::state::State::adopt)): the session's allocation, or one made
    /// again while `runs` (journaled and saved; Styxy's mirror of it is the upstream
    /// worker's).
    pub fn adopt(&self, claim: &Claim, port: u16, runs: impl FnOnce() -> bool) -> Option<Grant> {
        let g = self.state.lock().adopt(claim, port, now_ms(), runs)?;
        if !g.existing {
            self.journaled(port).ok()?;
            self.persist();
        }
        Some(g)
    }

    /// The new grant of `port` is in the journal; when it cannot be written, it is
    /// withdrawn.
    fn journaled(&self, port: u16) -> Result<(), Refusal> {
        let mut st = self.state.lock();
        let Some(a) = st.allocation(port) else { return Ok(()) };
        let Err(e) = self.journal.append(a) else { return Ok(()) };
        st.remove(port, now_ms());
        drop(st);
        log!("grant of port {port} withdrawn: cannot write the journal: {e}");
        Err(Refusal::Unjournaled(format!("port {port} not granted: the daemon cannot write its journal: {e}")))
    }

    /// Reads who owns the new grant `lock` at `port` (`pid`), recorded by pid only: its start
    /// time and directory, read without the state's lock. The owner, when it still runs.
    pub fn owner_read(&self, port: u16, lock: &str, pid: u32) -> Option<Owner> {
        let owner = Owner::of(pid);
        let project_path = owner.as_ref().and_then(|_| procinfo::cwd(pid));
        self.state.lock().owner_read(port, lock, pid, owner.as_ref(), project_path);
        self.persist();
        owner
    }

    /// As [`Shared::confirm`], of the allocation `lock` alone (a sweep may have replaced it).
    pub fn confirm_of(&self, port: u16, lock: &str, owner: Owner) -> bool {
        let confirmed = {
            let mut st = self.state.lock();
            st.allocation(port).is_some_and(|a| a.lock_id == lock) && st.confirm(port, owner)
        };
        if confirmed {
            self.persist();
        }
        confirmed
    }

    /// `owner` bound or listens on `port`: the grant is confirmed, and saved.
    pub fn confirm(&self, port: u16, owner: Owner) -> bool {
        let confirmed = self.state.lock().confirm(port, owner);
        if confirmed {
            self.persist();
        }
        confirmed
    }

    /// The bind a new grant was made for failed: the grant is withdrawn, and saved.
    pub fn withdraw(&self, port: u16) {
        if self.state.lock().remove(port, now_ms()).is_some() {
            self.persist();
        }
    }

    /// A client gives its grant back (`DELETE /allocate/:lock`).
    pub fn release(&self, lock_id: &str) -> Option<Allocation> {
        let released = self.state.lock().release(lock_id, now_ms());
        if released.is_some() {
            self.persist();
        }
        released
    }

    /// Frees what no longer stands, looked at closely, and saves: `/proc` is read without
    /// the state's lock (grants go on meanwhile), and only what is still the allocation
    /// judged is freed. Blocking: run it off the runtime's thread. How many were freed.
    pub fn sweep(&self) -> usize {
        let plan = self.state.lock().sweep_plan();
        let verdicts = plan.judge(now_ms());
        let freed = self.state.lock().sweep_apply(verdicts, now_ms());
        if freed > 0 {
            self.persist();
        }
        freed
    }

    /// Frees every allocation (`/cleanup` with `force`), and saves.
    pub fn clear(&self) -> usize {
        let cleared = self.state.lock().clear(now_ms());
        if cleared > 0 {
            self.persist();
        }
        cleared
    }
}
