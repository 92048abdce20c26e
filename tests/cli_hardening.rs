//! The CLI against hostile input: process names carrying terminal escapes, reserved
//! session and variable names, an unusable runtime directory.

mod common;

use common::*;

/// Control bytes a terminal interprets: C0 but newline, DEL, and C1 (UTF-8 `C2 80..9F`).
fn controls(out: &[u8]) -> Vec<usize> {
    let mut at = Vec::new();
    for (i, b) in out.iter().enumerate() {
        let c1 = *b == 0xc2 && out.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n));
        if (*b < 0x20 && *b != b'\n') || *b == 0x7f || c1 {
            at.push(i);
        }
    }
    at
}

#[test]
fn a_process_name_with_terminal_escapes_reaches_no_table_raw() {
    let mut w = World::new();
    w.start_daemon();
    // another program holds 3000: the evil process is remapped, so it is in the log and in `ports`
    let _holder = std::net::TcpListener::bind("127.0.0.1:3000");
    let mut c = w.preloaded(Some("evil"), "python3");
    c.arg("-c").arg(
        "import ctypes, socket, sys, time\n\
         ctypes.CDLL(None).prctl(15, b'\\x1b[31mev\\xc2\\x9bil\\x07', 0, 0, 0)\n\
         s = socket.socket(); s.bind(('127.0.0.1', 3000)); s.listen()\n\
         print(s.getsockname()[1], flush=True); time.sleep(60)",
    );
    let pid = w.spawn(c, "evil");
    let port: u16 = wait_for(20, "the evil process listening", || w.output_of("evil").trim().parse().ok());
    assert_ne!(port, 3000, "{}", w.stderr_of("evil"));
    let comm = std::fs::read(format!("/proc/{pid}/comm")).unwrap();
    assert!(comm.starts_with(b"\x1b[31m"), "prctl did not take: {comm:?}");

    for args in [&["log"][..], &["ports"], &["stats"], &["stats", "--session", "evil"]] {
        let out = run({
            let mut c = w.cli();
            c.args(args);
            c
        });
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert!(controls(&out.stdout).is_empty(), "{args:?} prints control bytes: {:?}", text(&out.stdout));
        assert!(controls(&out.stderr).is_empty(), "{args:?} prints control bytes on stderr: {:?}", text(&out.stderr));
        if args[0] != "stats" {
            assert!(text(&out.stdout).contains("ev"), "{args:?}: the name is still shown, neutralised: {}", text(&out.stdout));
        }
    }
    // --json keeps the name as it is, escaped by JSON
    let out = run({
        let mut c = w.cli();
        c.args(["ports", "--json"]);
        c
    });
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.as_array().unwrap().iter().any(|a| a["comm"].as_str().is_some_and(|c| c.starts_with("\u{1b}[31mev"))), "{v}");
    assert!(!out.stdout.contains(&0x1b), "JSON escapes ESC");
    w.kill(pid);
}

/// A command that must be refused before it runs anything: exit 1, one line naming `needle`.
fn refused(w: &World, mut c: std::process::Command, marker: &str, needle: &str) -> String {
    let started = std::time::Instant::now();
    c.current_dir(w.path("home"));
    let out = run(c);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stdout {} stderr {err}", text(&out.stdout));
    assert!(err.contains(needle), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!w.path(marker).exists(), "the command ran: {err}");
    // well short of the 5 s a daemon gets to start: nothing was waited for
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "took {:?}: {err}", started.elapsed());
    err
}

#[test]
fn the_session_name_default_is_refused() {
    let w = World::new();
    let touch = |c: &mut std::process::Command| {
        c.args(["--", "touch"]).arg(w.path("ran"));
    };
    let mut c = w.cli();
    c.args(["exec", "--session", "default"]);
    touch(&mut c);
    let err = refused(&w, c, "ran", "'default'");
    assert!(err.contains("reserved") && err.contains("another name"), "{err}");
    for args in [&["env", "--session", "default"][..], &["port", "--session", "default", "3000"]] {
        let mut c = w.cli();
        c.args(args);
        refused(&w, c, "ran", "'default'");
    }
    // inherited from the environment
    let mut c = w.cli();
    c.arg("exec").env("STYXY_PRELOAD_SESSION", "default");
    touch(&mut c);
    let err = refused(&w, c, "ran", "STYXY_PRELOAD_SESSION=default");
    assert!(err.contains("reserved"), "{err}");
    for args in [&["env"][..], &["port", "3000"]] {
        let mut c = w.cli();
        c.args(args).env("STYXY_PRELOAD_SESSION", "default");
        refused(&w, c, "ran", "STYXY_PRELOAD_SESSION=default");
    }
    assert!(w.daemon_pid().is_none(), "nothing started a daemon");
}

#[test]
fn port_variables_that_steer_the_environment_are_refused() {
    let w = World::new();
    for name in [
        "PATH",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "HOME",
        "SHELL",
        "USER",
        "PWD",
        "IFS",
        "STYXY_URL",
        "STYXY_PRELOAD_SESSION",
        "XDG_RUNTIME_DIR",
    ] {
        for spec in [format!("{name}=dev"), name.to_string(), format!("{name}=3000")] {
            let mut c = w.cli();
            c.args(["exec", "--port", "PORT=dev", "--port", &spec, "--", "touch"]).arg(w.path("ran"));
            let err = refused(&w, c, "ran", &format!("--port {spec}: "));
            assert!(err.contains(&format!("{name} is reserved")) && err.contains("choose another name"), "{err}");
        }
    }
    assert!(w.daemon_pid().is_none(), "refused before anything started");
}

#[test]
fn an_unusable_runtime_directory_fails_fast_and_says_why() {
    let w = World::new();
    // XDG_RUNTIME_DIR is a file
    let file = w.path("not-a-dir");
    std::fs::write(&file, "").unwrap();
    for args in [&["exec", "--", "touch"][..], &["env"], &["port", "3000"]] {
        let mut c = w.cli();
        c.args(args).env("XDG_RUNTIME_DIR", &file);
        if args[0] == "exec" {
            c.arg(w.path("ran"));
        }
        let err = refused(&w, c, "ran", &format!("cannot use {}/styxy-preload: ", file.display()));
        assert!(err.contains("Not a directory") && err.contains("set XDG_RUNTIME_DIR to a private writable directory"), "{err}");
    }
    // a directory we may not write (root may write anywhere)
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        let ro = w.path("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o500)).unwrap();
        let mut c = w.cli();
        c.args(["exec", "--", "touch"]).arg(w.path("ran")).env("XDG_RUNTIME_DIR", &ro);
        let err = refused(&w, c, "ran", &format!("cannot use {}/styxy-preload: ", ro.display()));
        assert!(err.contains("Permission denied"), "{err}");
    }
    // the runtime directory is fine but the daemon cannot start (its socket's path is taken
    // by a directory): exec stops waiting as soon as the daemon has exited, with its reason
    std::fs::create_dir_all(w.socket().join("in-the-way")).unwrap();
    let mut c = w.cli();
    c.args(["exec", "--", "touch"]).arg(w.path("ran"));
    let err = refused(&w, c, "ran", &format!("cannot bind {}", w.socket().display()));
    assert!(err.contains("the daemon could not start") && err.contains("daemon.log"), "{err}");
    // a malformed STYXY_URL names itself
    let mut c = w.cli();
    c.args(["exec", "--", "touch"]).arg(w.path("ran")).env("STYXY_URL", "ftp://nowhere");
    let err = refused(&w, c, "ran", "STYXY_URL=");
    assert!(err.contains("ftp://nowhere"), "{err}");
}
