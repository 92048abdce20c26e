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

/// The session named on the command line, checked against Styxy's instance-id rules.
pub fn session_arg(name: Option<String>) -> Result<Option<String>, String> {
    match name {
        Some(n) if styxy_preload_client::api::valid_instance_id(&n) => Ok(Some(n)),
        Some(n) => Err(format!("session name '{n}' is invalid: use 1-100 characters of A-Z, a-z, 0-9, _ and -")),
        None => Ok(styxy_preload_client::session::from_env()),
    }
}
