//! The daemon fronting a stand-in for the real Styxy daemon (tests/fixtures/fake_styxy.py,
//! built to docs/STYXY.md, quirks included): the hooks talk only to the local daemon, and
//! the user's Styxy sees every grant under its session, never loses a live port, frees
//! dead ones within seconds, and is kept within its rate limit.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::*;
use serde_json::Value;
use styxy_preload_common::eventlog::Action;
use styxy_preload_common::http::{self, Endpoint, Timeouts};

struct Styxy {
    port: u16,
    log: std::path::PathBuf,
    control: std::path::PathBuf,
    pid: u32,
}

const TOKEN: &str = "abababababababababababababababababababababababababababababababab";

impl Styxy {
    /// Starts the stand-in with `knobs` (FAKE_* variables), on `port` (0: a free one).
    fn start(w: &mut World, port: u16, knobs: &[(&str, &str)]) -> Styxy {
        let dir = w.path("home/.styxy");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("auth.token"), TOKEN).unwrap();
        let (log, control) = (w.path("styxy.log"), w.path("styxy.control"));
        let mut c = w.cmd("python3");
        c.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_styxy.py")).arg(&log).arg(&control);
        c.arg(port.to_string()).envs(knobs.iter().copied());
        let name = format!("styxy-{}", common::unique());
        let pid = w.spawn(c, &name);
        let port = wait_for(10, "the stand-in Styxy", || w.output_of(&name).trim().parse().ok());
        Styxy { port, log, control, pid }
    }

    /// Acts out a fault from now on (`slow 4000`), or none (`""`).
    fn act(&self, fault: &str) {
        std::fs::write(&self.control, fault).unwrap();
    }

    /// Another of Styxy's clients allocates `port` (as a `curl` would, with `agent`).
    fn allocate_for(&self, agent: &str, body: Value) -> Value {
        let r = http::call_as(&self.endpoint(), agent, "POST", "/allocate", Some(body.to_string().as_bytes()), Timeouts::CLI).unwrap();
        serde_json::from_slice(&r.body).unwrap()
    }

    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    fn allocates(&self) -> Vec<Value> {
        self.requests().into_iter().filter(|r| r["method"] == "POST" && r["path"] == "/allocate").collect()
    }

    /// The allocates it logged, once there are at least `n`: it logs a request after its
    /// answer, and a grant whose wait for Styxy ended is mirrored later by the worker.
    fn allocates_at_least(&self, n: usize) -> Vec<Value> {
        wait_for(10, &format!("{n} allocates in Styxy's log"), || Some(self.allocates()).filter(|a| a.len() >= n))
    }

    /// Styxy's uptime in seconds, from its `GET /status` (free: not counted).
    fn uptime(&self) -> f64 {
        let r = http::call_as(&self.endpoint(), "test", "GET", "/status", None, Timeouts::CLI).unwrap();
        serde_json::from_slice::<Value>(&r.body).unwrap()["uptime"].as_f64().unwrap()
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::Tcp { addr: ([127, 0, 0, 1], self.port).into(), token: Some(TOKEN.into()) }
    }

    /// What Styxy holds now (as of its last answer): port → its allocation. Read from the
    /// stand-in's state file, not its API: the test must not eat the daemon's rate limit.
    fn held(&self) -> Option<std::collections::BTreeMap<u16, Value>> {
        let v: Value = serde_json::from_slice(&std::fs::read(self.log.with_extension("log.state")).ok()?).ok()?;
        Some(v.as_array()?.iter().map(|a| (a["port"].as_u64().unwrap() as u16, a.clone())).collect())
    }

    /// The requests it saw, one line each, for failure messages.
    fn summary(&self) -> String {
        let t0 = self.requests().first().and_then(|r| r["t"].as_f64()).unwrap_or(0.0);
        self.requests()
            .iter()
            .map(|r| {
                format!(
                    "\n{:7.3} {} {} {} {} → {}",
                    r["t"].as_f64().unwrap_or(0.0) - t0,
                    r["method"],
                    r["path"],
                    r["status"],
                    r["body"],
                    r["reply"]
                )
            })
            .collect()
    }

    fn ports(&self) -> Option<BTreeSet<u16>> {
        self.held().map(|h| h.keys().copied().collect())
    }
}

/// A command that finds Styxy the way a user's would: STYXY_DAEMON_PORT.
fn with_styxy(s: &Styxy, mut c: Command) -> Command {
    c.env("STYXY_DAEMON_PORT", s.port.to_string());
    c
}

/// The daemon, fronting `s`; `extra` are more `daemon start` flags.
fn start_daemon(w: &World, s: &Styxy, extra: &[&str]) {
    let mut c = with_styxy(s, w.cli());
    c.args(["daemon", "start", "--idle-exit", "0"]).args(extra);
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn daemon_status(w: &World) -> Value {
    w.json("GET", "/status", None).1
}

/// A Python server in `session`: binds `addr`:`port`, listens, prints "actual-port
/// bind-ms", serves. Styxy's own test-bind (127.0.0.1) sees a server on 0.0.0.0, not
/// one on ::1.
fn python_server(w: &mut World, s: &Styxy, session: &str, (addr, port): (&str, u16), name: &str) -> (u32, u16, u64) {
    let family = if addr.contains(':') { "socket.AF_INET6" } else { "socket.AF_INET" };
    let script = format!(
        "import socket,time,sys\ns=socket.socket({family})\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\nt=time.perf_counter()\ns.bind(('{addr}',{port}))\ns.listen()\nprint(s.getsockname()[1], round((time.perf_counter()-t)*1000), flush=True)\ntime.sleep(600)"
    );
    let mut c = w.preloaded(Some(session), "python3");
    c.args(["-c", &script]);
    let pid = w.spawn(with_styxy(s, c), name);
    let out = wait_for(10, "the python server", || {
        let o = w.output_of(name);
        let f: Vec<u64> = o.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        (f.len() == 2).then(|| (f[0] as u16, f[1]))
    });
    (pid, out.0, out.1)
}

#[test]
fn exec_sessions_are_allocations_in_styxy_under_their_names_and_released_when_they_end() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
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
    // the hooks asked the local daemon; the daemon put each grant into Styxy
    assert!(w.socket().exists(), "exec starts the local daemon, which fronts Styxy");
    let held = wait_for(10, "Styxy to hold the three ports", || s.held().filter(|h| h.keys().copied().collect::<BTreeSet<_>>() == ports));
    let sessions: BTreeSet<&str> = held.values().map(|a| a["instance_id"].as_str().unwrap()).collect();
    assert_eq!(sessions, ["agent-0", "agent-1", "agent-2"].into_iter().collect());
    let home = w.path("home").canonicalize().unwrap();
    for a in held.values() {
        assert_eq!(a["service_type"], "api", "{a}");
        assert_eq!(a["service_name"], "python3-8000", "{a}");
        assert_eq!(a["project_path"].as_str().map(std::path::PathBuf::from), Some(home.clone()), "{a}");
    }
    assert_eq!(s.allocates_at_least(3).len(), 3, "one allocate per server: {:#?}", s.allocates());
    let up = upstream_when(&w, 10, "three grants mirrored", |u| u["mirrored"] == 3);
    assert_eq!(up["reachable"], true, "{up:#}");
    let mut c = w.cli();
    c.arg("status");
    let out = text(&run(with_styxy(&s, c)).stdout);
    assert!(out.contains("✓ upstream: Styxy at http://127.0.0.1:") && out.contains("3 allocations mirrored"), "{out}");
    // the sessions end: each allocation is released in Styxy (it answers the fresh-install ENOENT 400)
    for pid in pids {
        w.terminate(pid);
    }
    wait_for(10, "Styxy to hold nothing", || s.ports().filter(BTreeSet::is_empty));
}

#[test]
fn debug_ports_are_coordinated_here_and_never_sent_to_styxy() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    start_daemon(&w, &s, &[]);
    // two Node inspectors on 9229 and an api server: the api port is mirrored, 9229 is not
    let mut pids = Vec::new();
    for who in ["a", "b"] {
        let mut c = w.preloaded(Some(who), "node");
        c.args(["--inspect=127.0.0.1:9229", "-e", "setInterval(() => {}, 1000)"]);
        pids.push(w.spawn(with_styxy(&s, c), who));
        wait_for(20, "the inspector", || w.stderr_of(who).contains("Debugger listening").then_some(()));
    }
    let (_, api, _) = python_server(&mut w, &s, "a", ("0.0.0.0", 8000), "api");
    let inspectors: BTreeSet<u16> = pids.iter().flat_map(|p| tree_ports(*p)).collect();
    assert_eq!(inspectors.len(), 2, "both inspectors listen: {inspectors:?}");
    wait_for(10, "the api port mirrored", || s.held().filter(|h| h.contains_key(&api)));
    let sent: Vec<Value> = s.allocates();
    assert!(sent.iter().all(|r| !r["body"].to_string().contains("debug")), "a debug allocation reached Styxy: {}", s.summary());
    assert!(s.ports().unwrap_or_default().is_disjoint(&inspectors), "{}", s.summary());
    let (_, v) = w.json("GET", "/allocations", None);
    let debug = v["allocations"].as_array().unwrap().iter().filter(|a| a["service_type"] == "debug").count();
    assert_eq!(debug, 2, "{v:#}");
}

#[test]
fn a_port_styxy_holds_for_another_client_is_never_granted() {
    let mut w = World::new();
    // another Styxy client reserved 8000 and 3000 and never binds them
    let s = Styxy::start(&mut w, 0, &[("FAKE_PREHOLD", "8000:api:someone-else,3000:dev:someone-else")]);
    start_daemon(&w, &s, &[]);
    let (_, p1, _) = python_server(&mut w, &s, "a", ("0.0.0.0", 8000), "a");
    assert_ne!(p1, 8000, "Styxy holds 8000 for another client");
    // once the daemon has read Styxy's allocations it does not even offer them
    wait_for(10, "the daemon to know Styxy's holdings", || (daemon_status(&w)["upstream"]["held_by_others"] == 2).then_some(()));
    let (_, p2, _) = python_server(&mut w, &s, "b", ("0.0.0.0", 3000), "b");
    assert_ne!(p2, 3000);
    let held = wait_for(10, "both mirrored", || s.held().filter(|h| h.len() == 4));
    assert_eq!(held[&8000]["instance_id"], "someone-else");
    assert_eq!(held[&p1]["instance_id"], "a");
    assert_eq!(held[&p2]["instance_id"], "b");
}

#[test]
fn a_server_started_under_env_and_killed_is_released_in_styxy_within_10_s() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    let mut c = w.cmd("bash");
    c.args(["-c", "eval \"$(\"$0\" env --session e1)\" && exec python3 -m http.server 8010", bin().to_str().unwrap()]);
    c.current_dir(w.path("home"));
    let srv = w.spawn(with_styxy(&s, c), "env-server");
    let port = wait_for(20, "the server", || tree_ports(srv).into_iter().next());
    let held = wait_for(10, "Styxy to hold it", || s.held().filter(|h| h.contains_key(&port)));
    assert_eq!(held[&port]["instance_id"], "e1");
    w.kill(srv);
    let t = std::time::Instant::now();
    wait_for(10, "the release in Styxy", || s.ports().filter(|p| !p.contains(&port)));
    eprintln!("released in Styxy {:?} after SIGKILL", t.elapsed());
}

#[test]
fn live_ports_stay_out_of_other_styxy_clients_hands_past_styxys_expiry() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[("FAKE_EXPIRY_S", "3")]);
    start_daemon(&w, &s, &["--upstream-expiry", "3"]);
    // a server on ::1, which Styxy's own test-bind of 127.0.0.1 does not see…
    let (_, v6, _) = python_server(&mut w, &s, "long", ("::1", 8020), "v6");
    // …and one on 0.0.0.0, which it does
    let (_, v4, _) = python_server(&mut w, &s, "long", ("0.0.0.0", 8021), "v4");
    // three expiries later Styxy still holds the ::1 server's port, because each
    // allocate came before the previous one expired
    std::thread::sleep(std::time::Duration::from_secs(9));
    let held = s.held().unwrap();
    assert_eq!(held.get(&v6).map(|a| &a["instance_id"]), Some(&Value::from("long")), "{}", s.summary());
    let times: Vec<f64> = s
        .allocates()
        .iter()
        .filter(|a| a["status"] == 200 && a["body"]["preferred_port"] == v6)
        .map(|a| a["t"].as_f64().unwrap())
        .collect();
    assert!(times.len() >= 3, "{times:?}");
    for pair in times.windows(2) {
        assert!(pair[1] - pair[0] < 3.0, "re-asserted {:.2} s after the previous allocate: {times:?}", pair[1] - pair[0]);
    }
    // the 0.0.0.0 server's port cannot be registered again while served (Styxy's test-bind
    // refuses it), and for the same reason Styxy gives it to nobody else
    let st = daemon_status(&w);
    assert_eq!((st["upstream"]["mirrored"].as_u64(), st["upstream"]["served"].as_u64()), (Some(1), Some(1)), "{st:#}");
    for (port, ty) in [(v6, "api"), (v4, "api")] {
        let body = format!(r#"{{"service_type":"{ty}","preferred_port":{port},"instance_id":"someone-else"}}"#);
        let r = http::call(&s.endpoint(), "POST", "/allocate", Some(body.as_bytes()), Timeouts::CLI).unwrap();
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_ne!(v["port"].as_u64(), Some(u64::from(port)), "Styxy handed the live {port} to another client: {v}");
    }
}

#[test]
fn thirty_servers_in_ten_sessions_against_a_small_rate_limit_end_up_exactly_in_styxy() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[("FAKE_LIMIT", "20"), ("FAKE_WINDOW_S", "5")]);
    start_daemon(&w, &s, &[]);
    let mut servers = Vec::new();
    for i in 0..10 {
        for port in [8000, 3000, 4000] {
            // on ::1: Styxy's test-bind does not see these servers, so a port that could not
            // be registered at once (429) can still be registered once the server serves
            let mut c = w.preloaded(Some(&format!("rl-{i}")), fixture("binder"));
            c.args(["serve", &port.to_string(), "::1"]);
            servers.push(w.spawn(with_styxy(&s, c), &format!("rl-{i}-{port}")));
        }
    }
    let ports: BTreeSet<u16> = servers.iter().map(|p| wait_for(20, "a server", || listening_ports(*p).into_iter().next())).collect();
    assert_eq!(ports.len(), 30, "every server on a port of its own: {ports:?}");
    let limited = s.requests().iter().filter(|r| r["status"] == 429).count();
    // Styxy ends up holding exactly the live ones
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while s.ports() != Some(ports.clone()) {
        assert!(
            std::time::Instant::now() < deadline,
            "Styxy holds {:?}\nwant {ports:?}\n{:#}\n{}",
            s.ports(),
            daemon_status(&w),
            s.summary()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!("429s while the servers started: {limited}; all {} requests: {}", ports.len(), s.requests().len());
    for pid in servers.drain(..15) {
        w.kill(pid);
    }
    let live: BTreeSet<u16> = servers.iter().flat_map(|p| listening_ports(*p)).collect();
    assert_eq!(live.len(), 15);
    wait_for(60, "Styxy to hold exactly the 15 still live", || (s.ports()? == live).then_some(()));
}

#[test]
fn styxy_killed_and_restarted_costs_no_bind_its_budget_and_is_reconciled() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    start_daemon(&w, &s, &[]);
    let (_, a, _) = python_server(&mut w, &s, "k1", ("::1", 8030), "k1");
    wait_for(10, "mirrored", || s.ports().filter(|p| p.contains(&a)));
    w.kill(s.pid);
    let mut ms = Vec::new();
    let mut ports = vec![a];
    for (i, port) in [8031u16, 8032, 3030].into_iter().enumerate() {
        let (_, p, t) = python_server(&mut w, &s, &format!("k{}", i + 2), ("::1", port), &format!("k{}", i + 2));
        ports.push(p);
        ms.push(t);
    }
    assert!(ms.iter().all(|t| *t < 300), "binds while Styxy is gone: {ms:?} ms");
    // Styxy comes back empty (its restart forgets every allocation), and someone else
    // took 8031 meanwhile: the daemon re-registers the rest and reports the conflict
    let s2 = Styxy::start(&mut w, s.port, &[("FAKE_PREHOLD", "8031:api:someone-else")]);
    let want: BTreeSet<u16> = ports.iter().copied().collect();
    wait_for(20, "Styxy to hold the daemon's ports again", || (s2.ports()? == want).then_some(()));
    let held = s2.held().unwrap();
    assert_eq!(held[&8031]["instance_id"], "someone-else");
    // (Styxy saves an allocation before the daemon has its answer: both are waited for)
    upstream_when(&w, 10, "the conflict and three mirrored in status", |u| u["conflicts"] == 1 && u["mirrored"] == 3);
    let conflicts: Vec<_> = w.events().into_iter().filter(|e| e.action == Action::Conflict).collect();
    assert_eq!(conflicts.len(), 1, "{conflicts:#?}");
    assert_eq!(conflicts[0].port, 8031);
    let mut c = w.cli();
    c.arg("status");
    let out = text(&run(with_styxy(&s2, c)).stdout);
    assert!(out.contains("1 port(s) granted here are held in Styxy by another client"), "{out}");
}

#[test]
fn connects_follow_the_session_and_isolation_holds_with_styxy_upstream() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    for who in ["A", "B"] {
        let dir = w.path(who);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("who"), who).unwrap();
        let mut c = w.cli();
        c.args(["exec", "--session", who, "--", "python3", "-m", "http.server", "8040"]).current_dir(&dir);
        let pid = w.spawn(with_styxy(&s, c), who);
        wait_for(20, "server", || tree_ports(pid).into_iter().next());
    }
    let get = |session: &str| {
        let mut c = w.cli();
        c.args(["exec", "--session", session, "--", "python3", "-c"]).arg(
            "import urllib.request\ntry: print(urllib.request.urlopen('http://localhost:8040/who', timeout=3).read().decode())\nexcept Exception as e: print('refused' if 'refused' in str(e) else e)",
        );
        text(&run(with_styxy(&s, c)).stdout).trim().to_string()
    };
    assert_eq!(get("A"), "A");
    assert_eq!(get("B"), "B");
    assert_eq!(get("C"), "refused", "a session without a server never reaches another session's");
    assert_eq!(s.ports().unwrap().len(), 2);
}

#[test]
fn a_styxy_that_refuses_the_token_makes_status_fail_loudly() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    std::fs::write(w.path("home/.styxy/auth.token"), "cd".repeat(32)).unwrap();
    start_daemon(&w, &s, &[]);
    // binds are still coordinated, granted locally
    let (_, port, ms) = python_server(&mut w, &s, "t", ("0.0.0.0", 8050), "t");
    assert_eq!(port, 8050);
    assert!(ms < 300, "{ms} ms");
    wait_for(10, "the 401 to be noticed", || (daemon_status(&w)["upstream"]["refused"] == true).then_some(()));
    let mut c = w.cli();
    c.arg("status");
    let out = run(with_styxy(&s, c));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("✗ upstream: Styxy at") && stdout.contains("refuses the token (401)"), "{stdout}");
}

#[test]
fn a_users_own_styxy_type_is_coordinated_under_its_name() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[("FAKE_EXTRA_TYPE", "ml:12700:12799")]);
    let script = "import socket; s=socket.socket(); s.bind(('127.0.0.1',12705)); s.listen(); print(s.getsockname()[1])";
    let mut c = w.cli();
    c.args(["exec", "--session", "ml", "--", "python3", "-c", script]);
    let out = run(with_styxy(&s, c));
    assert_eq!(text(&out.stdout).trim(), "12705", "{}", text(&out.stderr));
    let allocs = s.allocates_at_least(1);
    assert_eq!(allocs.len(), 1, "12705 is in the user's type `ml`, so it is coordinated: {allocs:#?}");
    assert_eq!(allocs[0]["body"]["service_type"], "ml");
}

/// The upstream part of the daemon's `/status` once `pred` holds of it.
fn upstream_when(w: &World, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(secs, what, || Some(daemon_status(w)["upstream"].clone()).filter(|u| pred(u)))
}

#[test]
fn an_answer_styxy_gives_after_the_daemon_gave_up_is_adopted_and_released_with_its_server() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    start_daemon(&w, &s, &[]);
    upstream_when(&w, 10, "Styxy read", |u| u["last_refresh_ms"].is_u64());
    // Styxy busy for 4 s with every answer: the daemon's client gives up after 3 s, and
    // Styxy makes the allocation all the same
    s.act("slow 4000");
    let (srv, port, ms) = python_server(&mut w, &s, "s1", ("::1", 3020), "late");
    assert!(ms < 300, "{ms} ms");
    wait_for(20, "Styxy's late allocation", || s.held().filter(|h| h.get(&port).is_some_and(|a| a["instance_id"] == "s1")));
    s.act("");
    // the lock the daemon never heard of is its own: adopted, not another client's
    let up = upstream_when(&w, 20, "the late allocation adopted", |u| u["mirrored"] == 1 && u["pending"] == 0);
    assert_eq!((up["conflicts"].as_u64(), up["held_by_others"].as_u64()), (Some(0), Some(0)), "{up:#}\n{}", s.summary());
    let of_s1 = || s.held().map(|h| h.into_values().filter(|a| a["instance_id"] == "s1").count());
    wait_for(20, "one allocation of s1 in Styxy, stray ones released", || (of_s1()? == 1).then_some(()));
    assert!(w.events().iter().all(|e| e.action != Action::Conflict), "{:#?}", w.events());
    w.kill(srv);
    wait_for(10, "Styxy to hold nothing of ours", || s.ports().filter(BTreeSet::is_empty));
}

#[test]
fn a_port_styxy_gave_another_client_since_the_last_reading_is_not_granted_while_styxy_is_slow() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    start_daemon(&w, &s, &[]);
    upstream_when(&w, 10, "Styxy read", |u| u["last_refresh_ms"].is_u64());
    // the daemon is quiet: past its first readings, Styxy's list is re-read every 30 s
    std::thread::sleep(std::time::Duration::from_secs(3));
    // another client takes 8000
    let v = s.allocate_for("curl/8.5.0", serde_json::json!({"service_type": "api", "preferred_port": 8000, "instance_id": "other"}));
    assert_eq!(v["port"], 8000, "{v}");
    upstream_when(&w, 5, "the daemon to learn of it", |u| u["held_by_others"] == 1);
    // Styxy now answers later than any grant waits
    s.act("slow 400");
    let (_, port, ms) = python_server(&mut w, &s, "a", ("0.0.0.0", 8000), "a");
    assert_ne!(port, 8000, "Styxy holds 8000 for another client");
    assert!(ms < 300, "{ms} ms");
    eprintln!("bind while Styxy answers 400 ms late: {ms} ms");
}

#[test]
fn status_says_styxy_is_gone_within_two_seconds_of_its_end() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    start_daemon(&w, &s, &[]);
    upstream_when(&w, 10, "Styxy reachable", |u| u["reachable"] == true);
    // the daemon is quiet: past its first readings, Styxy's list is re-read every 30 s
    std::thread::sleep(std::time::Duration::from_secs(3));
    w.kill(s.pid);
    let t = std::time::Instant::now();
    upstream_when(&w, 2, "Styxy unreachable", |u| u["reachable"] == false);
    eprintln!("noticed after {:?}", t.elapsed());
}

#[test]
fn ports_shows_each_allocations_standing_in_styxy() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    start_daemon(&w, &s, &[]);
    let (_, port, _) = python_server(&mut w, &s, "p", ("::1", 8060), "p");
    wait_for(10, "mirrored", || s.ports().filter(|p| p.contains(&port)));
    let mut c = w.cli();
    c.args(["ports", "--json"]);
    let list: Value = serde_json::from_slice(&run(with_styxy(&s, c)).stdout).unwrap();
    assert_eq!(list[0]["upstream"]["state"], "mirrored", "{list:#}");
    let mut c = w.cli();
    c.arg("ports");
    let table = text(&run(with_styxy(&s, c)).stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].trim_end().ends_with("STYXY") && lines[1].trim_end().ends_with("mirrored"), "{table}");
}

#[test]
fn status_is_quiet_about_what_is_fine_and_names_a_preload_library_before_ours() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[("FAKE_EXTRA_TYPE", "ml:12700:12799")]);
    start_daemon(&w, &s, &[]);
    upstream_when(&w, 10, "Styxy read", |u| u["last_refresh_ms"].is_u64());
    // inside an env shell, with a rule naming the user's own Styxy type
    let mut c = w.cmd("bash");
    c.args(["-c", "eval \"$(\"$0\" env)\" && exec \"$0\" status", bin().to_str().unwrap()]).env("STYXY_PRELOAD_PORTS", "12700-12710=ml");
    let out = run(with_styxy(&s, c));
    let stdout = text(&out.stdout);
    assert!(!stdout.contains("STYXY_PRELOAD_DISABLE"), "{stdout}");
    assert!(!stdout.contains('✗'), "{stdout}");
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    // another preload library first
    let other =
        ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("libm");
    let mut c = w.cli();
    c.arg("status").env("LD_PRELOAD", format!("{other}:{}", lib().display()));
    let out = run(with_styxy(&s, c));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&format!("✗ LD_PRELOAD lists {other} before")), "{stdout}");
    assert_eq!(out.status.code(), Some(1), "{stdout}");
}

/// Another user's stand-in Styxy on `port` (0: a free one), as a process listening where
/// the user's tools ask: its /config makes 1024-32767 one type, its /allocate answers
/// whatever it likes. Its uid, its home (its log is `styxy.log` there), its port.
fn intruder(w: &mut World, port: u16) -> (u32, tempfile::TempDir, u16) {
    let uid = common::user("styxy-intruder");
    let dir = tempfile::Builder::new().prefix("intruder-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::create_dir_all(dir.path().join(".styxy")).unwrap();
    std::fs::write(dir.path().join(".styxy/auth.token"), "ef".repeat(32)).unwrap();
    std::process::Command::new("chown").args(["-R", &format!("{uid}:{uid}")]).arg(dir.path()).status().unwrap();
    // a python3 every user may run (not one under root's home)
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"].into_iter().find(|p| std::path::Path::new(p).exists()).unwrap_or("python3");
    let mut c = w.cmd("setpriv");
    c.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into(), python.into()]);
    c.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_styxy.py"));
    c.arg(dir.path().join("styxy.log")).arg(dir.path().join("control")).arg(port.to_string());
    c.env("HOME", dir.path()).env("FAKE_EXTRA_TYPE", "everything:1024:32767");
    w.spawn(c, "intruder");
    let port = wait_for(10, "the intruder's Styxy", || w.output_of("intruder").trim().parse().ok());
    (uid, dir, port)
}

#[test]
fn a_styxy_another_user_listens_for_gets_no_token_and_steers_nothing() {
    let mut w = World::new();
    std::fs::create_dir_all(w.path("home/.styxy")).unwrap();
    std::fs::write(w.path("home/.styxy/auth.token"), TOKEN).unwrap();
    let (uid, dir, port) = intruder(&mut w, 0);
    let log = dir.path().join("styxy.log");
    let mut c = w.cli();
    c.args(["daemon", "start", "--idle-exit", "0"]).env("STYXY_DAEMON_PORT", port.to_string());
    assert!(run(c).status.success());
    let up = upstream_when(&w, 10, "the intruder noticed", |u| u["untrusted"].is_string());
    assert!(up["untrusted"].as_str().unwrap().contains(&format!("uid {uid}")), "{up:#}");
    // a bind of 5432 (not coordinated here) stays 5432, and nothing reached the intruder
    let mut c = w.preloaded(Some("v"), "python3");
    c.args(["-c", "import socket; s=socket.socket(); s.bind(('127.0.0.1',5432)); s.listen(); print(s.getsockname()[1])"]);
    assert_eq!(text(&run(c).stdout).trim(), "5432");
    let seen = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(seen.is_empty(), "the daemon talked to the intruder (token: {}): {seen}", seen.contains(TOKEN));
    let mut c = w.cli();
    c.arg("status").env("STYXY_DAEMON_PORT", port.to_string());
    let out = text(&run(c).stdout);
    assert!(out.contains("✗ upstream: Styxy not used:") && out.contains("not trusted"), "{out}");
}

#[test]
fn ports_a_vanished_styxy_held_for_others_are_granted_again() {
    let mut w = World::new();
    let prehold: Vec<String> = (3000..3100).map(|p| format!("{p}:dev:gone")).collect();
    let s = Styxy::start(&mut w, 0, &[("FAKE_PREHOLD", &prehold.join(","))]);
    start_daemon(&w, &s, &[]);
    upstream_when(&w, 10, "Styxy's holdings read", |u| u["held_by_others"] == 100);
    w.kill(s.pid);
    upstream_when(&w, 5, "Styxy gone", |u| u["reachable"] == false);
    // two sessions' servers on 3000: coordinated again, the second moved
    let (_, a, _) = python_server(&mut w, &s, "a", ("0.0.0.0", 3000), "a");
    let (_, b, _) = python_server(&mut w, &s, "b", ("0.0.0.0", 3000), "b");
    assert_eq!((a, b), (3000, 3001));
    assert_eq!(daemon_status(&w)["upstream"]["held_by_others"], 0);
}

#[test]
fn a_user_type_in_a_restarted_styxys_config_is_followed() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    start_daemon(&w, &s, &[]);
    upstream_when(&w, 10, "Styxy read", |u| u["last_refresh_ms"].is_u64());
    // Styxy restarts with a new type in its config.json, between two of the daemon's
    // readings, and later than the uptime it reports can tell apart from its first start
    wait_for(10, "Styxy up for a second", || (s.uptime() > 1.0).then_some(()));
    w.kill(s.pid);
    let s2 = Styxy::start(&mut w, s.port, &[("FAKE_EXTRA_TYPE", "ml:12700:12799")]);
    let has_ml = || w.json("GET", "/config", None).1["service_types"]["ml"]["range"] == serde_json::json!([12700, 12799]);
    let t = std::time::Instant::now();
    while !has_ml() {
        assert!(
            t.elapsed().as_secs() < 5,
            "{:#}\n{}\n{} {} {}",
            daemon_status(&w),
            s2.summary(),
            std::fs::read_to_string(w.path("state/styxy-preload/daemon.log")).unwrap_or_default(),
            s.pid,
            s2.pid
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut c = w.cli();
    c.args(["exec", "--session", "ml", "--", "python3", "-c"])
        .arg("import socket; s=socket.socket(); s.bind(('127.0.0.1',12705)); s.listen(); print(s.getsockname()[1])");
    assert_eq!(text(&run(with_styxy(&s2, c)).stdout).trim(), "12705");
    wait_for(10, "the `ml` allocate in the new Styxy's log", || s2.allocates().into_iter().find(|a| a["body"]["service_type"] == "ml"));
}

#[test]
fn an_ipv4_server_stays_in_styxys_list_past_the_reassert() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    // the daemon re-asserts at 3/5 of this expiry (3 s); Styxy's own is 30 min
    start_daemon(&w, &s, &["--upstream-expiry", "5"]);
    let (_, port, _) = python_server(&mut w, &s, "v4", ("0.0.0.0", 8070), "v4");
    wait_for(10, "mirrored", || s.ports().filter(|p| p.contains(&port)));
    // Styxy's test-bind would refuse to register it again: its lock is kept, not re-asserted
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert!(s.ports().unwrap().contains(&port), "{}", s.summary());
    let up = daemon_status(&w)["upstream"].clone();
    assert_eq!(up["mirrored"], 1, "{up:#}");
}

#[test]
fn styxys_hook_reservation_is_the_commands_port_and_is_released_with_it() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    start_daemon(&w, &s, &[]);
    let project = w.path("project");
    std::fs::create_dir_all(&project).unwrap();
    let project = project.canonicalize().unwrap();
    // Claude Code runs Styxy's hook before the Bash command `npx vite --port 3000`
    let mut c = w.cmd("bash");
    c.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/styxy/universal-intercept.sh"));
    c.args(["Bash", "npx vite --port 3000"]).current_dir(&project).env("STYXY_URL", format!("http://127.0.0.1:{}", s.port));
    c.env("CLAUDE_PROJECT_DIR", &project);
    let said = text(&run(c).stdout);
    assert!(said.contains("Port 3000 allocated via Styxy for dev service"), "{said}\n{}", s.summary());
    upstream_when(&w, 10, "the reservation read", |u| u["held_by_others"] == 1);
    // the command itself, under our library: its argv says vite
    let script = "import socket,sys,time\ns=socket.socket()\ns.bind(('0.0.0.0',3000))\ns.listen()\nprint(s.getsockname()[1], flush=True)\ntime.sleep(600)";
    let mut c = w.preloaded(Some("claude"), "python3");
    c.args(["-c", script, "vite", "--port", "3000"]).current_dir(&project).env_remove("CLAUDE_PROJECT_DIR");
    let pid = w.spawn(with_styxy(&s, c), "vite");
    let port: u16 = wait_for(10, "vite", || w.output_of("vite").trim().parse().ok());
    assert_eq!(port, 3000, "the port Styxy's hook reserved for this command: {}", w.stderr_of("vite"));
    let held = s.held().unwrap();
    assert_eq!(held.keys().copied().collect::<Vec<_>>(), [3000], "only the hook's reservation: {}", s.summary());
    let up = upstream_when(&w, 5, "the reservation adopted", |u| u["mirrored"] == 1);
    assert_eq!((up["held_by_others"].as_u64(), up["conflicts"].as_u64()), (Some(0), Some(0)), "{up:#}");
    w.kill(pid);
    wait_for(10, "the reservation released with its server", || s.ports().filter(BTreeSet::is_empty));
}

#[test]
fn a_slow_release_in_styxy_never_delays_the_allocate_of_a_server_starting_meanwhile() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    start_daemon(&w, &s, &[]);
    let (a, pa, _) = python_server(&mut w, &s, "x", ("0.0.0.0", 8080), "x");
    wait_for(10, "mirrored", || s.ports().filter(|p| p.contains(&pa)));
    // Styxy's state-file lock makes the release of x's port take 2.5 s
    s.act("slowdelete 2500");
    w.kill(a);
    wait_for(10, "the release under way", || s.requests().into_iter().find(|r| r["status"] == "in flight"));
    // a server on 0.0.0.0 starting now is in Styxy's list only if its allocate gets there
    // before it listens (then Styxy's test-bind refuses it)
    let (_, pb, _) = python_server(&mut w, &s, "y", ("0.0.0.0", 8081), "y");
    let held = wait_for(10, "y's server in Styxy's list", || s.held().filter(|h| h.contains_key(&pb)));
    assert_eq!(held[&pb]["instance_id"], "y", "{}", s.summary());
    assert_eq!(daemon_status(&w)["upstream"]["served"], 0);
}

#[test]
fn ports_a_styxy_stopped_for_good_held_for_others_are_granted_again_after_a_minute() {
    let mut w = World::new();
    let prehold: Vec<String> = (3000..3100).map(|p| format!("{p}:dev:stopped")).collect();
    let s = Styxy::start(&mut w, 0, &[("FAKE_PREHOLD", &prehold.join(","))]);
    start_daemon(&w, &s, &[]);
    upstream_when(&w, 10, "Styxy's holdings read", |u| u["held_by_others"] == 100);
    // stopped, not gone: a freeze lasts seconds, so for a while its holdings still count
    // SAFETY: kill(2) of the stand-in this test started.
    unsafe { libc::kill(s.pid as i32, libc::SIGSTOP) };
    upstream_when(&w, 5, "Styxy busy", |u| u["busy"] == true && u["held_by_others"] == 100);
    let t = std::time::Instant::now();
    upstream_when(&w, 75, "Styxy taken for gone", |u| u["held_by_others"] == 0);
    assert!(t.elapsed().as_secs() >= 55, "a frozen Styxy's holdings were dropped after {:?}", t.elapsed());
    let (_, a, _) = python_server(&mut w, &s, "a", ("0.0.0.0", 3000), "a");
    let (_, b, _) = python_server(&mut w, &s, "b", ("0.0.0.0", 3000), "b");
    assert_eq!((a, b), (3000, 3001));
    // SAFETY: as above.
    unsafe { libc::kill(s.pid as i32, libc::SIGCONT) };
}

#[test]
fn a_command_starting_right_after_styxys_hook_gets_the_port_the_hook_reserved() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    start_daemon(&w, &s, &[]);
    upstream_when(&w, 10, "Styxy read", |u| u["last_refresh_ms"].is_u64());
    let project = w.path("project");
    std::fs::create_dir_all(&project).unwrap();
    let project = project.canonicalize().unwrap();
    let mut hook = w.cmd("bash");
    hook.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/styxy/universal-intercept.sh"));
    hook.args(["Bash", "npx vite --port 3000"]).current_dir(&project).env("STYXY_URL", format!("http://127.0.0.1:{}", s.port));
    hook.env("CLAUDE_PROJECT_DIR", &project);
    // the command starts at once (before the daemon read Styxy's list again)
    let script = "import socket,sys,time\ns=socket.socket()\ns.bind(('0.0.0.0',3000))\ns.listen()\nprint(s.getsockname()[1], flush=True)\ntime.sleep(600)";
    let mut c = w.preloaded(Some("claude"), "python3");
    c.args(["-c", script, "vite", "--port", "3000"]).current_dir(&project).env_remove("CLAUDE_PROJECT_DIR");
    let said = text(&run(hook).stdout);
    assert!(said.contains("Port 3000 allocated via Styxy"), "{said}");
    w.spawn(with_styxy(&s, c), "vite");
    let port: u16 = wait_for(10, "vite", || w.output_of("vite").trim().parse().ok());
    assert_eq!(port, 3000, "{}", s.summary());
    wait_for(10, "only the hook's reservation in Styxy", || s.ports().filter(|p| p.iter().eq([3000].iter())));
    upstream_when(&w, 5, "the reservation adopted", |u| u["mirrored"] == 1 && u["conflicts"] == 0);
}

#[test]
fn with_styxy_answering_a_bind_is_mirrored_there_in_one_round_trip_without_the_core() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    start_daemon(&w, &s, &[]);
    upstream_when(&w, 10, "Styxy read", |u| u["last_refresh_ms"].is_u64());
    let (a, pa, _) = python_server(&mut w, &s, "one", ("127.0.0.1", 3000), "one");
    let (b, pb, _) = python_server(&mut w, &s, "two", ("127.0.0.1", 3000), "two");
    assert_eq!(pa, 3000);
    assert_ne!(pb, 3000, "another session's port is moved");
    for pid in [a, b] {
        assert_eq!(ours_beside_the_shim(pid), Vec::<String>::new(), "pid {pid}: the shim is the whole library");
    }
    // Styxy was asked for each, named after the process and the port it asked for, as the
    // hooks' logic names them: before the bind, or — when the stand-in took longer than
    // the grant's wait on a loaded machine — by the upstream's worker right after
    let asked = wait_for(10, "both grants in Styxy", || {
        let asked: Vec<Value> = s.allocates().into_iter().map(|r| r["body"].clone()).collect();
        [pa, pb].iter().all(|p| asked.iter().any(|b| b["preferred_port"] == *p)).then_some(asked)
    });
    for (port, session) in [(pa, "one"), (pb, "two")] {
        let mine = asked.iter().find(|b| b["preferred_port"] == port).unwrap_or_else(|| panic!("{port}: {}", s.summary()));
        assert_eq!(
            (mine["service_name"].as_str(), mine["instance_id"].as_str(), mine["requested_port"].as_u64()),
            (Some("python3-3000"), Some(session), Some(3000)),
            "{mine}"
        );
    }
    assert!(s.ports().is_some_and(|p| p.contains(&pa) && p.contains(&pb)), "{}", s.summary());
}

#[test]
fn the_daemon_asks_styxy_on_one_kept_connection_and_vets_each_new_one() {
    let mut w = World::new();
    let s = Styxy::start(&mut w, 0, &[]);
    start_daemon(&w, &s, &[]);
    upstream_when(&w, 10, "Styxy read", |u| u["last_refresh_ms"].is_u64());
    let (_, pa, _) = python_server(&mut w, &s, "one", ("127.0.0.1", 3000), "one");
    let (_, pb, _) = python_server(&mut w, &s, "two", ("127.0.0.1", 3001), "two");
    wait_for(10, "both grants in Styxy", || s.ports().filter(|p| p.contains(&pa) && p.contains(&pb)));
    // both allocates came on the connection Styxy's status was polled on: no connect, no
    // check of Styxy's listener for either
    let asked: Vec<Value> = s.allocates_at_least(2);
    let polled: BTreeSet<u64> = s.requests().iter().filter(|r| r["path"] == "/status").filter_map(|r| r["peer"].as_u64()).collect();
    assert_eq!(asked.len(), 2, "{}", s.summary());
    assert_eq!(asked[0]["peer"], asked[1]["peer"], "{}", s.summary());
    assert!(polled.contains(&asked[0]["peer"].as_u64().unwrap()), "{}", s.summary());
    // Styxy ends, and another user listens on its port at once: the kept connection is
    // gone, and the new one is checked before anything is sent on it
    w.kill(s.pid);
    let (uid, dir, _) = intruder(&mut w, s.port);
    let up = upstream_when(&w, 10, "the intruder noticed", |u| u["untrusted"].is_string());
    assert!(up["untrusted"].as_str().unwrap().contains(&format!("uid {uid}")), "{up:#}");
    let (_, pc, _) = python_server(&mut w, &s, "three", ("127.0.0.1", 3002), "three");
    assert_eq!(pc, 3002);
    let seen = std::fs::read_to_string(dir.path().join("styxy.log")).unwrap_or_default();
    assert!(seen.is_empty(), "the daemon talked to the intruder: {seen}");
}
