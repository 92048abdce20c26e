//! Proactive allocation: `exec --port` and `port` hand tools their port before they
//! ask — also tools LD_PRELOAD cannot reach (a statically linked server).

mod common;

use std::collections::BTreeSet;

use common::*;
use styxy_preload_common::eventlog::Action;

#[test]
fn exec_port_exports_a_port_per_session_and_the_bind_keeps_it() {
    let mut w = World::new();
    let js = "require('http').createServer((q,r)=>r.end(process.env.PORT)).listen(+process.env.PORT)";
    let mut ports = BTreeSet::new();
    for i in 0..2 {
        let mut c = w.cli();
        c.args(["exec", "--session", &format!("pa{i}"), "--port", "PORT=dev", "--", "node", "-e", js]);
        let pid = w.spawn(c, &format!("node{i}"));
        let port = wait_for(20, "node listening", || tree_ports(pid).into_iter().next());
        assert!((3000..=3099).contains(&port));
        // it answers with the port it was handed: what it listens on is what the CLI exported
        assert_eq!(http_get("127.0.0.1", port, "/"), Some(port.to_string()));
        ports.insert(port);
    }
    assert_eq!(ports.len(), 2);
    let ev = w.events();
    assert_eq!(ev.iter().filter(|e| e.action == Action::Kept && ports.contains(&e.port)).count(), 2, "{ev:?}");
    assert!(!ev.iter().any(|e| e.action == Action::Remapped), "no remap needed: {ev:?}");
}

#[test]
fn placeholders_in_arguments_and_a_bind_of_the_requested_port_lands_on_the_preallocation() {
    let mut w = World::new();
    w.start_daemon();
    // session other holds 3040, so the preallocation of 3040 for session s is elsewhere
    let mut c = w.preloaded(Some("other"), fixture("binder"));
    c.args(["serve", "3040"]);
    let h = w.spawn(c, "holder");
    wait_for(10, "holder", || listening_ports(h).into_iter().next());
    let mut c = w.cli();
    c.args([
        "exec",
        "--session",
        "s",
        "--port",
        "P=3040",
        "--",
        "sh",
        "-c",
        &format!("echo $P >&2; exec {} serve {{P}}", fixture("binder").display()),
    ]);
    let a = w.spawn(c, "placeholder");
    let pa = wait_for(10, "placeholder server", || tree_ports(a).into_iter().next());
    assert_ne!(pa, 3040);
    assert_eq!(w.stderr_of("placeholder").lines().next().unwrap().trim(), pa.to_string());
    // a tool in the same session that binds 3040 itself gets the same port: it shares
    // the session's allocation (so a second server on it fails as it would without us)
    let mut c = w.cli();
    c.args(["exec", "--session", "s2", "--port", "X=3040", "--", fixture("binder").to_str().unwrap(), "serve", "3040"]);
    let b = w.spawn(c, "requested");
    let pb = wait_for(10, "server binding the requested port", || tree_ports(b).into_iter().next());
    let x: u16 =
        text(&std::fs::read(w.path("requested.out")).unwrap()).lines().next().unwrap().split_whitespace().nth(3).unwrap().parse().unwrap();
    assert_eq!(pb, x);
    assert_ne!(pb, 3040);
    assert_ne!(pb, pa);
}

#[test]
fn a_statically_linked_server_reading_port_is_coordinated_by_exec() {
    let mut w = World::new();
    let out = static_fixture("binder");
    let mut ports = BTreeSet::new();
    for i in 0..2 {
        // without the seccomp supervisor: --port alone hands it a port
        let mut c = w.cli();
        c.args(["exec", "--no-seccomp", "--session", &format!("st{i}"), "--port", "PORT=8000", "--"]).arg(&out).arg("serve-env");
        let pid = w.spawn(c, &format!("static{i}"));
        ports.insert(wait_for(20, "static server", || tree_ports(pid).into_iter().next()));
    }
    assert_eq!(ports.len(), 2, "{ports:?}");
    assert!(w.stderr_of("static0").contains("is statically linked"), "{}", w.stderr_of("static0"));
}

#[test]
fn port_prints_the_same_port_again_in_a_session() {
    let w = World::new();
    let port = |session: &str| {
        let mut c = w.cli();
        c.args(["port", "3000"]).env("STYXY_PRELOAD_SESSION", session);
        let out = run(c);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().parse::<u16>().unwrap()
    };
    let a = port("pa-x");
    assert_eq!(port("pa-x"), a);
    assert_ne!(port("pa-y"), a);
    let mut c = w.cli();
    c.args(["port", "--type", "nope"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("unknown service type 'nope'"));
}

#[test]
fn port_auto_asks_for_the_tools_own_default_first() {
    let mut w = World::new();
    w.start_daemon();
    // a stand-in `jupyter` that prints the port it was handed
    let bin_dir = w.path("tools");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let tool = bin_dir.join("jupyter");
    std::fs::write(&tool, "#!/bin/sh\necho \"$JUPYTER_PORT\"\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut ports = Vec::new();
    for s in ["j1", "j2"] {
        let mut c = w.cli();
        c.args(["exec", "--quiet", "--session", s, "--port", "auto", "--"]).arg(&tool).arg("lab");
        w.spawn(c, s);
        ports.push(wait_for(10, "the tool's port", || w.output_of(s).trim().parse::<u16>().ok()));
    }
    assert_eq!(ports[0], 8888, "Jupyter's own default while it is free");
    assert_ne!(ports[1], 8888);
    assert_ne!(ports[1], 3000, "not another tool's default while the type has other ports");
}
