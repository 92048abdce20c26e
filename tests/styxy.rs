//! Against a stand-in for the real Styxy daemon (tests/fixtures/fake_styxy.py, built to
//! styxy-api.md, quirks included): one allocate per server, stickiness without an
//! idempotent allocate, 429 and Retry-After honoured across processes, release at the
//! end of `exec`, and every failure a pass-through with a reason.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;

use common::*;
use serde_json::Value;
use styxy_preload_client::eventlog::Action;
use styxy_preload_client::http::{self, Endpoint, Timeouts};

struct Styxy {
    port: u16,
    log: std::path::PathBuf,
    control: std::path::PathBuf,
}

impl Styxy {
    fn start(w: &mut World, window_s: &str) -> Styxy {
        Self::start_with(w, window_s, "")
    }

    fn start_with(w: &mut World, window_s: &str, extra_type: &str) -> Styxy {
        let dir = w.path("home/.styxy");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("auth.token"), "ab".repeat(32)).unwrap();
        let (log, control) = (w.path("styxy.log"), w.path("styxy.control"));
        let mut c = w.cmd("python3");
        c.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_styxy.py"))
            .arg(&log)
            .arg(&control)
            .env("FAKE_WINDOW_S", window_s)
            .env("FAKE_EXTRA_TYPE", extra_type);
        w.spawn(c, "styxy");
        let port = wait_for(10, "the stand-in Styxy", || w.output_of("styxy").trim().parse().ok());
        Styxy { port, log, control }
    }

    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn allocates(&self) -> Vec<Value> {
        self.requests().into_iter().filter(|r| r["method"] == "POST" && r["path"] == "/allocate").collect()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::Tcp { addr: ([127, 0, 0, 1], self.port).into(), token: Some("ab".repeat(32)) }
    }
}

/// A command that finds Styxy the way a user's would: STYXY_DAEMON_PORT.
fn with_styxy(s: &Styxy, mut c: Command) -> Command {
    c.env("STYXY_DAEMON_PORT", s.port.to_string());
    c
}

fn python_bind(w: &World, s: &Styxy, session: &str, port: u16) -> (u16, u64) {
    let script = format!(
        "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\nt=time.perf_counter()\ns.bind(('127.0.0.1',{port}))\nprint(s.getsockname()[1], round((time.perf_counter()-t)*1000))"
    );
    let mut c = w.preloaded(Some(session), "python3");
    c.args(["-c", &script]).env("STYXY_URL", s.url());
    let out = run(with_styxy(s, c));
    let f: Vec<u64> = text(&out.stdout).split_whitespace().filter_map(|x| x.parse().ok()).collect();
    assert_eq!(f.len(), 2, "{}", text(&out.stderr));
    (f[0] as u16, f[1])
}

#[test]
fn three_exec_sessions_one_allocate_each_and_all_released_at_the_end() {
    let _r = lock_ranges();
    let mut w = World::new();
    let s = Styxy::start(&mut w, "60");
    let mut pids = Vec::new();
    for i in 0..3 {
        let mut c = w.cli();
        c.args(["exec", "--session", &format!("agent-{i}"), "--", "python3", "-m", "http.server", "8000"]).current_dir(w.path("home"));
        pids.push(w.spawn(with_styxy(&s, c), &format!("s{i}")));
    }
    let mut ports = BTreeSet::new();
    for pid in &pids {
        ports.insert(wait_for(20, "server", || tree_ports(*pid).into_iter().next()));
    }
    assert_eq!(ports.len(), 3, "{ports:?}");
    assert!(!w.socket().exists(), "exec must not start the built-in daemon when Styxy answers");
    let allocs = s.allocates();
    assert_eq!(allocs.len(), 3, "one allocate per server: {allocs:#?}");
    let sessions: BTreeSet<&str> = allocs.iter().map(|a| a["body"]["instance_id"].as_str().unwrap()).collect();
    assert_eq!(sessions, ["agent-0", "agent-1", "agent-2"].into_iter().collect());
    assert!(allocs.iter().all(|a| a["body"]["service_type"] == "api" && a["body"]["preferred_port"] == 8000));
    // the sessions end: each exec releases its lock (Styxy answers the fresh-install ENOENT 400)
    for pid in pids {
        w.terminate(pid);
    }
    let r = http::call(&s.endpoint(), "GET", "/allocations", None, Timeouts::CLI).unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["allocations"].as_array().unwrap().len(), 0, "{v:#}");
    let deletes = s.requests().into_iter().filter(|r| r["method"] == "DELETE").count();
    assert_eq!(deletes, 3);
    assert!(!w.path("run/styxy-preload/sessions/agent-0").exists(), "released mappings are forgotten");
}

#[test]
fn a_dual_stack_server_and_v4_v6_twins_cost_one_allocate() {
    let _r = lock_ranges();
    let mut w = World::new();
    let s = Styxy::start(&mut w, "60");
    let mut c = w.cli();
    c.args(["exec", "--session", "node", "--", "node", "-e", "require('http').createServer((q,r)=>r.end('n')).listen(3000)"]);
    let node = w.spawn(with_styxy(&s, c), "node");
    let np = wait_for(20, "node", || tree_ports(node).into_iter().next());
    assert_eq!(http_get("::1", np, "/").as_deref(), Some("n"));
    assert_eq!(s.allocates().len(), 1);
    // one process binding 0.0.0.0 and :: (and a forked child binding again): one allocate
    let mut c = w.cli();
    c.args(["exec", "--session", "twins", "--", fixture("binder").to_str().unwrap(), "battery", "3010"]).arg(w.path("u.sock"));
    let out = text(&run(with_styxy(&s, c)).stdout);
    let twin_allocs = s.allocates().into_iter().filter(|a| a["body"]["preferred_port"] == 3010).count();
    assert_eq!(twin_allocs, 1, "{out}");
    assert!(out.contains("tcp4-any 0 0") && out.contains("tcp6-any 0 0"), "{out}");
    // at most one register-instance per process
    let regs = s.requests().into_iter().filter(|r| r["path"] == "/register-instance").count();
    assert!(regs <= 2, "{regs}");
}

#[test]
fn a_429_stops_every_process_asking_until_retry_after() {
    let _r = lock_ranges();
    let mut w = World::new();
    let s = Styxy::start(&mut w, "4");
    for _ in 0..100 {
        http::call(&s.endpoint(), "GET", "/allocations", None, Timeouts::CLI).unwrap();
    }
    let (p1, ms1) = python_bind(&w, &s, "rl", 8030);
    let (p2, ms2) = python_bind(&w, &s, "rl2", 8031);
    assert_eq!((p1, p2), (8030, 8031), "passed through");
    assert!(ms1 < 300 && ms2 < 300, "{ms1} {ms2} ms");
    let allocs = s.allocates();
    assert_eq!(allocs.len(), 1, "only the first process asked: {allocs:#?}");
    assert_eq!(allocs[0]["status"], 429);
    let ev = w.events();
    assert!(ev.iter().any(|e| e.reason.as_deref() == Some("rate limited (429)")));
    assert!(ev.iter().any(|e| e.reason.as_deref().is_some_and(|r| r.starts_with("rate limited (429): not asking again"))), "{ev:#?}");
    // once Retry-After has passed, binds ask again
    let deadline = std::fs::read_to_string(w.path("run/styxy-preload/styxy-retry-after")).unwrap().trim().parse::<u64>().unwrap();
    wait_for(10, "Retry-After to pass", || (styxy_preload_client::eventlog::now_ms() > deadline).then_some(()));
    let (p3, _) = python_bind(&w, &s, "rl3", 8032);
    assert_eq!(p3, 8032);
    let after = s.allocates();
    assert_eq!(after.len(), 2);
    assert_eq!(after[1]["status"], 200);
}

#[test]
fn every_failure_is_a_pass_through_within_the_budget_with_a_reason() {
    let _r = lock_ranges();
    let mut w = World::new();
    let s = Styxy::start(&mut w, "60");
    let cases = [
        ("badtoken", "", "coordinator refused the token (401)"),
        ("500", "500", "coordinator answered 500: non-JSON error page"),
        ("html400", "html400", "coordinator answered 400: non-JSON error page"),
        ("hang", "hang", "coordinator timeout"),
    ];
    for (i, (name, fault, reason)) in cases.iter().enumerate() {
        std::fs::write(&s.control, fault).unwrap();
        let token = if *name == "badtoken" { "cd".repeat(32) } else { "ab".repeat(32) };
        std::fs::write(w.path("home/.styxy/auth.token"), token).unwrap();
        let t = Instant::now();
        let (port, ms) = python_bind(&w, &s, &format!("f{i}"), 8040 + i as u16);
        assert_eq!(port, 8040 + i as u16, "{name}");
        assert!(ms <= 300, "{name}: the bind took {ms} ms");
        let ev = w.events();
        let last = ev.last().unwrap();
        assert_eq!((last.action, last.reason.as_deref()), (Action::Passthrough, Some(*reason)), "{name}");
        eprintln!("{name}: passed through in {ms} ms ({:?} with python start)", t.elapsed());
    }
    // the log tells it too
    let mut c = w.cli();
    c.arg("log");
    let table = text(&run(c).stdout);
    assert!(table.contains("coordinator timeout") && table.contains("(401)"), "{table}");
}

#[test]
fn a_users_own_styxy_type_is_coordinated_under_its_name() {
    let _r = lock_ranges();
    let mut w = World::new();
    let s = Styxy::start_with(&mut w, "60", "ml:7000:7099");
    let script = "import socket; s=socket.socket(); s.bind(('127.0.0.1',7005)); s.listen(); print(s.getsockname()[1])";
    let mut c = w.cli();
    c.args(["exec", "--session", "ml", "--", "python3", "-c", script]);
    let out = run(with_styxy(&s, c));
    assert_eq!(text(&out.stdout).trim(), "7005", "{}", text(&out.stderr));
    let allocs = s.allocates();
    assert_eq!(allocs.len(), 1, "7005 is in the user's type `ml`, so it is coordinated: {allocs:#?}");
    assert_eq!(allocs[0]["body"]["service_type"], "ml");
    // with the built-in table only, 7005 is tried as is and never asked about
    let before = s.allocates().len();
    let mut c = w.preloaded(Some("plain"), "python3");
    c.args(["-c", script]).env("STYXY_URL", s.url());
    let _ = run(with_styxy(&s, c));
    assert_eq!(s.allocates().len(), before);
}

#[test]
fn static_servers_under_the_seccomp_supervisor_ask_styxy_once_each_and_release_at_the_end() {
    let _r = lock_ranges();
    let mut w = World::new();
    let s = Styxy::start(&mut w, "60");
    let server = static_fixture("binder");
    let mut pids = Vec::new();
    let mut ports = BTreeSet::new();
    for i in 0..2 {
        let mut c = w.cli();
        c.args(["exec", "--session", &format!("static-{i}"), "--"]).arg(&server).args(["serve", "8000"]).env("WHO", format!("s{i}"));
        let pid = w.spawn(with_styxy(&s, c), &format!("static-{i}"));
        let port = wait_for(20, "static server", || tree_ports(pid).into_iter().next());
        assert_eq!(http_get("127.0.0.1", port, "/").as_deref(), Some(format!("s{i}").as_str()));
        ports.insert(port);
        pids.push(pid);
    }
    assert_eq!(ports.len(), 2, "{ports:?}");
    let allocs = s.allocates();
    assert_eq!(allocs.len(), 2, "one allocate per server: {allocs:#?}");
    assert!(allocs.iter().all(|a| a["body"]["service_type"] == "api" && a["body"]["preferred_port"] == 8000), "{allocs:#?}");
    // Styxy learns each server's own pid (not exec's)
    let registered: BTreeSet<u64> =
        s.requests().iter().filter(|r| r["path"] == "/register-instance").filter_map(|r| r["body"]["pid"].as_u64()).collect();
    for pid in &pids {
        let server_pid = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap().trim().parse::<u64>().unwrap();
        assert!(registered.contains(&server_pid), "{registered:?} lacks {server_pid}");
    }
    for pid in pids {
        w.terminate(pid);
    }
    let r = http::call(&s.endpoint(), "GET", "/allocations", None, Timeouts::CLI).unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["allocations"].as_array().unwrap().len(), 0, "released at the end: {v:#}");
}
