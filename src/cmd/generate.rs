//! `styxy-preload generate completions|man DIR`: the shell completions and man pages,
//! generated from the command line's own definition (`cli.rs`), for packagers.
//! `packaging/` holds the generated files; a test fails when they are stale.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::{Cli, Generated};

const NAME: &str = "styxy-preload";

pub fn run(what: Generated, dir: &Path) -> Result<i32, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let cmd = Cli::command();
    let fail = |e: std::io::Error| format!("cannot write into {}: {e}", dir.display());
    match what {
        Generated::Completions => {
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                let path = clap_complete::generate_to(shell, &mut cmd.clone(), NAME, dir).map_err(fail)?;
                println!("{}", path.display());
            }
        }
        Generated::Man => {
            clap_mangen::generate_to(cmd, dir).map_err(fail)?;
            let mut pages: Vec<String> = std::fs::read_dir(dir)
                .map_err(fail)?
                .flatten()
                .map(|e| e.path().display().to_string())
                .filter(|p| p.ends_with(".1"))
                .collect();
            pages.sort();
            for p in pages {
                println!("{p}");
            }
        }
    }
    Ok(0)
}
