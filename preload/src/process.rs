//! Per-process state, computed on first use and published lock-free (`OnceBox`):
//! the environment's settings, the coordinator, the shared port map.

use std::path::PathBuf;
use std::sync::atomic::{AtomicPtr, Ordering};

use once_cell::race::OnceBox;
use styxy_preload_client::http::Endpoint;
use styxy_preload_client::paths;
use styxy_preload_client::policy::Policy;
use styxy_preload_client::portmap::PortMap;
use styxy_preload_client::session;

use crate::call::Caller;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Ask before every coordinated bind (default).
    Coordinate,
    /// Bind as asked; ask only after `EADDRINUSE`.
    OnConflict,
    /// Never change a port; log what would have been coordinated.
    Observe,
    /// For tools that move to the next port by themselves (Jupyter, Vite, http-server):
    /// a port another session holds is refused (`EADDRINUSE`), so the tool falls back and
    /// prints the URL it really serves; the session's connects to the first port follow.
    Fallback,
}

pub struct Process {
    pub mode: Mode,
    pub session: Option<String>,
    /// The session's tag in the port map (0 without a session).
    pub tag: u32,
    pub notify: bool,
    pub isolate: bool,
    pub policy: Policy,
    pub comm: String,
    pub log_path: PathBuf,
    pub cwd: Option<String>,
    /// Under `exec`'s seccomp supervisor, which answers this process's bind, listen
    /// and connect itself: the library steps aside (no double remap).
    pub supervised: bool,
}

fn env_is(name: &str, values: &[&str]) -> bool {
    std::env::var(name).map(|v| values.contains(&v.trim().to_ascii_lowercase().as_str())).unwrap_or(false)
}

impl Process {
    fn from_env() -> Process {
        let mode = if env_is("STYXY_DISABLE_REASSIGN", &["1", "true", "yes"]) {
            Mode::Observe
        } else {
            match std::env::var("STYXY_PRELOAD_MODE").unwrap_or_default().trim() {
                "on-conflict" => Mode::OnConflict,
                "observe" => Mode::Observe,
                "fallback" => Mode::Fallback,
                _ => Mode::Coordinate,
            }
        };
        let session = session::from_env();
        let comm = std::fs::read_to_string("/proc/self/comm").map(|c| c.trim_end().to_string()).unwrap_or_else(|_| "?".into());
        Process {
            mode,
            tag: session.as_deref().map(session::tag).unwrap_or(0),
            session,
            notify: !env_is("STYXY_PRELOAD_NOTIFY", &["off", "0", "false", "no"]),
            isolate: !env_is("STYXY_PRELOAD_ISOLATE", &["off", "0", "false", "no"]),
            policy: Policy::from_env().0,
            comm,
            log_path: paths::event_log_path(),
            cwd: std::env::current_dir().ok().map(|d| d.to_string_lossy().chars().take(1000).collect()),
            supervised: std::env::var(SUPERVISED_ENV).ok().and_then(|v| v.parse().ok()).is_some_and(|n: u32| seccomp_filters() >= n),
        }
    }

    /// This process, as the caller of a hook.
    pub fn caller(&self) -> Caller<'_> {
        Caller { pid: pid(), comm: &self.comm, cwd: self.cwd.as_deref() }
    }
}

/// Set by `exec --seccomp` in the environment it hands down: how many seccomp filters
/// a process under its filter has at least. The variable alone could have leaked into
/// a process outside the supervised tree, or the filter could have been refused.
pub const SUPERVISED_ENV: &str = "STYXY_PRELOAD_SUPERVISED";

/// The seccomp filters on this process (`Seccomp_filters`, Linux 5.9+; before, 1 for
/// any filter).
pub fn seccomp_filters() -> u32 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u32>().ok());
    field("Seccomp_filters:").unwrap_or_else(|| u32::from(field("Seccomp:") == Some(2)))
}

static PROCESS: OnceBox<Process> = OnceBox::new();
static MAP: AtomicPtr<PortMap> = AtomicPtr::new(std::ptr::null_mut());

pub fn get() -> &'static Process {
    PROCESS.get_or_init(|| Box::new(Process::from_env()))
}

/// The local daemon: the only coordinator the hooks talk to, and its port map beside
/// its socket. The socket is the one `STYXY_URL` names when that is a `unix:` URL
/// (what `exec` and `env` hand down), else the one in the runtime directory; an
/// `http://` `STYXY_URL` (Styxy) is the daemon's upstream, never the hooks'
/// (docs/ARCHITECTURE.md "One path").
struct Daemon {
    endpoint: Endpoint,
    portmap: PathBuf,
}

fn daemon() -> &'static Daemon {
    static DAEMON: OnceBox<Daemon> = OnceBox::new();
    DAEMON.get_or_init(|| {
        let named =
            std::env::var("STYXY_URL").ok().and_then(|u| u.trim().strip_prefix("unix:").map(|p| PathBuf::from(p.trim_start_matches("//"))));
        let sock = named.filter(|p| p.is_absolute()).unwrap_or_else(paths::socket_path);
        Box::new(Daemon { portmap: sock.with_file_name("ports.map"), endpoint: Endpoint::Unix(sock) })
    })
}

pub fn endpoint() -> &'static Endpoint {
    &daemon().endpoint
}

/// The built-in daemon's port map. Not cached while missing (one failed open), so a
/// process started before the daemon finds it later.
pub fn portmap() -> Option<&'static PortMap> {
    let p = MAP.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: published once below and never freed.
        return Some(unsafe { &*p });
    }
    let map = Box::into_raw(Box::new(PortMap::open_readonly(&daemon().portmap).ok()?));
    match MAP.compare_exchange(std::ptr::null_mut(), map, Ordering::AcqRel, Ordering::Acquire) {
        // SAFETY: we just published it; it lives for the process.
        Ok(_) => Some(unsafe { &*map }),
        Err(winner) => {
            // SAFETY: ours lost the race and was never shared.
            drop(unsafe { Box::from_raw(map) });
            Some(unsafe { &*winner })
        }
    }
}

pub fn pid() -> u32 {
    // SAFETY: getpid cannot fail; called each time, so a forked child reports its own.
    unsafe { libc::getpid() as u32 }
}
