//! `styxy-preload`: run tools with coordinated ports, and see what was remapped.
//!
//! A thin binary: argument parsing in `cli`, one module per command in `cmd`.

mod cli;
mod cmd;
mod coordinator;
mod elf;
mod libpath;
mod seccomp;
mod tools;

use clap::Parser;

fn main() {
    // Our own sockets (the daemon's test binds, the CLI's requests) must never be
    // hooked, even when an agent set LD_PRELOAD globally. Set before any thread exists.
    // (`status` reports the user's own setting, kept before.)
    cmd::keep_users_disable();
    if std::env::var_os("LD_PRELOAD").is_some_and(|v| v.to_string_lossy().contains("libstyxy_preload")) {
        std::env::set_var(styxy_preload_common::envvars::DISABLE, "1");
    }
    let cli = cli::Cli::parse();
    if quiet_on_closed_pipe(&cli.command) {
        // SAFETY: restoring the default disposition of SIGPIPE before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let code = match cmd::run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("styxy-preload: {}", styxy_preload_common::text::lines(&e));
            1
        }
    };
    std::process::exit(code);
}

/// Commands that print for a person or a pipe end quietly, as `ls` does, when the reader
/// goes away (`styxy-preload ports | head -1`): SIGPIPE ends them. Not the daemon, nor
/// `exec` (a supervisor its program may depend on): they keep Rust's ignored SIGPIPE and
/// see `EPIPE` on their sockets.
fn quiet_on_closed_pipe(cmd: &cli::Command) -> bool {
    !matches!(cmd, cli::Command::Exec(_) | cli::Command::Daemon(cli::DaemonCommand::Run(_)))
}
