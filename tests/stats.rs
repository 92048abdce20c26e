//! Observability: `stats --json` counts exactly what happened; the daemon's `/metrics`
//! is Prometheus text whose counters match; the event log stays under its cap.

mod common;

use common::*;
use serde_json::Value;

fn serve(w: &mut World, session: &str, port: u16, name: &str) -> u16 {
    let mut c = w.preloaded(Some(session), fixture("binder"));
    c.args(["serve", &port.to_string()]);
    let pid = w.spawn(c, name);
    wait_for(10, name, || listening_ports(pid).into_iter().next())
}

fn stats(w: &World, args: &[&str]) -> Value {
    let mut c = w.cli();
    c.arg("stats").arg("--json").args(args);
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn stats_and_metrics_count_exactly_what_happened() {
    let mut w = World::new();
    w.start_daemon();
    assert_eq!(serve(&mut w, "a", 4100, "a1"), 4100);
    assert_ne!(serve(&mut w, "b", 4100, "b1"), 4100);
    assert_ne!(serve(&mut w, "c", 4100, "c1"), 4100);
    assert_eq!(serve(&mut w, "a", 8090, "a2"), 8090);

    // the daemon's counters, read with a Prometheus parser
    let body = text(&w.call("GET", "/metrics", None).body);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text");
    let value = |name: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no {name} {label:?} in {body}"))
    };
    assert_eq!(value("styxy_allocate_requests_total", Some(("result", "granted"))), 4.0);
    assert_eq!(value("styxy_ports_held", Some(("service_type", "docs"))), 3.0);
    assert_eq!(value("styxy_ports_held", Some(("service_type", "api"))), 1.0);
    assert_eq!(value("styxy_live_sessions", None), 3.0);
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "styxy_allocate_duration_seconds" && matches!(s.value, prometheus_parse::Value::Histogram(_))),
        "{body}"
    );

    // one run with the daemon stopped: passes through
    let st = run({
        let mut c = w.cli();
        c.args(["daemon", "stop"]);
        c
    });
    assert!(st.status.success());
    let mut c = w.preloaded(Some("d"), "python3");
    c.args(["-c", "import socket; s=socket.socket(); s.bind(('127.0.0.1',4150)); print(s.getsockname()[1])"]);
    let out = run(c);
    assert_eq!(text(&out.stdout).trim(), "4150", "{}", text(&out.stderr));
    w.start_daemon(); // recovers a, b, c from its state file

    let s = stats(&w, &[]);
    let docs = &s["by_type"]["docs"];
    assert_eq!((docs["binds"].as_u64(), docs["kept"].as_u64(), docs["remapped"].as_u64()), (Some(4), Some(1), Some(2)), "{s:#}");
    assert_eq!(docs["passthrough"]["no_coordinator"].as_u64(), Some(1), "{s:#}");
    assert!(docs["latency_p50_us"].as_u64().is_some());
    let api = &s["by_type"]["api"];
    assert_eq!((api["binds"].as_u64(), api["kept"].as_u64(), api["remapped"].as_u64()), (Some(1), Some(1), Some(0)));
    let sess = &s["by_session"];
    assert_eq!(
        (sess["a"]["binds"].as_u64(), sess["a"]["remaps"].as_u64(), sess["a"]["ports_held_now"].as_u64()),
        (Some(2), Some(0), Some(2)),
        "{s:#}"
    );
    assert_eq!(
        (sess["b"]["binds"].as_u64(), sess["b"]["remaps"].as_u64(), sess["b"]["ports_held_now"].as_u64()),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(
        (sess["d"]["binds"].as_u64(), sess["d"]["remaps"].as_u64(), sess["d"]["ports_held_now"].as_u64()),
        (Some(1), Some(0), Some(0))
    );
    assert_eq!(s["totals"]["binds"].as_u64(), Some(5));
    assert_eq!(s["ranges_now"][0]["service_type"], "docs", "{s:#}");
    let summary = s["summary"].as_str().unwrap();
    assert!(
        summary.contains("5 server starts") && summary.contains("2 would have collided") && summary.contains("1 passed through"),
        "{summary}"
    );
    // filters
    assert_eq!(stats(&w, &["--session", "b"])["totals"]["binds"].as_u64(), Some(1));
    assert_eq!(stats(&w, &["--since", "1h"])["totals"]["binds"].as_u64(), Some(5));
}

#[test]
fn the_log_rotates_under_its_cap_and_stats_reads_across_rotation() {
    let w = World::new();
    w.start_daemon();
    let cap = 4000u64;
    // 20 coordinated binds of 20 ports in one process: 20 events of ~300 bytes, past the cap once
    let script = "import socket\nfor i in range(20):\n  s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1',4110+i)); s.close()";
    let mut c = w.preloaded(Some("rot"), "python3");
    c.args(["-c", script]).env("STYXY_PRELOAD_LOG_MAX", cap.to_string());
    assert!(run(c).status.success());
    let _ = w.events(); // once the daemon has logged every bind
    let log = w.log_path();
    let cur = std::fs::metadata(&log).unwrap().len();
    let rotated = std::fs::metadata(styxy_preload_common::eventlog::rotated_path(&log)).unwrap().len();
    assert!(cur <= cap && rotated <= cap, "current {cur}, rotated {rotated}, cap {cap}");
    let s = stats(&w, &[]);
    assert_eq!(s["totals"]["binds"].as_u64(), Some(20), "{s:#}");
    assert_eq!(s["totals"]["kept"].as_u64(), Some(20));
}
