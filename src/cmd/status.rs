//! `styxy-preload status`: a doctor. Each problem comes with its fix; exit 1 when
//! something is broken.

use std::ffi::CString;
use std::time::{Duration, Instant};

use styxy_preload_common::http::{self, Endpoint};
use styxy_preload_common::{envvars, paths, policy::Policy, session, switch};

use crate::coordinator::{self, PROBE};
use crate::{libpath, seccomp};

/// `STYXY_PRELOAD_DISABLE` as the user set it, before `main` set it for this process's
/// own sockets.
static USERS_DISABLE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Keeps the user's `STYXY_PRELOAD_DISABLE`; called by `main` before it changes it.
pub fn keep_users_disable() {
    let _ = USERS_DISABLE.set(std::env::var(envvars::DISABLE).ok());
}

fn users_disable() -> bool {
    let users = USERS_DISABLE.get().cloned().unwrap_or_else(|| std::env::var(envvars::DISABLE).ok());
    switch::disables(users.as_deref().map(str::as_bytes))
}

pub fn run() -> Result<i32, String> {
    let mut broken = 0;
    let mut bad = |what: String, fix: String| {
        println!("✗ {what}\n    fix: {fix}");
        broken += 1;
    };
    match libpath::find() {
        Ok(lib) => match loadable(&lib) {
            Ok(()) => println!("✓ library: {} (loads)", lib.display()),
            Err(e) => {
                bad(format!("library {} does not load: {e}", lib.display()), "rebuild with `cargo build --release --workspace`".into())
            }
        },
        Err(e) => bad(format!("library: {e}"), "build it with `cargo build --release --workspace`, or set STYXY_PRELOAD_LIB".into()),
    }
    preload_order(&mut bad);
    let mut policy = Policy::default();
    match coordinator::local() {
        Err(e) => {
            bad(format!("coordinator: {e}"), "set STYXY_URL to unix:/path/to/daemon.sock or http://127.0.0.1:9876, or unset it".into())
        }
        Ok(ep) => {
            daemon(&ep, &mut bad);
            // the daemon's types (the user's own from Styxy's config.json too) are what rules may name
            if let Some(cfg) = http::call(&ep, "GET", "/config", None, PROBE).ok().and_then(|r| r.json::<serde_json::Value>().ok()) {
                policy.apply_config(&cfg);
            }
        }
    }
    let mode = std::env::var(envvars::MODE).unwrap_or_else(|_| "coordinate".into());
    if !["coordinate", "on-conflict", "observe", "fallback"].contains(&mode.as_str()) {
        bad(format!("STYXY_PRELOAD_MODE={mode} is not a mode"), "use coordinate, on-conflict, observe or fallback".into());
    } else {
        println!("✓ mode: {mode}{}", if users_disable() { " (but STYXY_PRELOAD_DISABLE is set: the hooks do nothing)" } else { "" });
    }
    if let Err(e) = policy.add_rules(&std::env::var(envvars::PORTS).unwrap_or_default()) {
        bad(format!("STYXY_PRELOAD_PORTS: {e}"), "fix the rule, e.g. STYXY_PRELOAD_PORTS=\"7000-7099=ui,9000=off\"".into());
    }
    match session::from_env() {
        Some(s) => println!("✓ session: {s}"),
        None => println!("· session: none in this shell (exec makes one)"),
    }
    match seccomp::unavailable() {
        None => println!("✓ seccomp mode: available (exec uses it for static and Go programs, or with --seccomp)"),
        Some(why) => println!("· seccomp mode: unavailable ({why}); static and Go programs are not coordinated"),
    }
    let log = paths::event_log_path();
    match std::fs::metadata(&log) {
        Ok(m) => println!("✓ log: {} ({} bytes)", log.display(), m.len()),
        Err(_) => println!("· log: {} (nothing logged yet)", log.display()),
    }
    Ok(if broken > 0 { 1 } else { 0 })
}

/// Another preload library listed before ours in `LD_PRELOAD` (Styxy's own shim, say)
/// gets every `bind()` first: if it does not hand the call on, ours never sees it.
fn preload_order(bad: &mut impl FnMut(String, String)) {
    let list = std::env::var("LD_PRELOAD").unwrap_or_default();
    let libs: Vec<&str> = list.split([':', ' ']).filter(|l| !l.is_empty()).collect();
    let Some(ours) = libs.iter().position(|l| l.contains("libstyxy_preload")) else { return };
    if ours > 0 {
        bad(
            format!(
                "LD_PRELOAD lists {} before {}: its bind() and connect() run first, and ours may never be called",
                libs[..ours].join(", "),
                libs[ours]
            ),
            format!("put {} first in LD_PRELOAD (or run the command with `styxy-preload exec`)", libs[ours]),
        );
    }
}

/// How the daemon that answered `GET /status` with `v` runs, in words.
pub fn run_mode(v: &serde_json::Value) -> String {
    match v["run_mode"].as_str() {
        Some("socket-activated") => "socket-activated (systemd starts it on the first connection)".into(),
        Some("on-demand") => "started on demand by styxy-preload (exits when idle)".into(),
        Some("foreground") => "run in the foreground (styxy-preload daemon run)".into(),
        other => format!("run mode {}", other.unwrap_or("unknown")),
    }
}

fn loadable(path: &std::path::Path) -> Result<(), String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: dlopen with RTLD_LOCAL never interposes on this process; the handle is closed.
    unsafe {
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if h.is_null() {
            let e = libc::dlerror();
            return Err(if e.is_null() { "dlopen failed".into() } else { std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned() });
        }
        libc::dlclose(h);
    }
    Ok(())
}

/// The local daemon's line, and its upstream Styxy's.
fn daemon(ep: &Endpoint, bad: &mut impl FnMut(String, String)) {
    let mut times = Vec::new();
    let mut last = Err(String::new());
    for _ in 0..5 {
        let t = Instant::now();
        last = match http::call(ep, "GET", "/status", None, PROBE) {
            Ok(r) if r.status == 200 => r.json::<serde_json::Value>().map_err(|e| e.to_string()),
            Ok(r) => Err(format!("HTTP {}", r.status)),
            Err(e) => Err(e.to_string()),
        };
        times.push(t.elapsed().as_micros());
        if last.is_err() {
            break;
        }
    }
    times.sort_unstable();
    let v = match last {
        Ok(v) => v,
        Err(e) => {
            return bad(
                format!("coordinator: the daemon does not answer at {ep} ({e})"),
                "start it with `styxy-preload daemon start` (exec starts it by itself); if another user owns that directory, set XDG_RUNTIME_DIR to a private one".into(),
            )
        }
    };
    println!("✓ coordinator: built-in daemon at {ep} (pid {}, /status median {} µs)", v["pid"], times[times.len() / 2]);
    println!("✓ daemon: {}", run_mode(&v));
    let up = &v["upstream"];
    if up.is_null() {
        println!("· upstream: none (the daemon runs with --no-upstream)");
        return;
    }
    let url = up["url"].as_str().unwrap_or("?");
    let when =
        |k: &str| up[k].as_u64().map(|ms| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string());
    if up["refused"].as_bool() == Some(true) {
        return bad(
            format!(
                "upstream: Styxy at {url} refuses the token (401): nothing is mirrored there, its other clients do not see these ports"
            ),
            "put Styxy's token in ~/.styxy/auth.token or STYXY_TOKEN (then `styxy-preload daemon stop`; the next exec restarts it)".into(),
        );
    }
    if let Some(why) = up["untrusted"].as_str() {
        return bad(
            format!("upstream: Styxy not used: {why}"),
            "stop whatever listens there and start Styxy as yourself, or name the one to use with STYXY_URL".into(),
        );
    }
    if up["busy"].as_bool() == Some(true) {
        println!(
            "· upstream: Styxy at {url} runs but does not answer (busy); grants wait for it at most {} ms",
            styxy_preload_daemon::upstream::STALE_WAIT.as_millis()
        );
        return;
    }
    if up["reachable"].as_bool() != Some(true) {
        println!("· upstream: Styxy at {url} is not reachable; ports are granted here and mirrored once it answers");
        return;
    }
    let mut facts = vec![format!("reachable, {} allocations mirrored", up["mirrored"])];
    if up["served"].as_u64().unwrap_or(0) > 0 {
        facts.push(format!("{} served and guarded by Styxy's own test-bind", up["served"]));
    }
    if up["pending"].as_u64().unwrap_or(0) > 0 {
        facts.push(format!("{} waiting", up["pending"]));
    }
    if let Some(t) = when("last_429_ms") {
        facts.push(format!("last 429 at {t}"));
    }
    println!("✓ upstream: Styxy at {url} ({})", facts.join(", "));
    let conflicts = up["conflicts"].as_u64().unwrap_or(0);
    if conflicts > 0 {
        println!("! upstream: {conflicts} port(s) granted here are held in Styxy by another client (see `styxy-preload log`)");
    }
}
