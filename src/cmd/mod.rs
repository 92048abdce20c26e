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

use crate::cli::Command;

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
        Some(n) if styxy_preload_client::api::valid_instance_id(&n) => Ok(Some(n)),
        Some(n) => Err(format!("session name '{n}' is invalid: use 1-100 characters of A-Z, a-z, 0-9, _ and -")),
        None => match styxy_preload_client::session::from_env() {
            Some(n) if n == RESERVED_SESSION => Err(format!(
                "{}={n}: the session name '{n}' {reserved}: unset it or choose another name",
                styxy_preload_client::session::ENV
            )),
            s => Ok(s),
        },
    }
}
