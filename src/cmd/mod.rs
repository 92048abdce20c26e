//! One module per command; `run` dispatches.

mod daemon;
mod env;
mod exec;
mod generate;
mod log;
mod port;
mod ports;
mod stats;
mod status;
mod supervise;

use crate::cli::Command;

pub use status::keep_users_disable;

/// Runs a command; `Ok` carries the exit status, `Err` a message for stderr (exit 1).
pub fn run(cmd: Command) -> Result<i32, String> {
    match cmd {
        Command::Exec(a) => exec::run(a),
        Command::Log(a) => log::run(a),
        Command::Ports { json } => ports::run(json),
        Command::Port(a) => port::run(a),
        Command::Env(a) => env::run(a),
        Command::Status => status::run(),
        Command::Stats(a) => stats::run(a),
        Command::Daemon(d) => daemon::run(d),
        Command::Supervise(a) => supervise::run(a),
        Command::Generate { what, dir } => generate::run(what, &dir),
    }
}

/// Styxy's default instance: the daemon takes it for "no session", so a session of
/// that name would lose its own remaps.
const RESERVED_SESSION: &str = "default";

/// The session named on the command line (else inherited from `STYXY_PRELOAD_SESSION`),
/// checked against Styxy's instance-id rules; the reserved name `default` is refused.
pub fn session_arg(name: Option<String>) -> Result<Option<String>, String> {
    let reserved = "is reserved (Styxy's default instance, which the daemon treats as no session)";
    match name {
        Some(n) if n == RESERVED_SESSION => Err(format!("session name '{n}' {reserved}: choose another name")),
        Some(n) if styxy_preload_common::api::valid_instance_id(&n) => Ok(Some(n)),
        Some(n) => Err(format!("session name '{n}' is invalid: use 1-100 characters of A-Z, a-z, 0-9, _ and -")),
        None => match styxy_preload_common::session::from_env() {
            Some(n) if n == RESERVED_SESSION => Err(format!(
                "{}={n}: the session name '{n}' {reserved}: unset it or choose another name",
                styxy_preload_common::envvars::SESSION
            )),
            s => Ok(s),
        },
    }
}

/// Variables that steer how the command runs (its loader, search path, home, shell,
/// identity, our own settings): `exec --port NAME` must never overwrite them.
const RESERVED_VARS: [&str; 20] = [
    "PATH",
    "HOME",
    "SHELL",
    "USER",
    "LOGNAME",
    "PWD",
    "OLDPWD",
    "IFS",
    "TERM",
    "TMPDIR",
    "LANG",
    "TZ",
    "ENV",
    "BASH_ENV",
    "CDPATH",
    "PS1",
    "PS2",
    "PS4",
    "PROMPT_COMMAND",
    "HOSTNAME",
];
const RESERVED_PREFIXES: [&str; 5] = ["LD_", "STYXY_", "XDG_", "LC_", "BASH_FUNC_"];

/// `exec --port NAME[=TYPE|=PORT]`: NAME must be a variable name, and not one the command
/// relies on (`LD_PRELOAD` would silently turn coordination off, `PATH` the command's lookup).
pub fn port_spec(spec: &str) -> Result<(), String> {
    if spec == "auto" {
        return Ok(());
    }
    let name = spec.split_once('=').map_or(spec, |(n, _)| n);
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("--port {spec}: '{name}' is not a valid environment variable name"));
    }
    if RESERVED_VARS.contains(&name) || RESERVED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Err(format!(
            "--port {spec}: {name} is reserved (it steers how the command runs, or styxy-preload itself): choose another name, e.g. PORT"
        ));
    }
    Ok(())
}
