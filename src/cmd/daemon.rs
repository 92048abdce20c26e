//! `styxy-preload daemon run|start|stop|status`.

use std::time::{Duration, Instant};

use styxy_preload_client::discovery;
use styxy_preload_client::http::{self, Timeouts};
use styxy_preload_client::paths;
use styxy_preload_daemon::{Options, RunError};

use crate::cli::{DaemonCommand, DaemonRunArgs};
use crate::coordinator::{self, PROBE};

fn options(a: &DaemonRunArgs) -> Options {
    Options {
        idle_exit: (a.idle_exit > 0).then(|| Duration::from_secs(a.idle_exit)),
        http: a.http,
        grace: Duration::from_secs(a.grace),
        ..Options::default()
    }
}

fn args_of(a: &DaemonRunArgs) -> Vec<String> {
    let mut v = vec!["--idle-exit".to_string(), a.idle_exit.to_string(), "--grace".into(), a.grace.to_string()];
    if let Some(h) = a.http {
        v.extend(["--http".to_string(), h.to_string()]);
    }
    v
}

pub fn run(cmd: DaemonCommand) -> Result<i32, String> {
    match cmd {
        DaemonCommand::Run(a) => match styxy_preload_daemon::run(options(&a)) {
            Ok(()) => Ok(0),
            Err(e @ RunError::AlreadyRunning) => Err(format!("{e}; stop it with `styxy-preload daemon stop`")),
            Err(e) => Err(e.to_string()),
        },
        DaemonCommand::Start(a) => {
            let ep = coordinator::start_daemon(&args_of(&a))?;
            println!("styxy-preload daemon answers at {ep} (log: {})", paths::daemon_log_path().display());
            Ok(0)
        }
        DaemonCommand::Stop => stop(),
        DaemonCommand::Status => {
            let ep = coordinator::builtin();
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

fn daemon_pid() -> Option<i32> {
    let v: serde_json::Value = http::call(&coordinator::builtin(), "GET", "/status", None, PROBE).ok()?.json().ok()?;
    v["pid"].as_i64().map(|p| p as i32)
}

fn stop() -> Result<i32, String> {
    let ep = coordinator::builtin();
    let Some(pid) = daemon_pid() else {
        println!("not running (no answer at {ep})");
        return Ok(0);
    };
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !discovery::answers(&ep, Timeouts { total: Duration::from_millis(200), ..PROBE }) && !alive(pid) {
            println!("stopped (pid {pid})");
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    println!("killed (pid {pid}) after it ignored SIGTERM for 5 s");
    Ok(0)
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks existence.
    unsafe { libc::kill(pid, 0) == 0 }
}
