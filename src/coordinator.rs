//! The local daemon for the CLI: where it answers, and starting it in the background
//! when it does not. The CLI, like the hooks, asks only the local daemon; Styxy is the
//! daemon's upstream (docs/ARCHITECTURE.md "One path").

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use styxy_preload_client::discovery;
use styxy_preload_client::http::{Endpoint, Timeouts};
use styxy_preload_client::paths;

/// Quick probes: a local coordinator answers `/status` in well under a millisecond.
pub const PROBE: Timeouts = Timeouts { connect: Duration::from_millis(200), total: Duration::from_secs(1), max_body: 1 << 20 };

/// The local daemon's endpoint (`STYXY_URL` when it names a Unix socket).
pub fn local() -> Result<Endpoint, String> {
    discovery::local_socket().map(Endpoint::Unix)
}

/// The local daemon, started when it does not answer.
pub fn ensure() -> Result<Endpoint, String> {
    start_daemon(&[])
}

/// Starts `styxy-preload daemon run` detached (own session, stderr to the daemon log)
/// and waits until its socket answers. The daemon finds the user's Styxy itself (the
/// environment it inherits: `STYXY_URL`, `STYXY_DAEMON_HOST`/`PORT`, the token).
pub fn start_daemon(extra: &[String]) -> Result<Endpoint, String> {
    let ep = local()?;
    if discovery::answers(&ep, PROBE) {
        return Ok(ep);
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let state = paths::state_dir();
    paths::ensure_private_dir(&state).map_err(|e| format!("cannot create {}: {e}", state.display()))?;
    let log_path = paths::daemon_log_path();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("daemon").arg("run").args(extra).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    cmd.env("STYXY_PRELOAD_DISABLE", "1").env_remove("LD_PRELOAD").env(styxy_preload_daemon::activation::LAUNCH_ENV, "on-demand");
    // SAFETY: setsid, fork and _exit are async-signal-safe. The daemon gets its own
    // session, and the intermediate process exits at once, so the daemon is adopted
    // by init and never lingers as a zombie of ours.
    unsafe {
        cmd.pre_exec(|| {
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
    // If another daemon won the race for the per-user lock, it is the one that answers.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if discovery::answers(&ep, PROBE) {
            return Ok(ep);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!("the daemon did not answer within 5 s; see {}", log_path.display()))
}

/// Keeps the daemon up while `pid` (an `env` shell, an `exec`) runs: its sessions may
/// ask at any time, so the daemon must not idle out under them.
pub fn anchor(ep: &Endpoint, session: &str, pid: u32) {
    let body = serde_json::json!({"instance_id": session, "pid": pid}).to_string();
    let _ = styxy_preload_client::http::call(ep, "POST", "/instance/register", Some(body.as_bytes()), PROBE);
}
