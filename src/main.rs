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
    if std::env::var_os("LD_PRELOAD").is_some_and(|v| v.to_string_lossy().contains("libstyxy_preload")) {
        std::env::set_var("STYXY_PRELOAD_DISABLE", "1");
    }
    let cli = cli::Cli::parse();
    let code = match cmd::run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("styxy-preload: {}", styxy_preload_common::text::lines(&e));
            1
        }
    };
    std::process::exit(code);
}
