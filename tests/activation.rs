//! Socket activation: the daemon serves a listening socket inherited with the
//! `sd_listen_fds` protocol, as systemd's `styxy-preload.socket` hands it over (here from
//! `systemd-socket-activate`, Debian's `systemd` package). Sessions are coordinated through
//! it; it never unlinks or rebinds the socket; it exits when idle, leaving the socket to
//! its owner; and the next bind starts it again.

mod common;

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use common::*;
use styxy_preload_common::eventlog::Action;

/// `systemd-socket-activate -l <the world's socket> styxy-preload daemon run`: listens at
/// once, starts the daemon (in its own place: same pid) on the first connection.
fn activator(w: &mut World, name: &str) -> u32 {
    let found = std::process::Command::new("systemd-socket-activate").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "cannot run systemd-socket-activate: install Debian's systemd package (apt-get install systemd), or run scripts/test.sh"
    );
    let mut c = w.cmd("systemd-socket-activate");
    c.arg("-l").arg(w.socket()).arg(bin()).args(["daemon", "run", "--idle-exit", "1", "--grace", "0"]);
    let pid = w.spawn(c, name);
    wait_for(10, "systemd-socket-activate listening", || w.stderr_of(name).contains("Listening on").then_some(()));
    pid
}

fn inode(p: &Path) -> Option<u64> {
    std::fs::symlink_metadata(p).ok().map(|m| m.ino())
}

/// A port of the `build` range (8200-8299, coordinated; the other tests use other ranges)
/// that nothing on this machine listens on now: other work may share the machine.
fn free_port() -> u16 {
    (8200..8300)
        .find(|&p| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok() && std::net::TcpListener::bind(("::", p)).is_ok())
        .expect("a free port in 8200-8299")
}

/// `exec -- python3 -m http.server PORT` in a directory of its own; its port, kernel view.
fn server(w: &mut World, name: &str, port: u16) -> (u32, u16) {
    let dir = w.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("who"), name).unwrap();
    let mut c = w.cli();
    c.args(["exec", "--", "python3", "-m", "http.server", &port.to_string()]).current_dir(&dir);
    let pid = w.spawn(c, name);
    let port = wait_for(20, "the exec'd server listening", || tree_ports(pid).into_iter().next());
    assert_eq!(http_get("127.0.0.1", port, "/who").as_deref(), Some(name));
    (pid, port)
}

fn cli_out(w: &World, args: &[&str]) -> String {
    let mut c = w.cli();
    c.args(args);
    text(&run(c).stdout)
}

#[test]
fn an_activated_daemon_coordinates_sessions_exits_when_idle_and_is_activated_again() {
    let mut w = World::new();
    std::fs::DirBuilder::new().mode(0o700).create(w.path("run/styxy-preload")).unwrap();
    let sock = w.socket();
    let first = activator(&mut w, "activate1");
    let ino = inode(&sock).expect("the socket exists before any daemon runs");
    assert_eq!(w.daemon_pid(), None, "nothing connected yet, so no daemon");

    // two sessions ask for one port through the activated socket: one keeps it, one is moved
    let port = free_port();
    let (s1, p1) = server(&mut w, "s1", port);
    let (s2, p2) = server(&mut w, "s2", port);
    assert_eq!(p1, port);
    assert_ne!(p2, port);
    assert!(w.stderr_of("s2").contains(&format!("port {port} is taken")), "{}", w.stderr_of("s2"));
    // one daemon: the activated one (systemd-socket-activate execs it in its own place),
    // on the socket it was handed, not a socket of its own
    let (code, st) = w.json("GET", "/status", None);
    assert_eq!(code, 200);
    assert_eq!(st["pid"], first, "{st}");
    assert_eq!(st["run_mode"], "socket-activated", "{st}");
    assert_eq!(inode(&sock), Some(ino), "the daemon rebound the socket");
    assert!(cli_out(&w, &["status"]).contains("✓ daemon: socket-activated"));
    assert!(cli_out(&w, &["daemon", "status"]).contains("socket-activated"));

    // the sessions end: their ports are freed, the daemon is idle and exits, the socket stays
    w.kill(s1);
    w.kill(s2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let exit = loop {
        if let Some(e) = w.exit_status(first) {
            break e;
        }
        if std::time::Instant::now() > deadline {
            let (_, held) = w.json("GET", "/allocations", None);
            panic!("the activated daemon did not exit when idle; it holds {held}; its log:\n{}", w.stderr_of("activate1"));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}: {}", w.stderr_of("activate1"));
    assert!(w.stderr_of("activate1").contains("idle"), "{}", w.stderr_of("activate1"));
    assert_eq!(inode(&sock), Some(ino), "the daemon removed the socket it was handed");

    // the manager listens again (systemd keeps its socket; systemd-socket-activate is
    // one-shot, so start it again): the next bind starts a daemon, which grants the port
    // — a bind of a process the library is preloaded into (`env`), not `exec`'s
    let again = activator(&mut w, "activate2");
    let mut c = w.preloaded(Some("s3"), "python3");
    c.args(["-m", "http.server", &port.to_string()]);
    let s3 = w.spawn(c, "s3");
    let p3 = wait_for(20, "the preloaded server listening", || listening_ports(s3).into_iter().next());
    assert_eq!(p3, port);
    let kept = wait_for(10, "its event", || w.events().into_iter().find(|e| e.pid == s3));
    assert_eq!(kept.action, Action::Kept, "{kept:?}");
    let (_, st) = w.json("GET", "/status", None);
    assert_eq!(st["pid"], again, "{st}");
    assert_eq!(st["run_mode"], "socket-activated", "{st}");
    w.kill(s3);
}
