//! The shared port map under the real daemon's churn: deleted entries of its remap table
//! are reclaimed, so a connect's lookup stays as short as in a fresh map, and a reader in
//! another process never misses a live entry while the daemon works.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::*;
use styxy_preload_common::portmap::PortMap;
use styxy_preload_common::session::tag;

/// `POST /allocate` for `session`'s `requested` port of type `ty`, owned by this process.
fn allocate(w: &World, session: &str, ty: &str, requested: u16) -> (u16, String) {
    let body = serde_json::json!({
        "service_type": ty, "service_name": "churn", "preferred_port": requested, "requested_port": requested,
        "instance_id": session, "pid": std::process::id(),
    });
    let (status, v) = w.json("POST", "/allocate", Some(&body.to_string()));
    assert_eq!(status, 200, "{v}");
    (v["port"].as_u64().unwrap() as u16, v["lock_id"].as_str().unwrap().to_string())
}

/// Total probes of lookups for `n` (session, port) pairs nobody mapped.
fn unmapped_probes(map: &PortMap, n: u32) -> usize {
    (0..n).map(|k| map.lookup_probes(tag(&format!("nobody-{k}")), 3000 + (k % 100) as u16)).sum()
}

#[test]
fn the_remap_table_stays_short_after_100k_session_allocations() {
    let w = World::new();
    let out = w.cli().args(["daemon", "start", "--idle-exit", "0", "--grace", "0", "--no-upstream"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let map = Arc::new(PortMap::open_readonly(&w.path("run/styxy-preload/ports.map")).unwrap());

    // live all along: 50 dev ports of one session
    let keep: Vec<(u16, u16)> = (3000..3050).map(|r| (r, allocate(&w, "keep", "dev", r).0)).collect();
    let kt = tag("keep");
    for (r, p) in &keep {
        assert_eq!(map.lookup(kt, *r), Some(*p));
    }
    // another process's view while the daemon churns: never misses a live entry
    let stop = Arc::new(AtomicBool::new(false));
    let reader = std::thread::spawn({
        let (map, keep, stop) = (map.clone(), keep.clone(), stop.clone());
        move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (r, p) in &keep {
                    assert_eq!(map.lookup(kt, *r), Some(*p), "a live entry was missed while the daemon worked");
                }
                rounds += 1;
                std::thread::sleep(std::time::Duration::from_micros(200)); // leave the cores to the daemon
            }
            rounds
        }
    });

    // 100k allocations, each released at once: 2000 sessions × 50 api ports, every key
    // new; from 4 threads (the daemon works while a client waits), each with its own sessions
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..4 {
            let w = &w;
            s.spawn(move || {
                for i in t * 25_000..(t + 1) * 25_000 {
                    let (_, lock) = allocate(w, &format!("churn-{}", i / 50), "api", 8000 + (i % 50) as u16);
                    let r = w.call("DELETE", &format!("/allocate/{lock}"), None);
                    assert_eq!(r.status, 200, "release {i} {lock}: {}", text(&r.body));
                }
            });
        }
    });
    let churn = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let rounds = reader.join().expect("the reader saw every live entry");

    // the same live entries in a fresh map
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = PortMap::create(&fresh_dir.path().join("ports.map")).unwrap();
    for (r, p) in &keep {
        fresh.insert(kt, *r, *p);
    }
    let (after, before) = (unmapped_probes(&map, 1000), unmapped_probes(&fresh, 1000));
    eprintln!("100k allocations in {churn:?}; reader rounds {rounds}; probes for 1000 unmapped lookups: {after} (fresh map: {before})");
    for (r, p) in &keep {
        assert_eq!(map.lookup(kt, *r), Some(*p));
    }
    assert!(after <= 2 * before, "lookups probe {after} slots for 1000 unmapped keys, a fresh map {before}");
}
