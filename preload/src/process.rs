//! Per-process state, computed on first use and published lock-free (`OnceBox`):
//! the environment's settings, the coordinator, the shared port map. [`Process::from_vars`]
//! builds it from any environment: the supervisor passes the one `exec` hands down.

use std::path::PathBuf;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use styxy_preload_common::eventlog::Log;
use styxy_preload_common::http::Endpoint;
use styxy_preload_common::paths::{self, Vars};
use styxy_preload_common::policy::Policy;
use styxy_preload_common::portmap::PortMap;
use styxy_preload_common::procinfo;
use styxy_preload_common::{decide, envvars, hookproto, session, switch};

use crate::call::Caller;

pub use styxy_preload_common::decide::Mode;

pub struct Process {
    pub mode: Mode,
    pub session: Option<String>,
    /// The session's tag in the port map (0 without a session).
    pub tag: u32,
    pub notify: bool,
    pub isolate: bool,
    pub policy: Policy,
    pub comm: String,
    /// Where its events go (`STYXY_PRELOAD_LOG`, `STYXY_PRELOAD_LOG_MAX`, the state directory).
    pub log: Log,
    /// `<dev>:<ino>` of the regular file `exec` was started with as stderr
    /// (`envvars::STDERR`): the one file the notice may be written to.
    pub stderr_file: Option<String>,
    pub cwd: Option<String>,
    /// Under `exec`'s seccomp supervisor, which answers this process's bind, listen
    /// and connect itself: the library steps aside (no double remap).
    pub supervised: bool,
    /// The local daemon: the only coordinator the hooks talk to. The socket `STYXY_URL`
    /// names when that is a `unix:` URL (what `exec` and `env` hand down), else the one in
    /// the runtime directory; an `http://` `STYXY_URL` (Styxy) is the daemon's upstream,
    /// never the hooks' (docs/ARCHITECTURE.md "One path").
    pub endpoint: Endpoint,
    /// `STYXY_PRELOAD_PORTS`: rules of the process's own ([`Process::own_rule`]).
    pub own_rules: Option<String>,
    /// The variables that name its event log (`hookproto::LOG_VARS`), as it has them: the
    /// daemon writes a kept bind's event there.
    pub log_vars: Vec<(&'static str, String)>,
    /// The daemon's port map, beside its socket; opened on first use ([`Process::portmap`]).
    portmap_path: PathBuf,
    map: AtomicPtr<PortMap>,
    pub memory: Memory,
}

/// What a process remembers from one bind to the next, each keyed by pid so that a
/// forked child starts afresh. Lock-free: a fork while another thread writes is harmless.
#[derive(Default)]
pub struct Memory {
    /// pid << 16 | the port a tool first wanted before it fell back by itself.
    origin: AtomicU64,
    /// pid << 32 | requested << 16 | granted: the last grant.
    last: AtomicU64,
    /// pid << 16 | port: ports the supervised processes kept (a `KEEP` granted, bound).
    kept: [AtomicU64; 16],
    /// The pid that said on stderr that it cannot ask the daemon.
    warned: AtomicU32,
    refused: AtomicU64,
    refusal_told: AtomicU32,
}

impl Memory {
    /// Fallback mode: the tool of `pid` first wanted `port`; its session maps that port
    /// to the one the tool settles on.
    pub fn remember_origin(&self, pid: u32, port: u16) {
        self.origin.store(u64::from(pid) << 16 | u64::from(port), Ordering::Relaxed);
    }

    pub fn origin(&self, pid: u32) -> Option<u16> {
        let v = self.origin.load(Ordering::Relaxed);
        (v >> 16 == u64::from(pid) && v != 0).then_some(v as u16)
    }

    /// `pid` bound `port`, which the daemon kept for it: its allocation is `pid`'s.
    pub fn remember_kept(&self, pid: u32, port: u16) {
        let key = u64::from(pid) << 16 | u64::from(port);
        let slot = self.kept.iter().find(|k| k.load(Ordering::Relaxed) == 0).unwrap_or(&self.kept[usize::from(port) % 16]);
        slot.store(key, Ordering::Relaxed);
    }

    /// Whether `pid` kept `port` before (a probe then the real bind, a restart, a twin):
    /// binding it again needs no one's word, as in the library.
    pub fn kept_here(&self, pid: u32, port: u16) -> bool {
        self.kept_by(pid, port).0
    }

    /// Whether `port` was kept by `pid`, and by another process of the tree (one that
    /// handed its socket down: its `listen()` makes `pid` an owner too), as the library
    /// tells them (`decide::Listening`).
    pub fn kept_by(&self, pid: u32, port: u16) -> (bool, bool) {
        let mine = u64::from(pid) << 16 | u64::from(port);
        let (mut here, mut before) = (false, false);
        for k in self.kept.iter().map(|k| k.load(Ordering::Relaxed)) {
            here |= k == mine;
            before |= k != 0 && k != mine && k & 0xffff == u64::from(port);
        }
        (here, before)
    }

    /// Remembers this grant; true when (`requested` → `port`) was also the last one.
    pub fn twin(&self, pid: u32, requested: u16, port: u16) -> bool {
        let key = u64::from(pid) << 32 | u64::from(requested) << 16 | u64::from(port);
        self.last.swap(key, Ordering::Relaxed) == key
    }

    /// True the first time `pid` asks: one line on stderr per process, not one per bind.
    /// The first refused connect of `pid` to `port` in a row: logged once, not once per
    /// retry of a client polling it.
    pub fn first_refusal(&self, pid: u32, port: u16) -> bool {
        let key = u64::from(pid) << 16 | u64::from(port);
        self.refused.swap(key, Ordering::Relaxed) != key
    }

    /// The first refused connect of `pid`: told on stderr once.
    pub fn first_refusal_told(&self, pid: u32) -> bool {
        self.refusal_told.swap(pid, Ordering::Relaxed) != pid
    }

    pub fn first_warning(&self, pid: u32) -> bool {
        self.warned.swap(pid, Ordering::Relaxed) != pid
    }
}

impl Process {
    /// The settings of a process whose environment is `var`: this process's own (the
    /// library), or the one `exec` hands down to the tree its supervisor answers for.
    pub fn from_vars(var: Vars) -> Process {
        let text = |name: &str| var(name).and_then(|v| v.into_string().ok());
        let is = |name: &str, values: &[&str]| text(name).is_some_and(|v| values.contains(&v.trim().to_ascii_lowercase().as_str()));
        let off = |name: &str| var(name).is_some_and(|v| switch::is_off(v.as_encoded_bytes()));
        let mode = if is(envvars::DISABLE_REASSIGN, &["1", "true", "yes"]) {
            Mode::Observe
        } else {
            match text(envvars::MODE).unwrap_or_default().trim() {
                "on-conflict" => Mode::OnConflict,
                "observe" => Mode::Observe,
                "fallback" => Mode::Fallback,
                _ => Mode::Coordinate,
            }
        };
        let session = session::from_vars(var);
        let comm = procinfo::comm(procinfo::SELF).unwrap_or_else(|| "?".into());
        let named = text(envvars::URL).and_then(|u| u.trim().strip_prefix("unix:").map(|p| PathBuf::from(p.trim_start_matches("//"))));
        let sock = named.filter(|p| p.is_absolute()).unwrap_or_else(|| paths::runtime_dir_in(var).join("daemon.sock"));
        let supervised_by = text(envvars::SUPERVISED).and_then(|v| v.parse::<u32>().ok());
        Process {
            mode,
            tag: session.as_deref().map(session::tag).unwrap_or(0),
            session,
            notify: !off(envvars::NOTIFY),
            isolate: !off(envvars::ISOLATE),
            policy: Policy::from_vars(var).0,
            comm,
            log: Log::of(var),
            stderr_file: text(envvars::STDERR),
            cwd: std::env::current_dir().ok().map(|d| d.to_string_lossy().chars().take(1000).collect()),
            supervised: supervised_by.is_some_and(|n| seccomp_filters() >= n),
            own_rules: text(envvars::PORTS),
            log_vars: hookproto::LOG_VARS.iter().filter_map(|k| Some((*k, text(k)?))).collect(),
            portmap_path: sock.with_file_name("ports.map"),
            endpoint: Endpoint::Unix(sock),
            map: AtomicPtr::new(std::ptr::null_mut()),
            memory: Memory::default(),
        }
    }

    /// A rule of the process's own covers `port` (then the daemon decides with its rules).
    pub fn own_rule(&self, port: u16) -> bool {
        self.own_rules.as_deref().is_some_and(|spec| decide::rule_class(spec.as_bytes(), port).is_some())
    }

    /// This process, as the caller of a hook.
    pub fn caller(&self) -> Caller<'_> {
        Caller { pid: pid(), comm: &self.comm, cwd: self.cwd.as_deref() }
    }

    /// The built-in daemon's port map. Not cached while missing (one failed open), so a
    /// process started before the daemon finds it later.
    pub fn portmap(&self) -> Option<&PortMap> {
        let p = self.map.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: published once below, freed only with `self`.
            return Some(unsafe { &*p });
        }
        let map = Box::into_raw(Box::new(PortMap::open_readonly(&self.portmap_path).ok()?));
        match self.map.compare_exchange(std::ptr::null_mut(), map, Ordering::AcqRel, Ordering::Acquire) {
            // SAFETY: we just published it; it lives as long as `self`.
            Ok(_) => Some(unsafe { &*map }),
            Err(winner) => {
                // SAFETY: ours lost the race and was never shared.
                drop(unsafe { Box::from_raw(map) });
                // SAFETY: the winner's, published once and freed only with `self`.
                Some(unsafe { &*winner })
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let p = *self.map.get_mut();
        if !p.is_null() {
            // SAFETY: ours (Box::into_raw above); no borrow of `self` outlives this.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

/// The seccomp filters on this process (`Seccomp_filters`, Linux 5.9+; before, 1 for
/// any filter).
pub fn seccomp_filters() -> u32 {
    let field = |name: &str| procinfo::status_field(procinfo::SELF, name).and_then(|v| v.parse::<u32>().ok());
    field("Seccomp_filters").unwrap_or_else(|| u32::from(field("Seccomp") == Some(2)))
}

pub fn pid() -> u32 {
    // SAFETY: getpid cannot fail; called each time, so a forked child reports its own.
    unsafe { libc::getpid() as u32 }
}
