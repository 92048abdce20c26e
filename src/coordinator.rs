//! The local daemon for the CLI: where it answers, and starting it in the background
//! when it does not. The CLI, like the hooks, asks only the local daemon; Styxy is the
//! daemon's upstream (docs/ARCHITECTURE.md "One path").

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use styxy_preload_common::api::FlushReply;
use styxy_preload_common::http::{self, Endpoint, Timeouts};
use styxy_preload_common::paths;
use styxy_preload_common::{discovery, envvars};

/// Quick probes: a local coordinator answers `/status` in well under a millisecond.
pub const PROBE: Timeouts = Timeouts { connect: Duration::from_millis(200), total: Duration::from_secs(1), max_body: 1 << 20 };

/// The local daemon's endpoint (`STYXY_URL` when it names a Unix socket).
pub fn local() -> Result<Endpoint, String> {
    discovery::local_socket().map(Endpoint::Unix)
}

/// Lets the local daemon finish logging the binds it granted through the shim's socket,
/// so that the event log read next holds them (docs/ARCHITECTURE.md "Hook ↔ daemon
/// protocol"). Asked again while the daemon still owes events (a loaded machine), for at
/// most 2 s. No daemon, or no answer within its bound: nothing to wait for.
pub fn settle_log() {
    let Ok(ep) = local() else { return };
    let until = Instant::now() + Duration::from_secs(2);
    while let Ok(r) = http::call(&ep, "POST", "/flush", None, PROBE) {
        if !FlushReply::owes(&r.body) || Instant::now() > until {
            return;
        }
    }
}

/// The local daemon, started when it does not answer.
pub fn ensure() -> Result<Endpoint, String> {
    start_daemon(&[])
}

/// The runtime directory can hold the daemon's socket, lock and port map: ours, private,
/// and writable by us.
fn usable(dir: &Path) -> std::io::Result<()> {
    paths::ensure_private_dir(dir)?;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: access(2) on a NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Starts `styxy-preload daemon run` detached (own session, stderr to the daemon log)
/// and waits until its socket answers, or until it has exited (then with the reason it
/// gave). The daemon finds the user's Styxy itself (the environment it inherits:
/// `STYXY_URL`, `STYXY_DAEMON_HOST`/`PORT`, the token).
pub fn start_daemon(extra: &[String]) -> Result<Endpoint, String> {
    let ep = local()?;
    if discovery::answers(&ep, PROBE) {
        return Ok(ep);
    }
    if http::connect(&ep, PROBE.connect).is_ok() {
        // a socket that accepts connections has a daemon behind it — busy, or being
        // started by socket activation: wait for it, never start a second one
        return answered_within(&ep, BUSY_DAEMON).then_some(ep.clone()).ok_or_else(|| {
            format!("the daemon at {ep} accepts connections but did not answer within {} s: is it stopped?", BUSY_DAEMON.as_secs())
        });
    }
    let run = paths::runtime_dir();
    usable(&run).map_err(|e| format!("cannot use {}: {e}; set XDG_RUNTIME_DIR to a private writable directory", run.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let state = paths::state_dir();
    paths::ensure_private_dir(&state).map_err(|e| format!("cannot create {}: {e}", state.display()))?;
    let log_path = paths::daemon_log_path();
    let log = paths::open_regular(std::fs::OpenOptions::new().create(true).append(true).mode(0o600), &log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let (report, report_w) = pipe().map_err(|e| format!("cannot start the daemon: {e}"))?;
    let wfd = report_w.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg("daemon").arg("run").args(extra).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    cmd.env(envvars::DISABLE, "1").env_remove("LD_PRELOAD").env(envvars::DAEMON_LAUNCH, "on-demand");
    cmd.env(envvars::START_FD, wfd.to_string());
    // SAFETY: fcntl, setsid, fork and _exit are async-signal-safe. The daemon keeps the
    // pipe's write end across exec; it gets its own session, and the intermediate
    // process exits at once, so the daemon is adopted by init and never lingers as a
    // zombie of ours.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(wfd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setsid();
            match libc::fork() {
                0 => Ok(()),
                -1 => Err(std::io::Error::last_os_error()),
                _ => libc::_exit(0),
            }
        });
    }
    let mut intermediate = cmd.spawn().map_err(|e| format!("cannot start the daemon: {e}"))?;
    let _ = intermediate.wait();
    drop(report_w); // the daemon holds the only write end now
    let mut report = Some(std::fs::File::from(report));
    let mut why = Vec::new();
    // If another daemon won the race for the per-user lock, it is the one that answers
    // (the loser exits without a reason).
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if discovery::answers(&ep, PROBE) {
            return Ok(ep);
        }
        match report.as_mut() {
            Some(r) if readable(r, 5) => {
                let mut buf = [0u8; 512];
                match r.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Ok(0) | Err(_) if why.is_empty() => report = None, // exited without a reason
                    Ok(0) | Err(_) => {
                        let why = String::from_utf8_lossy(&why);
                        return Err(format!("the daemon could not start: {}; see {}", why.trim(), log_path.display()));
                    }
                    Ok(n) => why.extend_from_slice(&buf[..n]),
                }
            }
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    Err(format!("the daemon did not answer within 5 s; see {}", log_path.display()))
}

/// How long a client waits for a daemon whose socket accepts connections but that has not
/// answered yet (a machine so busy that a start takes seconds).
const BUSY_DAEMON: Duration = Duration::from_secs(30);

/// Whether the daemon at `ep` answers `/status` within `patience`.
fn answered_within(ep: &Endpoint, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        if discovery::answers(ep, PROBE) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success; we own them from here.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Waits at most `ms` for `f` to be readable (data or end-of-file).
fn readable(f: &std::fs::File, ms: i32) -> bool {
    let mut p = libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// The daemon's network namespace (its `GET /status`), for [`envvars::NETNS`]: a
/// session's process in another namespace is left alone.
pub fn netns(ep: &Endpoint) -> Option<u64> {
    let r = http::call(ep, "GET", "/status", None, PROBE).ok().filter(|r| r.status == 200)?;
    r.json::<serde_json::Value>().ok()?.get("netns")?.as_u64()
}

/// Keeps the daemon up while `pid` (an `env` shell, an `exec`) runs: its sessions may
/// ask at any time, so the daemon must not idle out under them.
pub fn anchor(ep: &Endpoint, session: &str, pid: u32) {
    let body = serde_json::json!({"instance_id": session, "pid": pid}).to_string();
    let _ = styxy_preload_common::http::call(ep, "POST", "/instance/register", Some(body.as_bytes()), PROBE);
}
