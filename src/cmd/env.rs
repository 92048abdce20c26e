//! `styxy-preload env`: the exports that make every process of a shell coordinated,
//! for agents that set `LD_PRELOAD` globally.

use styxy_preload_common::envvars::{self, CLI, NETNS, SESSION, STDERR, URL};
use styxy_preload_common::session;
use styxy_preload_core::report::stderr_file;

use crate::cli::{EnvArgs, Shell};
use crate::{coordinator, libpath};

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

pub fn run(a: EnvArgs) -> Result<i32, String> {
    let lib = libpath::find()?;
    let session = super::session_arg(a.session)?.unwrap_or_else(session::new_id);
    let endpoint = coordinator::ensure()?;
    // the shell that evaluates these lines anchors the session: the daemon stays while it runs
    // SAFETY: getppid cannot fail.
    coordinator::anchor(&endpoint, &session, unsafe { libc::getppid() } as u32);
    let preload = libpath::preload_value(&lib);
    let mut vars = vec![("LD_PRELOAD", preload), (URL, endpoint.to_string()), (SESSION, session)];
    if let Some(ns) = coordinator::netns(&endpoint) {
        vars.push((NETNS, ns.to_string()));
    }
    // the shell's own `2>log` (this command inherits it): the notice may go there, into no
    // other regular file
    if let Some(id) = stderr_file() {
        vars.push((STDERR, id));
    }
    // static and Go programs: the library runs them under `styxy-preload supervise`
    if let Some(cli) = libpath::cli() {
        vars.push((CLI, cli));
    }
    for (k, v) in vars {
        match a.shell {
            Shell::Bash | Shell::Zsh => println!("export {k}={}", quote(&v)),
            Shell::Fish => println!("set -gx {k} {}", quote(&v)),
        }
    }
    match a.shell {
        Shell::Bash | Shell::Zsh => println!("unset {}", envvars::DISABLE),
        Shell::Fish => println!("set -e {}", envvars::DISABLE),
    }
    Ok(0)
}
