//! The built-in daemon's API against a real daemon process: shapes, bad input,
//! concurrency, TCP auth, restart recovery, liveness and grace-period stickiness.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use styxy_preload_common::http::{self, Endpoint, Timeouts};

fn alloc(w: &World, body: Value) -> (u16, Value) {
    w.json("POST", "/allocate", Some(&body.to_string()))
}

#[test]
fn answers_styxy_shapes_over_the_unix_socket() {
    let w = World::new();
    w.start_daemon();
    let (st, v) = w.json("GET", "/status", None);
    assert_eq!((st, v["status"].as_str()), (200, Some("running")));
    let (st, v) = w.json("GET", "/config", None);
    assert_eq!(st, 200);
    assert_eq!(v["service_types"].as_object().unwrap().len(), 17);
    assert_eq!(v["service_types"]["test"]["range"], json!([9200, 9299]));
    // the socket is private: 0600 in a 0700 directory
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&w.socket()), 0o600);
    assert_eq!(mode(w.socket().parent().unwrap()), 0o700);

    let (st, v) = alloc(&w, json!({"service_type": "storybook", "service_name": "sb", "instance_id": "s1", "dry_run": true}));
    assert_eq!((st, v["dry_run"].as_bool()), (200, Some(true)));
    let (st, v) = alloc(&w, json!({"service_type": "storybook", "service_name": "sb", "instance_id": "s1", "preferred_port": "6010"}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["success"], json!(true));
    let port = v["port"].as_u64().unwrap();
    let lock = v["lock_id"].as_str().unwrap().to_string();
    assert!((6006..=6029).contains(&port));
    let (_, list) = w.json("GET", "/allocations", None);
    let a = &list["allocations"][0];
    assert_eq!((a["lockId"].as_str(), a["serviceType"].as_str(), a["instance_id"].as_str()), (Some(&*lock), Some("storybook"), Some("s1")));
    // the client's own pid is recorded (the peer of the Unix socket: this test process)
    assert_eq!(a["process_id"].as_u64(), Some(u64::from(std::process::id())));
    let (st, v) = w.json("GET", &format!("/check/{port}"), None);
    assert_eq!((st, v["available"].as_bool()), (200, Some(false)));
    let (st, v) = w.json("DELETE", &format!("/allocate/{lock}"), None);
    assert_eq!((st, v["port"].as_u64()), (200, Some(port)));
    let (st, v) = w.json("DELETE", &format!("/allocate/{lock}"), None);
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("not found"));
    let (st, v) = w.json("POST", "/instance/register", Some(r#"{"instance_id":"agent-1"}"#));
    assert_eq!((st, v["instance_id"].as_str()), (200, Some("agent-1")));
    let (st, _) = w.json("PUT", "/instance/agent-1/heartbeat", None);
    assert_eq!(st, 200);
    let (st, _) = w.json("PUT", "/instance/nobody/heartbeat", None);
    assert_eq!(st, 404);
    let (st, v) = w.json("GET", "/suggest/docs?count=3", None);
    assert_eq!((st, v["suggestions"].as_array().map(Vec::len)), (200, Some(3)));
}

#[test]
fn bad_input_gets_a_json_4xx_and_the_daemon_keeps_serving() {
    let w = World::new();
    w.start_daemon();
    let cases: &[(&str, &str, &str, u16)] = &[
        ("POST", "/allocate", "{", 400),
        ("POST", "/allocate", "[]", 400),
        ("POST", "/allocate", r#"{"service_type": 5}"#, 400),
        ("POST", "/allocate", r#"{"service_name": "x"}"#, 400),
        ("POST", "/allocate", r#"{"service_type": "dev", "preferred_port": 70000}"#, 400),
        ("POST", "/allocate", r#"{"service_type": "dev", "preferred_port": 0}"#, 400),
        ("POST", "/allocate", r#"{"service_type": "dev", "preferred_port": null}"#, 400),
        ("POST", "/allocate", r#"{"service_type": "dev", "preferred_port": "abc"}"#, 400),
        ("POST", "/allocate", r#"{"service_type": "Dev"}"#, 400),
        ("POST", "/allocate", r#"{"service_type": "bad_name"}"#, 400),
        ("POST", "/allocate", r#"{"service_type": "dev", "instance_id": "../../etc"}"#, 400),
        ("POST", "/allocate", r#"{"service_type": "dev", "dry_run": "yes"}"#, 400),
        ("DELETE", "/allocate/not-a-uuid", "", 400),
        ("DELETE", "/allocate/00000000-0000-4000-8000-000000000000", "", 400),
        ("GET", "/check/99999", "", 400),
        ("GET", "/nope", "", 404),
    ];
    for (m, p, body, want) in cases {
        let long = format!(r#"{{"service_type": "dev", "instance_id": "{}"}}"#, "x".repeat(500));
        let r = http::call(&w.endpoint(), m, p, (!body.is_empty()).then_some(body.as_bytes()), Timeouts::CLI).unwrap();
        assert_eq!(r.status, *want, "{m} {p} {body}: {}", text(&r.body));
        let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("{m} {p}: not JSON: {}", text(&r.body)));
        assert_eq!(v["success"], json!(false), "{m} {p}");
        assert!(!v["error"].as_str().unwrap_or("").is_empty());
        let r = http::call(&w.endpoint(), "POST", "/allocate", Some(long.as_bytes()), Timeouts::CLI).unwrap();
        assert_eq!(r.status, 400);
    }
    // a huge body: 413, read to its end so the client gets the answer
    let huge = vec![b'x'; 2_000_000];
    let r = http::call(&w.endpoint(), "POST", "/allocate", Some(&huge), Timeouts::CLI).unwrap();
    assert_eq!(r.status, 413);
    // a client that sends half a request and stalls does not block the others
    let mut stall = std::os::unix::net::UnixStream::connect(w.socket()).unwrap();
    stall.write_all(b"POST /allocate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{").unwrap();
    let t = std::time::Instant::now();
    let (st, _) = w.json("GET", "/status", None);
    assert_eq!(st, 200);
    assert!(t.elapsed() < Duration::from_secs(1));
    let (st, _) = alloc(&w, json!({"service_type": "docs"}));
    assert_eq!(st, 200);
}

#[test]
fn hundred_concurrent_allocations_are_distinct_and_the_101st_is_refused() {
    let w = World::new();
    w.start_daemon();
    let ep = w.endpoint();
    let handles: Vec<_> = (0..100)
        .map(|i| {
            let ep = ep.clone();
            std::thread::spawn(move || {
                let body = json!({"service_type": "api", "instance_id": format!("c{i}"), "service_name": "t"}).to_string();
                let r = http::call(&ep, "POST", "/allocate", Some(body.as_bytes()), Timeouts::CLI).unwrap();
                assert_eq!(r.status, 200, "{}", text(&r.body));
                serde_json::from_slice::<Value>(&r.body).unwrap()["port"].as_u64().unwrap()
            })
        })
        .collect();
    let mut ports: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    ports.sort_unstable();
    ports.dedup();
    // ports some other process of this machine listens on are never granted, so the
    // range may hold fewer than 100 free ports: every free one is granted exactly once
    let busy = (8000..=8099u16).filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_err()).count();
    assert_eq!(ports.len(), 100 - busy.min(100), "granted {ports:?}");
    let (st, v) = alloc(&w, json!({"service_type": "api", "instance_id": "last"}));
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("No available ports in range 8000-8099"), "{v}");
    assert_eq!(w.json("GET", "/status", None).0, 200);
}

#[test]
fn tcp_needs_the_bearer_token() {
    let mut w = World::new();
    // a free TCP port for the daemon's listener
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = w.cli();
    cmd.args(["daemon", "run", "--idle-exit", "0", "--http", &format!("127.0.0.1:{port}")]);
    w.spawn(cmd, "daemon");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let open = Endpoint::Tcp { addr, token: None };
    wait_for(10, "daemon on TCP", || styxy_preload_common::discovery::answers(&open, Timeouts::CLI).then_some(()));
    let token = std::fs::read_to_string(w.path("run/styxy-preload/token")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(w.path("run/styxy-preload/token")).unwrap().permissions().mode() & 0o777, 0o600);
    let body = br#"{"service_type":"docs"}"#;
    let r = http::call(&open, "POST", "/allocate", Some(body), Timeouts::CLI).unwrap();
    assert_eq!(r.status, 401);
    let bad = Endpoint::Tcp { addr, token: Some("nope".into()) };
    assert_eq!(http::call(&bad, "GET", "/allocations", None, Timeouts::CLI).unwrap().status, 401);
    let good = Endpoint::Tcp { addr, token: Some(token.trim().into()) };
    let r = http::call(&good, "POST", "/allocate", Some(body), Timeouts::CLI).unwrap();
    assert_eq!(r.status, 200, "{}", text(&r.body));
}

/// A process that lives until killed, to own allocations.
fn sleeper(w: &mut World, name: &str) -> u32 {
    let mut c = w.cmd("sleep");
    c.arg("300");
    w.spawn(c, name)
}

#[test]
fn a_killed_owner_frees_its_port_and_a_restart_keeps_live_allocations() {
    let mut w = World::new();
    w.start_daemon();
    let live = sleeper(&mut w, "live");
    let doomed = sleeper(&mut w, "doomed");
    let (_, a) =
        alloc(&w, json!({"service_type": "dev", "preferred_port": 3010, "requested_port": 3010, "instance_id": "live", "pid": live}));
    let (_, b) =
        alloc(&w, json!({"service_type": "dev", "preferred_port": 3011, "requested_port": 3011, "instance_id": "doomed", "pid": doomed}));
    assert_eq!((a["port"].as_u64(), b["port"].as_u64()), (Some(3010), Some(3011)));
    // taken while its owner lives
    let (_, c) = alloc(&w, json!({"service_type": "dev", "preferred_port": 3011, "instance_id": "other", "pid": live}));
    assert_ne!(c["port"].as_u64(), Some(3011));
    w.kill(doomed);
    let (_, d) = wait_for(10, "3011 freed after its owner died", || {
        let (st, v) = w.json("GET", "/check/3011", None);
        (st == 200 && v["available"] == json!(true)).then_some((st, v))
    });
    assert_eq!(d["allocated_to"], Value::Null);
    let (_, e) = alloc(&w, json!({"service_type": "dev", "preferred_port": 3011, "instance_id": "again", "pid": live}));
    assert_eq!(e["port"].as_u64(), Some(3011));

    // SIGKILL the daemon once its state is on disk, restart: live allocations are back
    let state = w.path("state/styxy-preload/daemon-state.json");
    wait_for(10, "state persisted", || std::fs::read_to_string(&state).ok().filter(|s| s.contains("\"again\"")));
    // SAFETY: this world's daemon.
    unsafe { libc::kill(w.daemon_pid().unwrap(), libc::SIGKILL) };
    w.start_daemon();
    let (_, list) = w.json("GET", "/allocations", None);
    let mut ports: Vec<u64> = list["allocations"].as_array().unwrap().iter().map(|a| a["port"].as_u64().unwrap()).collect();
    ports.sort_unstable();
    assert_eq!(ports.len(), 3, "{list}");
    assert!(ports.contains(&3010) && ports.contains(&3011));
    // and no port is granted twice after the restart
    let (_, f) = alloc(&w, json!({"service_type": "dev", "preferred_port": 3010, "instance_id": "new", "pid": live}));
    assert!(!ports.contains(&f["port"].as_u64().unwrap()));
}

#[test]
fn a_corrupt_state_file_is_moved_aside() {
    let w = World::new();
    let dir = w.path("state/styxy-preload");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("daemon-state.json"), b"{\"allocations\": [tru").unwrap();
    w.start_daemon();
    assert_eq!(w.json("GET", "/status", None).0, 200);
    let aside: Vec<_> =
        std::fs::read_dir(&dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains("corrupt")).collect();
    assert_eq!(aside.len(), 1);
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap();
    assert!(log.contains("corrupt") && log.contains("moved aside"), "{log}");
}

#[test]
fn a_session_gets_its_port_back_within_the_grace_period() {
    let mut w = World::new();
    w.start_daemon();
    let holder = sleeper(&mut w, "holder");
    let server = sleeper(&mut w, "server");
    let (_, a) =
        alloc(&w, json!({"service_type": "dev", "preferred_port": 3020, "requested_port": 3020, "instance_id": "a", "pid": holder}));
    let (_, b) =
        alloc(&w, json!({"service_type": "dev", "preferred_port": 3020, "requested_port": 3020, "instance_id": "b", "pid": server}));
    assert_eq!(a["port"].as_u64(), Some(3020));
    let b_port = b["port"].as_u64().unwrap();
    assert_ne!(b_port, 3020);
    // b's server restarts: its process dies, the allocation is freed…
    w.kill(server);
    wait_for(10, "b's port freed", || {
        let (_, v) = w.json("GET", &format!("/check/{b_port}"), None);
        (v["available"] == json!(true)).then_some(())
    });
    // …and a releases 3020, so the requested port is free again
    let (st, _) = w.json("DELETE", &format!("/allocate/{}", a["lock_id"].as_str().unwrap()), None);
    assert_eq!(st, 200);
    let restarted = sleeper(&mut w, "restarted");
    let (_, again) =
        alloc(&w, json!({"service_type": "dev", "preferred_port": 3020, "requested_port": 3020, "instance_id": "b", "pid": restarted}));
    assert_eq!(again["port"].as_u64(), Some(b_port), "the restarted server gets its old port back");
    // another session asking for 3020 gets 3020 itself
    let (_, c) =
        alloc(&w, json!({"service_type": "dev", "preferred_port": 3020, "requested_port": 3020, "instance_id": "c", "pid": restarted}));
    assert_eq!(c["port"].as_u64(), Some(3020));
}

#[test]
fn metrics_are_prometheus_text() {
    let w = World::new();
    w.start_daemon();
    alloc(&w, json!({"service_type": "docs", "instance_id": "m"}));
    let r = w.call("GET", "/metrics", None);
    let body = text(&r.body);
    assert_eq!(r.status, 200);
    assert!(body.contains("# TYPE styxy_allocate_requests_total counter"));
    assert!(body.contains("styxy_allocate_requests_total{result=\"granted\"} 1"), "{body}");
    assert!(body.contains("styxy_ports_held{service_type=\"docs\"} 1"));
}
