//! `styxy-preload stats`: what coordination did, from the event log (across rotation)
//! and the coordinator's live allocations: per service type, per session, range use.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use styxy_preload_client::api::AllocationsReply;
use styxy_preload_client::eventlog::{self, Action, Event};
use styxy_preload_client::http::{self, Timeouts};
use styxy_preload_client::paths;
use styxy_preload_client::policy::Policy;

use crate::cli::StatsArgs;
use crate::coordinator;
use styxy_preload_client::text::cell;

/// The pass-through reasons `stats` tells apart.
fn reason_kind(e: &Event) -> &'static str {
    let r = e.reason.as_deref().unwrap_or("");
    match r {
        "no coordinator" => "no_coordinator",
        "coordinator timeout" => "timeout",
        _ if r.contains("429") => "rate_limited",
        _ if r.contains("No available ports") => "range_exhausted",
        _ if r.starts_with("single-instance") => "single_instance",
        _ => "error",
    }
}

#[derive(Default)]
struct Counts {
    binds: u64,
    kept: u64,
    remapped: u64,
    passthrough: BTreeMap<&'static str, u64>,
    errors: u64,
    retries: u64,
    latency_us: Vec<u64>,
}

impl Counts {
    fn add(&mut self, e: &Event) {
        self.binds += 1;
        self.retries += u64::from(e.retries);
        match e.action {
            Action::Kept => self.kept += 1,
            Action::Remapped => self.remapped += 1,
            Action::Passthrough => *self.passthrough.entry(reason_kind(e)).or_default() += 1,
            _ => self.errors += 1,
        }
        if matches!(e.action, Action::Kept | Action::Remapped) {
            self.latency_us.push(e.latency_us);
        }
    }

    fn json(&mut self) -> Value {
        self.latency_us.sort_unstable();
        let pct =
            |p: f64| (!self.latency_us.is_empty()).then(|| self.latency_us[((self.latency_us.len() - 1) as f64 * p).round() as usize]);
        json!({
            "binds": self.binds, "kept": self.kept, "remapped": self.remapped,
            "passthrough": self.passthrough, "passthrough_total": self.passthrough.values().sum::<u64>(),
            "errors": self.errors, "eaddrinuse_retries": self.retries,
            "latency_p50_us": pct(0.5), "latency_p99_us": pct(0.99),
        })
    }
}

pub fn run(a: StatsArgs) -> Result<i32, String> {
    crate::coordinator::settle_log();
    let path = paths::event_log_path();
    let events = match eventlog::read_all(&path) {
        Ok(ev) => ev,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let since_ms = a.since.map(|d| eventlog::now_ms().saturating_sub(d.as_millis() as u64));
    let binds: Vec<&Event> = events
        .iter()
        .filter(|e| e.call == "bind" && e.action != Action::Observed)
        .filter(|e| since_ms.is_none_or(|t| e.ts >= t) && a.session.as_ref().is_none_or(|s| e.session.as_ref() == Some(s)))
        .collect();

    let mut total = Counts::default();
    let mut by_type: BTreeMap<String, Counts> = BTreeMap::new();
    let mut by_session: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for e in &binds {
        total.add(e);
        by_type.entry(e.service_type.clone().unwrap_or_else(|| "-".into())).or_default().add(e);
        let s = by_session.entry(e.session.clone().unwrap_or_else(|| "(none)".into())).or_default();
        s.0 += 1;
        s.1 += u64::from(e.action == Action::Remapped);
    }

    // what is held now, if a coordinator answers
    let live = coordinator::local().ok().and_then(|ep| {
        let r = http::call(&ep, "GET", "/allocations", None, Timeouts::CLI).ok()?;
        let list: AllocationsReply = r.json().ok()?;
        Some((ep.to_string(), list.allocations))
    });
    let policy = Policy::from_env().0;
    let mut ranges: Vec<Value> = Vec::new();
    if let Some((_, allocs)) = &live {
        for t in &policy.types {
            let held = allocs.iter().filter(|x| x.service_type == t.name).count();
            let size = usize::from(t.range.1 - t.range.0) + 1;
            if held > 0 {
                ranges.push(json!({"service_type": t.name, "held": held, "size": size, "use": held as f64 / size as f64}));
            }
        }
        ranges.sort_by(|x, y| y["use"].as_f64().partial_cmp(&x["use"].as_f64()).unwrap_or(std::cmp::Ordering::Equal));
    }
    let sessions: BTreeMap<&String, Value> = by_session
        .iter()
        .map(|(s, (b, r))| {
            let held = live.as_ref().map(|(_, allocs)| allocs.iter().filter(|x| x.instance_id.as_ref() == Some(s)).count());
            (s, json!({"binds": b, "remaps": r, "ports_held_now": held}))
        })
        .collect();

    let failed = total.passthrough.values().sum::<u64>() + total.errors;
    let window = match a.since {
        Some(d) => format!("In the last {}", humantime::format_duration(d)),
        None => "In the whole log".to_string(),
    };
    let summary = format!(
        "{window}, {} server start{} asked for a coordinated port: {} got the port they asked for, {} would have collided and were moved, {} passed through uncoordinated or failed{}.",
        total.binds,
        if total.binds == 1 { "" } else { "s" },
        total.kept,
        total.remapped,
        failed,
        ranges.first().map(|r| format!("; the fullest range is {} ({} of {} ports held)", r["service_type"].as_str().unwrap_or("?"), r["held"], r["size"])).unwrap_or_default()
    );
    let mut types = serde_json::Map::new();
    for (t, c) in by_type.iter_mut() {
        types.insert(t.clone(), c.json());
    }
    let out = json!({
        "summary": summary,
        "since_s": a.since.map(|d| d.as_secs()),
        "session": a.session,
        "totals": total.json(),
        "by_type": types,
        "by_session": sessions,
        "ranges_now": ranges,
        "coordinator": live.as_ref().map(|(ep, _)| ep.clone()),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(0);
    }
    // Value's Display ignores widths: format numbers as strings first
    let num = |v: &Value| v.as_u64().map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    println!("{}\n", cell(&summary));
    println!(
        "{:<14} {:>6} {:>6} {:>8} {:>12} {:>7} {:>8} {:>9} {:>9}",
        "TYPE", "BINDS", "KEPT", "REMAPPED", "PASSTHROUGH", "ERRORS", "RETRIES", "P50 µs", "P99 µs"
    );
    for (t, v) in &types {
        let n = |k: &str| num(&v[k]);
        println!(
            "{:<14} {:>6} {:>6} {:>8} {:>12} {:>7} {:>8} {:>9} {:>9}",
            cell(t),
            n("binds"),
            n("kept"),
            n("remapped"),
            n("passthrough_total"),
            n("errors"),
            n("eaddrinuse_retries"),
            n("latency_p50_us"),
            n("latency_p99_us")
        );
    }
    if !sessions.is_empty() {
        println!("\n{:<24} {:>6} {:>7} {:>10}", "SESSION", "BINDS", "REMAPS", "HELD NOW");
        for (s, v) in &sessions {
            println!("{:<24} {:>6} {:>7} {:>10}", cell(s), num(&v["binds"]), num(&v["remaps"]), num(&v["ports_held_now"]));
        }
    }
    if !ranges.is_empty() {
        println!("\n{:<14} {:>5} {:>5} {:>6}", "RANGE", "HELD", "SIZE", "USE");
        for r in &ranges {
            let pct = format!("{:.1}%", r["use"].as_f64().unwrap_or(0.0) * 100.0);
            println!("{:<14} {:>5} {:>5} {:>6}", cell(r["service_type"].as_str().unwrap_or("?")), num(&r["held"]), num(&r["size"]), pct);
        }
    }
    Ok(0)
}
