//! Servers nobody here wrote, as they really bind: SO_REUSEPORT groups across sessions,
//! and dual-stack twins counted once.

mod common;

use common::*;
use styxy_preload_common::eventlog::Action;

fn reach(w: &World, session: &str, port: u16) -> String {
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", session, "--", "python3", "-c"])
        .arg(format!("import socket; s=socket.create_connection(('127.0.0.1',{port}),2); print(s.recv(64).decode())"));
    text(&run(c).stdout).trim().to_string()
}

#[test]
fn reuseport_servers_of_two_sessions_never_share_a_port_but_one_sessions_workers_do() {
    let mut w = World::new();
    w.start_daemon();
    // 12300 is outside every range: bound as asked unless it may be shared
    let port = 12300;
    let mut a = Vec::new();
    for i in 0..2 {
        let mut c = w.preloaded(Some("rp-a"), fixture("reuseport"));
        c.args([&port.to_string(), "A"]);
        a.push(w.spawn(c, &format!("a{i}")));
    }
    for pid in &a {
        assert_eq!(wait_for(10, "a worker of A", || listening_ports(*pid).into_iter().next()), port, "A's workers share its group");
    }
    let mut c = w.preloaded(Some("rp-b"), fixture("reuseport"));
    c.args([&port.to_string(), "B"]);
    let b = w.spawn(c, "b");
    let bp = wait_for(10, "B", || listening_ports(b).into_iter().next());
    assert_ne!(bp, port, "session B's server joined A's reuseport group");
    for pid in a.iter().chain([&b]) {
        assert_eq!(ours_beside_the_shim(*pid), Vec::<String>::new(), "pid {pid}: the shim is the whole library");
    }
    for _ in 0..6 {
        assert_eq!(reach(&w, "rp-b", port), "B");
        assert_eq!(reach(&w, "rp-a", port), "A");
    }
}

#[test]
fn a_dual_stack_twin_is_one_remap_one_line_one_event() {
    let mut w = World::new();
    w.start_daemon();
    let mut c = w.cmd(fixture("binder"));
    c.args(["serve", "4110"]);
    let h = w.spawn(c, "holder");
    wait_for(10, "holder", || listening_ports(h).into_iter().next());
    let mut c = w.cli();
    c.args(["exec", "--session", "twins", "--", "python3", "-c"]).arg(
        "import socket
a=socket.socket(); a.bind(('0.0.0.0',4110)); a.listen()
b=socket.socket(socket.AF_INET6); b.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); b.bind(('::',4110)); b.listen()
print(a.getsockname()[1], b.getsockname()[1])",
    );
    let out = run(c);
    let ports: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().split_whitespace().collect::<Vec<_>>();
    assert_eq!(ports.len(), 2);
    assert_eq!(ports[0], ports[1], "one requested port, one actual port");
    let err = text(&out.stderr);
    assert_eq!(err.matches("port 4110 is taken").count(), 1, "{err}");
    assert!(err.contains("1 port remapped: 4110→"), "{err}");
    let remaps = w.events().into_iter().filter(|e| e.session.as_deref() == Some("twins") && e.action == Action::Remapped).count();
    assert_eq!(remaps, 1);
    // `log` shows the start once; the twin's bind is there with --all
    let log = |all: bool| {
        let mut c = w.cli();
        c.args(["log", "--session", "twins"]);
        if all {
            c.arg("--all");
        }
        run(c)
    };
    let (table, everything) = (log(false), log(true));
    let rows = |out: &std::process::Output| text(&out.stdout).lines().skip(1).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(rows(&table).len(), 1, "{}", text(&table.stdout));
    assert!(rows(&table)[0].contains("remapped"), "{}", text(&table.stdout));
    assert!(text(&table.stderr).contains("1 repeated binds of a start hidden"), "{}", text(&table.stderr));
    assert_eq!(rows(&everything).len(), 2, "{}", text(&everything.stdout));
    assert!(rows(&everything)[1].contains("bound again by this process"), "{}", text(&everything.stdout));
}

/// The throwaway user the servers of these tests run as.
const OTHER: &str = "styxy-fid";

/// [`OTHER`], created if need be; `None` (the test is skipped, said on stderr) unless we
/// are root, which runuser needs (CI runs as root).
fn other_user() -> Option<&'static str> {
    if !root("runuser needs root") {
        return None;
    }
    user(OTHER);
    Some(OTHER)
}

#[test]
fn a_server_run_as_another_user_in_a_session_is_coordinated() {
    let Some(user) = other_user() else { return };
    let mut w = World::new();
    w.start_daemon();
    let port = 8150;
    let readable = |p: &std::path::Path| std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    readable(w.dir.path());
    for who in ["A", "B"] {
        let dir = w.path(who);
        std::fs::create_dir_all(&dir).unwrap();
        readable(&dir);
        std::fs::write(dir.join("who"), who).unwrap();
        let mut c = w.cli();
        c.args(["exec", "--session", &format!("u-{who}"), "--", "runuser", "-u", user, "--", "python3", "-m", "http.server"])
            .arg(port.to_string())
            .current_dir(&dir);
        let pid = w.spawn(c, who);
        wait_for(20, "the server run as another user", || tree_ports(pid).into_iter().next());
    }
    for who in ["A", "B"] {
        let mut c = w.cli();
        c.args(["exec", "--quiet", "--session", &format!("u-{who}"), "--", "python3", "-c"])
            .arg(format!("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/who', timeout=3).read().decode())"));
        let out = run(c);
        assert_eq!(text(&out.stdout).trim(), who, "{}", text(&out.stderr));
    }
}

#[test]
fn without_the_supervisor_a_server_of_another_user_says_why_it_is_not_coordinated() {
    let Some(user) = other_user() else { return };
    let w = World::new();
    w.start_daemon();
    let mut c = w.cli();
    c.args(["exec", "--no-seccomp", "--session", "nosup", "--", "runuser", "-u", user, "--", "python3", "-c"])
        .arg("import socket; s=socket.socket(); s.bind(('127.0.0.1', 8152)); print(s.getsockname()[1])")
        .current_dir("/");
    let out = run(c);
    assert_eq!(text(&out.stdout).trim(), "8152");
    let err = text(&out.stderr);
    assert!(err.contains("the session's daemon belongs to uid 0 and this process runs as uid") && err.contains("exec --seccomp"), "{err}");
}

#[test]
fn an_address_the_kernel_refuses_is_not_logged_as_our_error() {
    let w = World::new();
    w.start_daemon();
    // a link-local IPv6 address without its scope: EINVAL with or without the library
    let mut c = w.preloaded(Some("ll"), "python3");
    c.args(["-c", "import socket\ns=socket.socket(socket.AF_INET6)\ntry: s.bind(('fe80::1', 3120))\nexcept OSError as e: print(e.errno)"]);
    let out = run(c);
    assert_eq!(text(&out.stdout).trim(), "22", "{}", text(&out.stderr));
    let ev = w.events();
    assert!(!ev.iter().any(|e| e.action == Action::Error), "{ev:#?}");
    assert!(ev.iter().any(|e| e.reason.as_deref().is_some_and(|r| r.contains("kernel refuses this address"))), "{ev:#?}");
}

/// PostgreSQL's server programs: on PATH, or where Debian's `postgresql` package puts them.
fn pg_bin(name: &str) -> Option<std::path::PathBuf> {
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).map(|d| d.join(name));
    let debian = std::fs::read_dir("/usr/lib/postgresql").into_iter().flatten().flatten().map(|v| v.path().join("bin").join(name));
    on_path.chain(debian).find(|p| p.is_file())
}

#[test]
fn two_postgres_clusters_in_two_sessions_share_one_socket_directory_with_port_auto() {
    if !root("postgres refuses to run as root, and runuser needs root") {
        return;
    }
    let (initdb, postgres) = (pg_bin("initdb").expect("initdb: install postgresql"), pg_bin("postgres").expect("postgres"));
    let uid = user(OTHER);
    let user = OTHER;
    let mut w = World::new();
    w.start_daemon();
    let readable = |p: &std::path::Path| std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    readable(w.dir.path());
    let pg = w.path("pg");
    std::fs::create_dir_all(pg.join("sock")).unwrap();
    for d in [pg.clone(), pg.join("sock")] {
        std::os::unix::fs::chown(&d, Some(uid), None).unwrap();
    }
    let init = run({
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", user, "--"]).arg(&initdb).args(["-D"]).arg(pg.join("a")).args(["-U", "postgres", "--auth=trust", "-N"]);
        c
    });
    assert!(init.status.success(), "{}", text(&init.stderr));
    assert!(std::process::Command::new("cp").arg("-a").arg(pg.join("a")).arg(pg.join("b")).status().unwrap().success());
    // each session's cluster gets its port through PGPORT (`--port auto` knows postgres):
    // its TCP port, its socket's name and its lock file agree, so both share one directory
    for s in ["a", "b"] {
        let mut c = w.cli();
        c.args(["exec", "--session", &format!("pg-{s}"), "--port", "auto", "--", "runuser", "-u", user, "--"])
            .arg(&postgres)
            .arg("-D")
            .arg(pg.join(s))
            .arg("-k")
            .arg(pg.join("sock"))
            .args(["-c", "listen_addresses=127.0.0.1"])
            .current_dir("/");
        let pid = w.spawn(c, &format!("pg-{s}"));
        wait_for(30, "the cluster", || tree_ports(pid).into_iter().next());
    }
    // psql in each session reaches its own cluster, through the shared socket directory
    for s in ["a", "b"] {
        let mut c = w.cli();
        c.args(["exec", "--quiet", "--session", &format!("pg-{s}"), "--port", "auto", "--", "runuser", "-u", user, "--", "psql", "-h"])
            .arg(pg.join("sock"))
            .args(["-U", "postgres", "-Atc", "show data_directory"])
            .current_dir("/");
        let out = run(c);
        assert_eq!(text(&out.stdout).trim(), pg.join(s).display().to_string(), "{}", text(&out.stderr));
    }
}

#[test]
fn a_tool_that_falls_back_by_itself_prints_the_port_it_serves_and_the_session_follows() {
    let mut w = World::new();
    w.start_daemon();
    // a stand-in `jupyter` (tornado's way: SO_REUSEADDR; its clients close first): on
    // EADDRINUSE it tries the next port, prints the one it got, serves
    let tools = w.path("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let tool = tools.join("jupyter");
    std::fs::write(
        &tool,
        "#!/usr/bin/env python3\nimport socket, sys, os\nport = 8888\nwhile True:\n  s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n  try: s.bind(('127.0.0.1', port)); break\n  except OSError: port += 1\ns.listen()\nprint(f'http://localhost:{port}/', flush=True)\nwhile True:\n  c, _ = s.accept(); c.sendall(os.environ['WHO'].encode()); c.recv(1); c.close()\n",
    )
    .unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut printed = Vec::new();
    for who in ["A", "B"] {
        let mut c = w.cli();
        c.args(["exec", "--session", &format!("fb-{who}"), "--"]).arg(&tool).env("WHO", who);
        let pid = w.spawn(c, who);
        let url = wait_for(10, "the tool's URL", || w.output_of(who).lines().next().map(str::to_string));
        let port: u16 = url.trim_start_matches("http://localhost:").trim_end_matches('/').parse().unwrap();
        assert!(tree_ports(pid).contains(&port), "{who} prints {url} but serves on {:?}", tree_ports(pid));
        printed.push(port);
    }
    assert_eq!(printed[0], 8888);
    assert_ne!(printed[1], 8888, "B printed the port A serves");
    // B's own connects to the port the tool first wanted follow it to B's server
    for (who, port) in [("A", 8888), ("B", 8888)] {
        assert_eq!(reach(&w, &format!("fb-{who}"), port), who);
    }
    // no silent move, no notice: the tool said where it went
    assert!(!w.stderr_of("B").contains("is taken;"), "{}", w.stderr_of("B"));
}

#[test]
fn a_probe_then_the_real_bind_is_one_start() {
    let w = World::new();
    w.start_daemon();
    // portfinder's way: bind the port, close it, then the server binds it for real
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", "probe", "--", "python3", "-c"])
        .arg("import socket\np=socket.socket(); p.bind(('127.0.0.1', 3130)); p.close()\ns=socket.socket(); s.bind(('127.0.0.1', 3130)); s.listen(); print(s.getsockname()[1])");
    let out = run(c);
    assert_eq!(text(&out.stdout).trim(), "3130", "{}", text(&out.stderr));
    let ev: Vec<_> = w.events().into_iter().filter(|e| e.session.as_deref() == Some("probe") && e.call == "bind").collect();
    let starts = ev.iter().filter(|e| matches!(e.action, Action::Kept | Action::Remapped)).count();
    assert_eq!(starts, 1, "{ev:#?}");
    let mut c = w.cli();
    c.args(["stats", "--json", "--session", "probe"]);
    let stats: serde_json::Value = serde_json::from_slice(&run(c).stdout).unwrap();
    assert_eq!(stats["totals"]["binds"], 1, "{stats:#}");
}

/// Node's cluster: the primary listens for its workers and sends them its socket's
/// `getsockname()`, which each worker compares with the port it asked for.
const CLUSTER_JS: &str = "const cluster = require('cluster'), http = require('http');
if (cluster.isPrimary) { for (let i = 0; i < 2; i++) cluster.fork(); }
else http.createServer((q, r) => r.end(process.env.WHO + ' ' + process.pid)).listen(+process.env.P, () => console.log('worker up'));";

#[test]
fn a_node_cluster_moved_off_its_port_serves_and_only_its_primary_sees_the_port_it_asked_for() {
    let mut w = World::new();
    w.start_daemon();
    let script = w.path("cluster.js");
    std::fs::write(&script, CLUSTER_JS).unwrap();
    let port = 3061;
    let mut pids = Vec::new();
    for who in ["A", "B"] {
        let mut c = w.cli();
        c.args(["exec", "--session", &format!("nc-{who}"), "--", "node"]).arg(&script).env("WHO", who).env("P", port.to_string());
        let pid = w.spawn(c, who);
        wait_for(20, "two workers up", || (w.output_of(who).matches("worker up").count() == 2).then_some(()));
        pids.push(pid);
    }
    assert!(tree_ports(pids[0]).contains(&port), "A serves on {port}: {:?}", tree_ports(pids[0]));
    let b_ports = tree_ports(pids[1]);
    assert!(!b_ports.contains(&port) && b_ports.len() == 1, "B was moved: {b_ports:?}");
    assert!(!w.stderr_of("B").contains("EADDRINUSE"), "{}", w.stderr_of("B"));
    for who in ["A", "B"] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..6 {
            let mut c = w.cli();
            c.args(["exec", "--quiet", "--session", &format!("nc-{who}"), "--", "python3", "-c"]).arg(format!(
                "import urllib.request; print(urllib.request.urlopen('http://localhost:{port}/', timeout=3).read().decode())"
            ));
            let out = text(&run(c).stdout);
            let (answer, worker) = out.trim().split_once(' ').unwrap_or(("", ""));
            assert_eq!(answer, who, "session {who} reached another session's cluster");
            seen.insert(worker.to_string());
        }
        assert!(!seen.is_empty());
    }
    // a plain server moved sees the port it really has
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", "nc-C", "--", "python3", "-c"])
        .arg(format!("import socket; s=socket.socket(); s.bind(('127.0.0.1',{port})); s.listen(); print(s.getsockname()[1])"));
    let out = run(c);
    let real: u16 = text(&out.stdout).trim().parse().unwrap_or_else(|_| panic!("{}", text(&out.stderr)));
    assert_ne!(real, port, "outside a cluster, getsockname tells the truth");
}

/// A program the tests need, installed by `scripts/test.sh`: its path, or a skip (a failure
/// under CI, where the install must have happened).
fn program(name: &str, package: &str) -> Option<String> {
    let found = run({
        let mut c = std::process::Command::new("sh");
        c.args(["-c", &format!("command -v {name}")]);
        c
    });
    if found.status.success() {
        return Some(text(&found.stdout).trim().to_string());
    }
    missing(&format!("{name} ({package})"));
    None
}

/// An HTTP GET of `path` on loopback `port`, made from inside `session`.
fn get_in(w: &World, session: &str, port: u16, path: &str) -> String {
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", session, "--", "python3", "-c"])
        .arg(format!("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=3).read().decode())"));
    let out = run(c);
    text(&out.stdout).trim().to_string()
}

#[test]
fn gunicorn_reuse_port_twice_in_two_sessions_each_session_reaches_its_own() {
    let found = run({
        let mut c = std::process::Command::new("python3");
        c.args(["-c", "import gunicorn"]);
        c
    });
    if !found.status.success() {
        missing("gunicorn (pip)");
        return;
    }
    let mut w = World::new();
    w.start_daemon();
    // 7000 is outside every range: bound as asked unless it may be shared (SO_REUSEPORT)
    let port = 7000;
    std::fs::write(
        w.path("app.py"),
        "import os\ndef app(environ, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [os.environ['STYXY_PRELOAD_SESSION'].encode()]\n",
    )
    .unwrap();
    for s in ["gu-a", "gu-b"] {
        let mut c = w.cli();
        c.args(["exec", "--session", s, "--", "python3", "-m", "gunicorn", "--reuse-port", "-w", "2", "-b", "127.0.0.1:7000", "app:app"]);
        c.current_dir(w.dir.path());
        let pid = w.spawn(c, s);
        // the master and both workers serve before the next session starts
        wait_for(30, "gunicorn", || (tree_ports(pid).len() == 1 && get_in(&w, s, port, "/") == s).then_some(()));
    }
    for _ in 0..10 {
        assert_eq!(get_in(&w, "gu-b", port, "/"), "gu-b");
        assert_eq!(get_in(&w, "gu-a", port, "/"), "gu-a");
    }
    assert!(w.stderr_of("gu-b").contains("port 7000 is taken;"), "{}", w.stderr_of("gu-b"));
}

#[test]
fn caddys_admin_api_in_two_sessions_each_session_stops_its_own() {
    let Some(caddy) = program("caddy", "caddy (apt)") else { return };
    let mut w = World::new();
    w.start_daemon();
    let mut pids = Vec::new();
    for s in ["cd-a", "cd-b"] {
        // a config that names its session, so /config/ tells the two apart
        let config = w.path(&format!("{s}.json"));
        let json = serde_json::json!({"admin": {"listen": "localhost:2019"}, "logging": {"logs": {s: {"level": "ERROR"}}}});
        std::fs::write(&config, json.to_string()).unwrap();
        let mut c = w.cli();
        c.args(["exec", "--session", s, "--"]).arg(&caddy).arg("run").arg("--config").arg(&config);
        let pid = w.spawn(c, s);
        wait_for(30, "caddy's admin API", || get_in(&w, s, 2019, "/config/").contains(s).then_some(()));
        pids.push(pid);
    }
    assert!(get_in(&w, "cd-a", 2019, "/config/").contains("cd-a"));
    // `caddy stop` in B talks to B's admin API: B's caddy ends, A's serves on
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", "cd-b", "--"]).arg(&caddy).arg("stop");
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for(20, "B's caddy to stop", || w.finished(pids[1]).then_some(()));
    assert!(!w.finished(pids[0]), "session B's `caddy stop` stopped A's caddy");
    assert!(get_in(&w, "cd-a", 2019, "/config/").contains("cd-a"));
}

#[test]
fn redis_binding_both_families_twice_is_one_remap_in_the_notice_the_summary_and_stats() {
    let Some(redis) = program("redis-server", "redis-server (apt)") else { return };
    let mut w = World::new();
    w.start_daemon();
    let mut pids = Vec::new();
    for s in ["rd-a", "rd-b"] {
        let dir = w.path(s);
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = w.cli();
        // redis binds 0.0.0.0 and :: by default: twins
        c.args(["exec", "--session", s, "--"]).arg(&redis).args(["--port", "6379", "--save", "", "--appendonly", "no", "--dir"]).arg(&dir);
        let pid = w.spawn(c, s);
        wait_for(20, "redis", || (tree_ports(pid).len() == 1).then_some(()));
        pids.push(pid);
    }
    for s in ["rd-a", "rd-b"] {
        let mut c = w.cli();
        c.args(["exec", "--quiet", "--session", s, "--", "redis-cli", "-p", "6379", "config", "get", "dir"]);
        assert_eq!(text(&run(c).stdout).lines().nth(1), Some(w.path(s).to_str().unwrap()), "session {s} reached another redis");
    }
    w.terminate(pids[1]);
    let err = w.stderr_of("rd-b");
    assert_eq!(err.matches("port 6379 is taken").count(), 1, "{err}");
    assert!(err.contains("1 port remapped: 6379→"), "{err}");
    let mut c = w.cli();
    c.args(["stats", "--json", "--session", "rd-b"]);
    let stats: serde_json::Value = serde_json::from_slice(&run(c).stdout).unwrap();
    assert_eq!((stats["totals"]["binds"].as_u64(), stats["totals"]["remapped"].as_u64()), (Some(1), Some(1)), "{stats:#}");
}
