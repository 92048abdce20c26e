//! `styxy-preload daemon run|start|stop|status`.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use styxy_preload_common::http::{self, Endpoint, Timeouts};
use styxy_preload_common::paths;
use styxy_preload_common::procinfo::ProcId;
use styxy_preload_common::{discovery, envvars};
use styxy_preload_daemon::{upstream, Options, RunError};

use crate::cli::{DaemonCommand, DaemonRunArgs};
use crate::coordinator::{self, PROBE};

fn options(a: &DaemonRunArgs) -> Result<Options, String> {
    let upstream = match (&a.upstream, a.no_upstream) {
        (_, true) => None,
        (Some(url), _) => Some((Endpoint::parse(url).map_err(|e| format!("--upstream {e}"))?.with_token(discovery::styxy_token()), true)),
        (None, false) => Some(discovery::upstream()?),
    };
    Ok(Options {
        idle_exit: (a.idle_exit > 0).then(|| Duration::from_secs(a.idle_exit)),
        http: a.http,
        grace: Duration::from_secs(a.grace),
        upstream: upstream
            .map(|(ep, named)| upstream::Config { named, ..upstream::Config::with_expiry(ep, Duration::from_secs(a.upstream_expiry)) }),
        ..Options::default()
    })
}

fn args_of(a: &DaemonRunArgs) -> Vec<String> {
    let mut v = vec!["--idle-exit".to_string(), a.idle_exit.to_string(), "--grace".into(), a.grace.to_string()];
    if let Some(h) = a.http {
        v.extend(["--http".to_string(), h.to_string()]);
    }
    if let Some(u) = &a.upstream {
        v.extend(["--upstream".to_string(), u.clone()]);
    }
    if a.no_upstream {
        v.push("--no-upstream".into());
    }
    v.extend(["--upstream-expiry".to_string(), a.upstream_expiry.to_string()]);
    v
}

pub fn run(cmd: DaemonCommand) -> Result<i32, String> {
    match cmd {
        DaemonCommand::Run(a) => {
            let report = start_report();
            match styxy_preload_daemon::run(options(&a)?) {
                Ok(()) => Ok(0),
                // the one that runs answers whoever started this one
                Err(e @ RunError::AlreadyRunning) => Err(format!("{e}; stop it with `styxy-preload daemon stop`")),
                Err(e) => {
                    if let Some(mut r) = report {
                        let _ = writeln!(r, "{e}");
                    }
                    Err(e.to_string())
                }
            }
        }
        DaemonCommand::Start(a) => {
            let ep = coordinator::start_daemon(&args_of(&a))?;
            println!("styxy-preload daemon answers at {ep} (log: {})", paths::daemon_log_path().display());
            Ok(0)
        }
        DaemonCommand::Stop => stop(),
        DaemonCommand::Status => {
            let ep = coordinator::local()?;
            match http::call(&ep, "GET", "/status", None, PROBE) {
                Ok(r) if r.status == 200 => {
                    let v: serde_json::Value = r.json().map_err(|e| e.to_string())?;
                    println!(
                        "running at {ep}: pid {}, up {}s, {} allocations, {}",
                        v["pid"],
                        v["uptime"],
                        v["allocations"],
                        super::status::run_mode(&v)
                    );
                    Ok(0)
                }
                _ => {
                    println!("not running (no answer at {ep}); start it with `styxy-preload daemon start`");
                    Ok(3)
                }
            }
        }
    }
}

/// The pipe `coordinator::start_daemon` waits on (`envvars::START_FD`), taken out of the
/// environment and made close-on-exec; only a pipe is taken, never another fd the
/// variable happens to name.
fn start_report() -> Option<std::fs::File> {
    let v = std::env::var_os(envvars::START_FD)?;
    // before any thread exists
    std::env::remove_var(envvars::START_FD);
    let fd: i32 = v.to_str()?.parse().ok().filter(|fd| *fd > 2)?;
    // SAFETY: fstat into a zeroed stat; fcntl on the same fd.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0
            || st.st_mode & libc::S_IFMT != libc::S_IFIFO
            || libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) != 0
        {
            return None;
        }
        Some(std::fs::File::from_raw_fd(fd))
    }
}

fn daemon_pid() -> Option<i32> {
    let v: serde_json::Value = http::call(&coordinator::local().ok()?, "GET", "/status", None, PROBE).ok()?.json().ok()?;
    v["pid"].as_i64().map(|p| p as i32)
}

fn stop() -> Result<i32, String> {
    let ep = coordinator::local()?;
    let Some(pid) = daemon_pid() else {
        println!("not running (no answer at {ep})");
        return Ok(0);
    };
    // the daemon as it runs now: a pid reused after it exits is not taken for it
    let id = ProcId::of(pid as u32);
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let alive = || id.is_some_and(|id| id.alive());
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !discovery::answers(&ep, Timeouts { total: Duration::from_millis(200), ..PROBE }) && !alive() {
            println!("stopped (pid {pid})");
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !alive() {
        println!("stopped (pid {pid}); its socket still answers: another daemon serves it");
        return Ok(0);
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    println!("killed (pid {pid}) after it ignored SIGTERM for 5 s");
    Ok(0)
}
