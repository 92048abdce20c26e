//! `GET /metrics` in the Prometheus text format: allocate counters and a latency
//! histogram, held ports per type and live sessions.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::state::State;

const BUCKETS_US: [u64; 8] = [25, 50, 100, 250, 500, 1000, 5000, 25000];

#[derive(Default)]
pub struct Metrics {
    ok: AtomicU64,
    failed: AtomicU64,
    buckets: [AtomicU64; 8],
    sum_us: AtomicU64,
    /// `KEEP`s the hook server answered.
    pub hook_asks: AtomicU64,
    /// `NOTE`s it read: on a connection, and in its mailbox.
    pub hook_notes: [AtomicU64; 2],
    /// Styxy's allocates: how many were answered, and the time they took in all, as our
    /// client measured each (the bench's reference for a grant that waits for Styxy).
    styxy_answered: AtomicU64,
    styxy_us: AtomicU64,
}

impl Metrics {
    pub fn observe_allocate(&self, took: Duration, ok: bool) {
        let us = took.as_micros() as u64;
        if ok { &self.ok } else { &self.failed }.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        for (b, limit) in self.buckets.iter().zip(BUCKETS_US) {
            if us <= limit {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn observe_styxy(&self, took: Duration) {
        self.styxy_answered.fetch_add(1, Ordering::Relaxed);
        self.styxy_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn render(&self, st: &State) -> String {
        let mut out = String::new();
        let ok = self.ok.load(Ordering::Relaxed);
        let failed = self.failed.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP styxy_allocate_requests_total Allocate requests by result.");
        let _ = writeln!(out, "# TYPE styxy_allocate_requests_total counter");
        let _ = writeln!(out, "styxy_allocate_requests_total{{result=\"granted\"}} {ok}");
        let _ = writeln!(out, "styxy_allocate_requests_total{{result=\"refused\"}} {failed}");
        let _ = writeln!(out, "# HELP styxy_allocate_duration_seconds Time to answer an allocate.");
        let _ = writeln!(out, "# TYPE styxy_allocate_duration_seconds histogram");
        for (b, limit) in self.buckets.iter().zip(BUCKETS_US) {
            let _ = writeln!(out, "styxy_allocate_duration_seconds_bucket{{le=\"{}\"}} {}", limit as f64 / 1e6, b.load(Ordering::Relaxed));
        }
        let _ = writeln!(out, "styxy_allocate_duration_seconds_bucket{{le=\"+Inf\"}} {}", ok + failed);
        let _ = writeln!(out, "styxy_allocate_duration_seconds_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "styxy_allocate_duration_seconds_count {}", ok + failed);
        let _ = writeln!(out, "# HELP styxy_hook_asks_total Questions on hook.sock (a bind's KEEP).");
        let _ = writeln!(out, "# TYPE styxy_hook_asks_total counter");
        let _ = writeln!(out, "styxy_hook_asks_total {}", self.hook_asks.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP styxy_hook_notes_total What the hooks told with no answer awaited, by how it came.");
        let _ = writeln!(out, "# TYPE styxy_hook_notes_total counter");
        for (via, n) in ["socket", "mailbox"].iter().zip(&self.hook_notes) {
            let _ = writeln!(out, "styxy_hook_notes_total{{via=\"{via}\"}} {}", n.load(Ordering::Relaxed));
        }
        let _ = writeln!(out, "# HELP styxy_upstream_allocate_seconds Time Styxy took to answer the daemon's allocates.");
        let _ = writeln!(out, "# TYPE styxy_upstream_allocate_seconds summary");
        let _ = writeln!(out, "styxy_upstream_allocate_seconds_sum {}", self.styxy_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "styxy_upstream_allocate_seconds_count {}", self.styxy_answered.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP styxy_ports_held Ports held now, by service type.");
        let _ = writeln!(out, "# TYPE styxy_ports_held gauge");
        for t in st.types() {
            let n = st.allocations().filter(|a| a.service_type == t.name).count();
            let _ = writeln!(out, "styxy_ports_held{{service_type=\"{}\"}} {n}", t.name);
        }
        let mut sessions: Vec<&str> = st.allocations().filter_map(|a| a.session.as_deref()).collect();
        sessions.sort_unstable();
        sessions.dedup();
        let _ = writeln!(out, "# HELP styxy_live_sessions Sessions holding at least one port.");
        let _ = writeln!(out, "# TYPE styxy_live_sessions gauge");
        let _ = writeln!(out, "styxy_live_sessions {}", sessions.len());
        out
    }
}
