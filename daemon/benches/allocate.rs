//! Allocate+release round trips against a running built-in daemon, a fresh
//! connection per request as the preload library makes them.
//!
//! `cargo bench -p styxy-preload-daemon --bench allocate -- SOCKET CLIENTS SECONDS`
//! prints one JSON line: clients, round trips per second, allocate p50/p99 in µs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use styxy_preload_client::http::{self, Endpoint, Timeouts};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let [socket, clients, secs] = &args[..] else {
        eprintln!("usage: allocate SOCKET CLIENTS SECONDS");
        std::process::exit(2);
    };
    let ep = Endpoint::Unix(PathBuf::from(socket));
    let clients: usize = clients.parse().expect("CLIENTS");
    let run_for = Duration::from_secs_f64(secs.parse().expect("SECONDS"));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let ep = ep.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let body = format!(r#"{{"service_type":"api","service_name":"bench","instance_id":"bench-{i}"}}"#);
                while start.elapsed() < run_for {
                    let t = Instant::now();
                    let r = http::call(&ep, "POST", "/allocate", Some(body.as_bytes()), Timeouts::CLI).expect("allocate");
                    lat.push(t.elapsed());
                    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
                    let lock = v["lock_id"].as_str().unwrap_or_else(|| panic!("no lock id: {v}"));
                    http::call(&ep, "DELETE", &format!("/allocate/{lock}"), None, Timeouts::CLI).expect("release");
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).map(|d| d.as_secs_f64() * 1e6).unwrap_or(0.0);
    println!(
        r#"{{"clients":{clients},"round_trips_per_s":{:.0},"allocate_p50_us":{:.1},"allocate_p99_us":{:.1},"n":{}}}"#,
        lat.len() as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        lat.len()
    );
}
