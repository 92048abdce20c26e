//! Installing: the generated completions and man pages in packaging/ match the command
//! line, and scripts/install.sh gives a working CLI in any prefix (libraries found under
//! <prefix>/lib/styxy-preload) that uninstalls without a trace.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;

fn files_in(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(e.path()).unwrap()))
        .collect()
}

#[test]
fn packaging_holds_what_the_cli_generates() {
    let w = World::new();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for what in ["completions", "man"] {
        let out = run({
            let mut c = w.cli();
            c.args(["generate", what]).arg(w.path(what));
            c
        });
        assert!(out.status.success(), "generate {what}: {}", text(&out.stderr));
        let (fresh, committed) = (files_in(&w.path(what)), files_in(&repo.join("packaging").join(what)));
        let differ = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| {
            a.iter().filter(|(k, v)| b.get(*k) != Some(v)).map(|(k, _)| k.clone()).collect::<Vec<_>>()
        };
        let (changed, gone) = (differ(&fresh, &committed), differ(&committed, &fresh));
        assert!(
            changed.is_empty() && gone.is_empty(),
            "packaging/{what} is stale (new or changed: {changed:?}; no longer generated: {gone:?}): regenerate with \
             `rm -r packaging/{what} && cargo run -q -- generate {what} packaging/{what}`"
        );
    }
    let bash = repo.join("packaging/completions/styxy-preload.bash");
    let out = run({
        let mut c = w.cmd("bash");
        c.arg("-c").arg(format!(". {} && complete -p styxy-preload", bash.display()));
        c
    });
    assert!(out.status.success() && text(&out.stdout).contains("styxy-preload"), "{}", text(&out.stderr));
}

#[test]
fn generate_refuses_what_it_cannot_write() {
    let w = World::new();
    let file = w.path("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = run({
        let mut c = w.cli();
        c.args(["generate", "man"]).arg(&file);
        c
    });
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(&format!("cannot create {}", file.display())), "{}", text(&out.stderr));
}

#[test]
fn install_sh_into_a_prefix_works_from_anywhere_and_uninstalls_cleanly() {
    let w = World::new();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let prefix = w.path("prefix");
    let built = bin().parent().unwrap().to_path_buf(); // World::new put the core beside it
    let script = |args: &[&str]| {
        let mut c = w.cmd(repo.join("scripts/install.sh"));
        c.args(args).arg("--prefix").arg(&prefix);
        run(c)
    };
    let out = script(&["--from", built.to_str().unwrap()]);
    assert!(out.status.success(), "install.sh: {}{}", text(&out.stdout), text(&out.stderr));
    for f in [
        "bin/styxy-preload",
        "lib/styxy-preload/libstyxy_preload.so",
        "share/man/man1/styxy-preload.1",
        "share/bash-completion/completions/styxy-preload",
        "share/zsh/site-functions/_styxy-preload",
        "share/fish/vendor_completions.d/styxy-preload.fish",
        "lib/systemd/user/styxy-preload.socket",
        "share/doc/styxy-preload/README.md",
    ] {
        assert!(prefix.join(f).is_file(), "{f} not installed");
    }
    let unit = std::fs::read_to_string(prefix.join("lib/systemd/user/styxy-preload.service")).unwrap();
    assert!(unit.contains(&format!("ExecStart={}/bin/styxy-preload daemon run", prefix.display())), "{unit}");

    // from a directory that is not the repository: the installed CLI loads the installed library
    let installed = prefix.join("bin/styxy-preload");
    let elsewhere = w.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = run({
        let mut c = w.cmd(&installed);
        c.args(["exec", "--quiet", "--", "sh", "-c", "echo $LD_PRELOAD"]).current_dir(&elsewhere);
        c
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want = prefix.join("lib/styxy-preload/libstyxy_preload.so").canonicalize().unwrap();
    assert_eq!(text(&out.stdout).trim().split(':').next(), Some(want.to_str().unwrap()));
    // exec started the daemon on demand: status is all ✓ and says so
    let out = run({
        let mut c = w.cmd(&installed);
        c.arg("status").current_dir(&elsewhere);
        c
    });
    let status = text(&out.stdout);
    assert!(out.status.success(), "{status}");
    assert!(status.contains(&format!("✓ library: {}", want.display())), "{status}");
    assert!(status.contains("✓ daemon: started on demand"), "{status}");
    let out = run({
        let mut c = w.cmd(&installed);
        c.args(["daemon", "stop"]);
        c
    });
    assert!(out.status.success());

    let out = script(&["--uninstall"]);
    assert!(out.status.success(), "uninstall: {}", text(&out.stderr));
    let left: Vec<_> = walk(&prefix);
    assert!(left.is_empty(), "left after uninstall: {left:?}");
    assert!(prefix.is_dir(), "the prefix itself stays");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
            out.push(p);
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn install_sh_says_what_is_wrong() {
    let w = World::new();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run({
        let mut c = w.cmd(repo.join("scripts/install.sh"));
        c.arg("--frobnicate");
        c
    });
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown argument '--frobnicate'"), "{}", text(&out.stderr));
    let out = run({
        let mut c = w.cmd(repo.join("scripts/install.sh"));
        c.args(["--from", w.path("home").to_str().unwrap(), "--prefix"]).arg(w.path("p"));
        c
    });
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("styxy-preload is missing"), "{}", text(&out.stderr));
}
