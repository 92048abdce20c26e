//! `styxy-preload exec -- CMD`: run CMD in a session with the library loaded, forward
//! signals, exit with its status, and clean up after its tree.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::json;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::SignalsInfo;
use signal_hook::low_level::siginfo::Cause;
use styxy_preload_common::api::{AllocateReply, AllocateRequest};
use styxy_preload_common::eventlog::{self, Action};
use styxy_preload_common::http::{self, Endpoint, Timeouts};
use styxy_preload_common::policy::Policy;
use styxy_preload_common::{discovery, envvars, paths, session};

use styxy_preload_core::process::seccomp_filters;
use styxy_preload_core::report::stderr_file;

use crate::cli::ExecArgs;
use crate::{coordinator, elf, libpath, seccomp, tools};

pub fn run(a: ExecArgs) -> Result<i32, String> {
    let lib = libpath::find()?;
    let session = super::session_arg(a.session.clone())?.unwrap_or_else(session::new_id);
    a.ports.iter().try_for_each(|spec| super::port_spec(spec))?;
    let endpoint = coordinator_of(&a)?;
    if let Some(ep) = &endpoint {
        coordinator::anchor(ep, &session, std::process::id());
    }
    let program = a.cmd.first().ok_or("no command given")?.clone();
    let seccomp = use_seccomp(a.seccomp, a.no_seccomp, &program);
    let mut env = environment(&a, &lib, &session, endpoint.as_ref(), seccomp);
    let mut argv: Vec<String> = a.cmd.clone();
    if !a.ports.is_empty() {
        let ep = endpoint.as_ref().ok_or("--port needs a coordinator, and none answers (drop --no-start-daemon)")?;
        hand_ports(&a, ep, &session, &mut env, &mut argv[1..])?;
    }
    if let Some(ep) = &endpoint {
        hand_port_argument(&a, ep, &session, &mut argv)?;
    }
    let args = &argv[1..];

    let started_ms = eventlog::now_ms();
    let signals = SignalsInfo::<WithOrigin>::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| format!("cannot handle signals: {e}"))?;
    let mut cmd = Command::new(&program);
    cmd.args(args).envs(&env).env_remove(envvars::DISABLE);
    if a.no_seccomp {
        cmd.env_remove(envvars::CLI);
    }
    // connect is trapped only where it can be virtualised: with the daemon's port map
    let connect = endpoint.is_some();
    let prepared = seccomp.then(|| seccomp::prepare(&mut cmd, &env, connect)).transpose().map_err(|e| format!("seccomp mode: {e}"))?;
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Ok(not_started(&program, &e)),
    };
    let supervisor = prepared
        .map(|p| p.start())
        .and_then(|r| r.map_err(|why| eprintln!("styxy-preload: seccomp mode is off ({why}); {program} runs without it")).ok());
    let handle = signals.handle();
    let tree = Arc::new(AtomicBool::new(false));
    let forwarder = forward_signals(signals, child.id() as i32, tree.clone());
    let status = child.wait().map_err(|e| format!("waiting for {program}: {e}"))?;
    if let Some(supervisor) = supervisor {
        tree.store(true, Ordering::Release);
        supervisor.wait_for_tree();
    }
    handle.close();
    let _ = forwarder.join();
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));

    // the daemon frees what dead processes held (and releases it in its upstream Styxy);
    // live ones (daemonised servers, other processes of the session) keep theirs
    if let Some(ep) = &endpoint {
        let _ = http::call(ep, "POST", "/cleanup", Some(b"{}"), Timeouts::CLI);
    }
    if !a.quiet {
        summary(&session, started_ms);
    }
    Ok(code)
}

/// The local daemon, started if need be; with `--no-start-daemon`, the one that answers,
/// or none (said on stderr: ports then pass through).
fn coordinator_of(a: &ExecArgs) -> Result<Option<Endpoint>, String> {
    if !a.no_start_daemon {
        return Ok(Some(coordinator::ensure()?));
    }
    let ep = coordinator::local()?;
    let up = discovery::answers(&ep, coordinator::PROBE);
    if !up {
        eprintln!("styxy-preload: the daemon does not answer at {ep} and --no-start-daemon is set: ports pass through uncoordinated");
    }
    Ok(up.then_some(ep))
}

/// What the command's tree gets in its environment: the library, the session, the
/// coordinator and its types, the mode, and the settings `exec`'s flags name.
fn environment(a: &ExecArgs, lib: &std::path::Path, session: &str, endpoint: Option<&Endpoint>, seccomp: bool) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("LD_PRELOAD".into(), libpath::preload_value(lib));
    env.insert(envvars::SESSION.into(), session.to_string());
    if let Some(ep) = endpoint {
        env.insert(envvars::URL.into(), ep.to_string());
        if let Some(types) = coordinator_types(ep) {
            env.insert(envvars::TYPES.into(), types);
        }
        if let Some(ns) = coordinator::netns(ep) {
            env.insert(envvars::NETNS.into(), ns.to_string());
        }
    }
    match a.mode {
        Some(m) => {
            env.insert(envvars::MODE.into(), m.as_env().into());
        }
        // a tool that falls back by itself, or a Node program whose project finds its
        // port with get-port & co.: let its own fallback happen, so it reports the truth
        None if tools::falls_back(&a.cmd) || std::env::current_dir().is_ok_and(|cwd| tools::finds_ports_itself(&a.cmd, &cwd)) => {
            env.insert(envvars::MODE.into(), "fallback".into());
        }
        None => {}
    }
    if a.no_isolate {
        env.insert(envvars::ISOLATE.into(), "0".into());
    }
    if let Some(id) = stderr_file() {
        env.insert(envvars::STDERR.into(), id);
    }
    // static and Go programs deeper in the tree: the library runs them under `supervise`
    if let Some(cli) = libpath::cli().filter(|_| !a.no_seccomp) {
        env.insert(envvars::CLI.into(), cli);
    }
    if seccomp {
        env.insert(envvars::SUPERVISED.into(), (seccomp_filters() + 1).to_string());
    }
    env
}

/// `--port`: each variable gets its port in the session (`auto`: the tool's own
/// variables and defaults), in the environment and in place of `{NAME}` in the arguments.
fn hand_ports(a: &ExecArgs, ep: &Endpoint, session: &str, env: &mut BTreeMap<String, String>, args: &mut [String]) -> Result<(), String> {
    let specs: Vec<String> = a
        .ports
        .iter()
        .flat_map(|s| match s.as_str() {
            "auto" => tools::variables(&a.cmd).iter().map(|(var, port)| format!("{var}={port}")).collect(),
            _ => vec![s.clone()],
        })
        .collect();
    for spec in &specs {
        let (name, port) = preallocate(ep, session, spec)?;
        let token = format!("{{{name}}}");
        for arg in args.iter_mut() {
            *arg = arg.replace(&token, &port.to_string());
        }
        env.insert(name, port.to_string());
    }
    Ok(())
}

/// A tool that takes its port as an argument (hugo, mkdocs, http-server, Jupyter): the
/// port its arguments name, or with `--port auto` its default, is allocated in the
/// session and handed to it there, so that it binds that port and prints it.
fn hand_port_argument(a: &ExecArgs, ep: &Endpoint, session: &str, argv: &mut Vec<String>) -> Result<(), String> {
    let Some(arg) = tools::arg_port(argv) else { return Ok(()) };
    let auto = a.ports.iter().any(|p| p == "auto");
    let Some(asked) = arg.asked().or(auto.then_some(arg.spec.default)) else { return Ok(()) };
    let (_, port) = preallocate(ep, session, &format!("{}={asked}", arg.spec.tool))?;
    arg.set(argv, port);
    Ok(())
}

/// A command that could not be started: said as a shell would, with its exit code.
fn not_started(program: &str, e: &std::io::Error) -> i32 {
    let (code, what) = match e.kind() {
        std::io::ErrorKind::NotFound => (127, "command not found"),
        std::io::ErrorKind::PermissionDenied => (126, "permission denied"),
        _ => (126, "cannot execute"),
    };
    eprintln!("styxy-preload: {program}: {what}");
    code
}

/// Forwards the signals sent to us to the command (to its whole tree once it has exited
/// under the supervisor), until the signals' handle is closed.
fn forward_signals(mut signals: SignalsInfo<WithOrigin>, pid: i32, tree: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for origin in signals.forever() {
            // A terminal's ^C already reached the child (same process group): forward
            // only signals sent to us by a process (kill, a supervisor).
            if !matches!(origin.cause, Cause::Kernel) {
                let to = if tree.load(Ordering::Acquire) { seccomp::orphans() } else { vec![pid] };
                for p in to {
                    // SAFETY: plain kill(2) of our own child.
                    unsafe { libc::kill(p, origin.signal) };
                }
            }
        }
    })
}

/// The coordinator's service types (`GET /config`), when they differ from Styxy's
/// built-in table: a user's own types in `~/.styxy/config.json` are then coordinated
/// too, under names Styxy knows. One request per `exec`.
fn coordinator_types(ep: &Endpoint) -> Option<String> {
    let r = http::call(ep, "GET", "/config", None, Timeouts::CLI).ok().filter(|r| r.status == 200)?;
    let cfg: serde_json::Value = r.json().ok()?;
    let mut theirs = Policy::default();
    if !theirs.apply_config(&cfg) || theirs.types == Policy::default().types {
        return None;
    }
    Some(json!({ "service_types": cfg["service_types"] }).to_string())
}

/// Programs that run their command as another user: the library in that user's processes
/// cannot reach the session owner's private socket, the seccomp supervisor (this process)
/// answers for them.
const USER_SWITCHERS: [&str; 5] = ["runuser", "su", "sudo", "setpriv", "doas"];

/// `--seccomp`, or a static or Go program without `--no-seccomp`; and possible here.
fn use_seccomp(asked: bool, refused: bool, program: &str) -> bool {
    let base = program.rsplit('/').next().unwrap_or(program);
    let why = match elf::resolve(program).map(|p| elf::kind(&p)) {
        Some(elf::Kind::Static) => Some("is statically linked: LD_PRELOAD does not reach it"),
        Some(elf::Kind::Go) => Some("is a Go program: its net package makes raw syscalls that LD_PRELOAD does not see"),
        _ if USER_SWITCHERS.contains(&base) => {
            Some("runs its command as another user, whose processes cannot reach this session's daemon (its socket is private)")
        }
        _ => None,
    };
    if !asked && (refused || why.is_none()) {
        if let Some(why) = why {
            eprintln!("styxy-preload: {program} {why}; its ports are not coordinated (drop --no-seccomp, or use --port NAME=TYPE)");
        }
        return false;
    }
    match seccomp::unavailable() {
        None => true,
        Some(reason) => {
            let uncoordinated = if why.is_some() { ": its ports are not coordinated" } else { "" };
            eprintln!("styxy-preload: seccomp mode is off ({reason}); {program} runs without it{uncoordinated}");
            false
        }
    }
}

/// `--port NAME[=TYPE|=PORT]` (its NAME checked by `port_spec`): allocate in the session
/// before the command starts.
fn preallocate(ep: &Endpoint, session: &str, spec: &str) -> Result<(String, u16), String> {
    let (name, what) = spec.split_once('=').unwrap_or((spec, "dev"));
    let policy = Policy::from_env().0;
    let (ty, requested) = match what.parse::<u16>() {
        Ok(0) => return Err(format!("--port {spec}: port 0 is not a port to coordinate")),
        Ok(p) => (policy.decide(p).service_type().unwrap_or("dev").to_string(), p),
        Err(_) => {
            let t = policy
                .service_type(what)
                .ok_or_else(|| format!("--port {spec}: unknown service type '{what}'; known: {}", known(&policy)))?;
            (t.name.clone(), t.preferred.first().copied().unwrap_or(t.range.0))
        }
    };
    let reply = allocate(ep, session, &ty, requested, std::process::id())?;
    Ok((name.to_string(), reply.0))
}

fn known(p: &Policy) -> String {
    p.types.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// Allocates `requested` (or another port of `ty`) for `session`, owned by `pid`.
pub fn allocate(ep: &Endpoint, session: &str, ty: &str, requested: u16, pid: u32) -> Result<(u16, Option<String>), String> {
    let req = AllocateRequest {
        service_name: Some(format!("styxy-preload-{requested}")),
        instance_id: Some(session.to_string()),
        pid: Some(pid),
        project_path: std::env::current_dir().ok().map(|d| d.to_string_lossy().into_owned()),
        ..AllocateRequest::for_port(ty, requested)
    };
    let body = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
    let res =
        http::call(ep, "POST", "/allocate", Some(&body), Timeouts::CLI).map_err(|e| format!("allocating a {ty} port at {ep}: {e}"))?;
    let reply: AllocateReply = res.json().map_err(|e| e.to_string())?;
    match reply.port_and_lock() {
        Some((port, lock)) => Ok((port, lock.map(str::to_string))),
        None => Err(format!("the coordinator refused a {ty} port: {}", reply.error.unwrap_or_else(|| format!("HTTP {}", res.status)))),
    }
}

fn summary(session: &str, since_ms: u64) {
    let Ok(events) = eventlog::read_all(&paths::event_log_path()) else {
        return;
    };
    let mut remaps: Vec<String> = Vec::new();
    // one entry per remap, however often it was bound (a reloader's restarts, twins)
    for e in events.iter().filter(|e| e.ts >= since_ms && e.session.as_deref() == Some(session) && e.action == Action::Remapped) {
        let line = format!("{}→{} ({})", e.requested_port, e.port, styxy_preload_common::text::cell(&e.comm));
        if !remaps.contains(&line) {
            remaps.push(line);
        }
    }
    if !remaps.is_empty() {
        let n = remaps.len();
        eprintln!("styxy-preload: session {session}: {n} port{} remapped: {}", if n == 1 { "" } else { "s" }, remaps.join(", "));
    }
}
