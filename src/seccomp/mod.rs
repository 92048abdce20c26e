//! `exec --seccomp`: coordination for programs `LD_PRELOAD` never reaches — statically
//! linked ones, and Go's `net` package, which makes raw syscalls. The child gets a
//! seccomp filter before `execve` ([`filter`]); `exec` answers its `bind`, `listen`
//! and `connect` calls, and those of its whole tree, with the library's decisions
//! ([`supervisor`]).

mod filter;
mod supervisor;
mod workers;

use std::collections::BTreeMap;
use std::ffi::OsString;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use styxy_preload_common::{paths, procinfo};
use styxy_preload_core::process::Process;

/// Why seccomp mode cannot work on this machine, checked before the child starts;
/// `None` when it can. (Where installing the filter itself is refused, the child
/// reports it: see [`Prepared::start`].)
pub fn unavailable() -> Option<String> {
    if filter::AUDIT_ARCH == 0 {
        return Some(format!("not built for {}", std::env::consts::ARCH));
    }
    let action = libc::SECCOMP_RET_USER_NOTIF;
    // SAFETY: a plain syscall asking the kernel about an action.
    if unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_GET_ACTION_AVAIL, 0, &action as *const u32) } != 0 {
        return Some(match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOSYS) => "this kernel has no seccomp".into(),
            Some(libc::EPERM | libc::EACCES) => "seccomp is not permitted here".into(),
            _ => "the kernel has no seccomp user notification (Linux 5.0+)".into(),
        });
    }
    // our own pidfd, and a copy of it through itself (both closed when dropped)
    let Ok(pidfd) = supervisor::pidfd_open(std::process::id()) else {
        return Some("the kernel has no pidfd_open (Linux 5.3+)".into());
    };
    if let Err(e) = supervisor::pidfd_getfd(pidfd.as_raw_fd(), pidfd.as_raw_fd()) {
        return Some(match e {
            libc::ENOSYS => "the kernel has no pidfd_getfd (Linux 5.6+)".into(),
            _ => format!("pidfd_getfd is refused: {}", io::Error::from_raw_os_error(e)),
        });
    }
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok().and_then(|s| s.trim().parse::<u8>().ok());
    if scope == Some(3) || (scope == Some(2) && !has_cap_sys_ptrace()) {
        return Some(format!("Yama's ptrace_scope {} forbids taking another process's socket", scope.unwrap_or(0)));
    }
    None
}

fn has_cap_sys_ptrace() -> bool {
    const CAP_SYS_PTRACE: u32 = 19;
    procinfo::status_field(procinfo::SELF, "CapEff")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_PTRACE) != 0)
}

/// A command set up to install the filter; [`Prepared::start`] after it spawned.
pub struct Prepared {
    ours: OwnedFd,
    /// What the command hands down on top of our environment: the settings the tree's
    /// hooked processes read are made from it once the command runs (not before: the
    /// program starts sooner).
    env: BTreeMap<String, String>,
    theirs: Option<OwnedFd>,
}

/// Makes `cmd`'s child install the filter (trapping `connect` too when `connect`), and
/// die with us: without its supervisor its calls would fail with `ENOSYS` for ever.
/// Call it on the thread that spawns `cmd` and lives as long as we do (the parent-death
/// signal follows the thread).
/// `env` is what `cmd` hands down on top of ours: the supervisor decides as a hooked
/// process of the session would, with that environment.
pub fn prepare(cmd: &mut Command, env: &BTreeMap<String, String>, connect: bool) -> io::Result<Prepared> {
    // orphans of the tree become our children, so they stay our descendants (whose
    // sockets Yama lets us take) and we can wait for them
    // SAFETY: prctl on ourselves.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let (ours, theirs) = filter::socketpair()?;
    let prog = filter::program(&filter::trapped(connect));
    let fd = theirs.as_raw_fd();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: die_with() and install() make syscalls only, and `prog` moves into the closure.
    unsafe { cmd.pre_exec(move || filter::die_with(parent).and_then(|()| filter::install(&prog, fd))) };
    Ok(Prepared { ours, env: env.clone(), theirs: Some(theirs) })
}

impl Prepared {
    /// After the child started: the supervisor, or why the child runs without a filter.
    pub fn start(mut self) -> Result<Supervisor, String> {
        drop(self.theirs.take());
        let listener = filter::receive(&self.ours)?;
        let env = std::mem::take(&mut self.env);
        let process = Process::from_vars(&|k| env.get(k).map(OsString::from).or_else(|| std::env::var_os(k)));
        std::thread::Builder::new()
            .name("styxy-seccomp".into())
            .spawn(move || supervisor::run(listener, &process))
            .map(Supervisor)
            .map_err(|e| format!("cannot start the supervisor: {e}"))
    }
}

/// The supervisor's thread: it ends when no process uses the filter any more.
pub struct Supervisor(JoinHandle<()>);

impl Supervisor {
    /// Once the command has exited: stays until the tree's last process has gone —
    /// without the supervisor their bind and connect calls would fail (`ENOSYS`) —
    /// reaping each (we are their subreaper). A built-in daemon the tree started is not
    /// waited for: it serves everyone, and after its start it makes no call the filter
    /// traps (its binds carry the tag).
    pub fn wait_for_tree(self) {
        let daemon = || std::fs::read_to_string(paths::daemon_pid_path()).ok().and_then(|p| p.trim().parse::<i32>().ok());
        loop {
            let (left, d) = (orphans(), daemon());
            if !left.is_empty() && left.iter().all(|p| Some(*p) == d) {
                return;
            }
            let mut status = 0;
            // SAFETY: waitpid with a valid out-pointer.
            if unsafe { libc::waitpid(-1, &mut status, 0) } < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break; // ECHILD: none left
            }
        }
        // the filter's last user is gone: the supervisor sees it at once (bounded all the same)
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.0.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Our children: the tree's orphans, once the command has exited.
pub fn orphans() -> Vec<i32> {
    procinfo::children_by_scan(std::process::id()).into_iter().filter_map(|p| i32::try_from(p).ok()).collect()
}
