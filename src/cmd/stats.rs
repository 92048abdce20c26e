//! `styxy-preload stats`: what coordination did, from the event log (across rotation)
//! and the coordinator's live allocations: per service type, per session, range use.

use std::collections::BTreeMap;

use serde::Serialize;
use styxy_preload_common::api::AllocationsReply;
use styxy_preload_common::eventlog::{self, Action, Event};
use styxy_preload_common::http::{self, Timeouts};
use styxy_preload_common::paths;
use styxy_preload_common::policy::Policy;

use crate::cli::StatsArgs;
use crate::coordinator;
use styxy_preload_common::text::cell;

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

    fn tally(mut self) -> Tally {
        self.latency_us.sort_unstable();
        let lat = &self.latency_us;
        let pct = |p: f64| (!lat.is_empty()).then(|| lat[((lat.len() - 1) as f64 * p).round() as usize]);
        Tally {
            binds: self.binds,
            eaddrinuse_retries: self.retries,
            errors: self.errors,
            kept: self.kept,
            latency_p50_us: pct(0.5),
            latency_p99_us: pct(0.99),
            passthrough_total: self.passthrough.values().sum(),
            passthrough: self.passthrough,
            remapped: self.remapped,
        }
    }
}

// `stats --json` prints these structs; their fields are in alphabetical order, the
// order of the JSON object keys since the first version.

/// What the binds of one service type (or all) came to.
#[derive(Serialize)]
struct Tally {
    binds: u64,
    eaddrinuse_retries: u64,
    errors: u64,
    kept: u64,
    latency_p50_us: Option<u64>,
    latency_p99_us: Option<u64>,
    /// Per reason (`reason_kind`).
    passthrough: BTreeMap<&'static str, u64>,
    passthrough_total: u64,
    remapped: u64,
}

#[derive(Serialize)]
struct SessionStats {
    binds: u64,
    /// `None` when no coordinator answers.
    ports_held_now: Option<usize>,
    remaps: u64,
}

/// How full a service type's range is now.
#[derive(Serialize)]
struct RangeUse {
    held: usize,
    service_type: String,
    size: usize,
    #[serde(rename = "use")]
    fraction: f64,
}

#[derive(Serialize)]
struct Stats {
    by_session: BTreeMap<String, SessionStats>,
    by_type: BTreeMap<String, Tally>,
    /// The coordinator asked for live allocations, if one answered.
    coordinator: Option<String>,
    /// Fullest first; only types holding a port.
    ranges_now: Vec<RangeUse>,
    /// Connects refused because another session's server holds the port (isolation).
    refused_connects: u64,
    session: Option<String>,
    since_s: Option<u64>,
    summary: String,
    totals: Tally,
}

pub fn run(a: StatsArgs) -> Result<i32, String> {
    crate::coordinator::settle_log();
    let path = paths::event_log_path();
    let events = match eventlog::read_all(&path) {
        Ok(ev) => ev,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let stats = gather(&a, &events);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&stats).unwrap_or_default());
    } else {
        print_tables(&stats);
    }
    Ok(0)
}

fn gather(a: &StatsArgs, events: &[Event]) -> Stats {
    let since_ms = a.since.map(|d| eventlog::now_ms().saturating_sub(d.as_millis() as u64));
    let wanted = |e: &&Event| since_ms.is_none_or(|t| e.ts >= t) && a.session.as_ref().is_none_or(|s| e.session.as_ref() == Some(s));
    let binds = events.iter().filter(|e| e.call == "bind" && e.action != Action::Observed).filter(wanted);
    let refused_connects = events.iter().filter(|e| e.call == "connect" && e.action == Action::Isolated).filter(wanted).count() as u64;

    let mut total = Counts::default();
    let mut by_type: BTreeMap<String, Counts> = BTreeMap::new();
    let mut by_session: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for e in binds {
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
    let mut ranges: Vec<RangeUse> = Vec::new();
    if let Some((_, allocs)) = &live {
        for t in &policy.types {
            let held = allocs.iter().filter(|x| x.service_type == t.name).count();
            let size = usize::from(t.range.1 - t.range.0) + 1;
            if held > 0 {
                ranges.push(RangeUse { service_type: t.name.clone(), held, size, fraction: held as f64 / size as f64 });
            }
        }
        ranges.sort_by(|x, y| y.fraction.partial_cmp(&x.fraction).unwrap_or(std::cmp::Ordering::Equal));
    }
    let by_session = by_session
        .into_iter()
        .map(|(s, (binds, remaps))| {
            let held = live.as_ref().map(|(_, allocs)| allocs.iter().filter(|x| x.instance_id.as_ref() == Some(&s)).count());
            (s, SessionStats { binds, remaps, ports_held_now: held })
        })
        .collect();
    let totals = total.tally();
    let by_type = by_type.into_iter().map(|(t, c)| (t, c.tally())).collect();

    let failed = totals.passthrough_total + totals.errors;
    let window = match a.since {
        Some(d) => format!("In the last {}", humantime::format_duration(d)),
        None => "In the whole log".to_string(),
    };
    let summary = format!(
        "{window}, {} server start{} asked for a coordinated port: {} got the port they asked for, {} would have collided and were moved, {} passed through uncoordinated or failed{}.",
        totals.binds,
        if totals.binds == 1 { "" } else { "s" },
        totals.kept,
        totals.remapped,
        failed,
        ranges.first().map(|r| format!("; the fullest range is {} ({} of {} ports held)", r.service_type, r.held, r.size)).unwrap_or_default()
    ) + &refused_summary(refused_connects);
    Stats {
        summary,
        since_s: a.since.map(|d| d.as_secs()),
        session: a.session.clone(),
        totals,
        by_type,
        by_session,
        ranges_now: ranges,
        refused_connects,
        coordinator: live.map(|(ep, _)| ep),
    }
}

/// The summary's sentence on isolation, when it refused anything.
fn refused_summary(n: u64) -> String {
    match n {
        0 => String::new(),
        1 => " 1 connect to another session's server was refused (isolation; `styxy-preload log` names it).".into(),
        n => format!(" {n} connects to other sessions' servers were refused (isolation; `styxy-preload log` names them)."),
    }
}

fn print_tables(s: &Stats) {
    let opt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    println!("{}\n", cell(&s.summary));
    println!(
        "{:<14} {:>6} {:>6} {:>8} {:>12} {:>7} {:>8} {:>9} {:>9}",
        "TYPE", "BINDS", "KEPT", "REMAPPED", "PASSTHROUGH", "ERRORS", "RETRIES", "P50 µs", "P99 µs"
    );
    for (t, v) in &s.by_type {
        println!(
            "{:<14} {:>6} {:>6} {:>8} {:>12} {:>7} {:>8} {:>9} {:>9}",
            cell(t),
            v.binds,
            v.kept,
            v.remapped,
            v.passthrough_total,
            v.errors,
            v.eaddrinuse_retries,
            opt(v.latency_p50_us),
            opt(v.latency_p99_us)
        );
    }
    if !s.by_session.is_empty() {
        println!("\n{:<24} {:>6} {:>7} {:>10}", "SESSION", "BINDS", "REMAPS", "HELD NOW");
        for (name, v) in &s.by_session {
            println!("{:<24} {:>6} {:>7} {:>10}", cell(name), v.binds, v.remaps, opt(v.ports_held_now.map(|n| n as u64)));
        }
    }
    if !s.ranges_now.is_empty() {
        println!("\n{:<14} {:>5} {:>5} {:>6}", "RANGE", "HELD", "SIZE", "USE");
        for r in &s.ranges_now {
            let pct = format!("{:.1}%", r.fraction * 100.0);
            println!("{:<14} {:>5} {:>5} {:>6}", cell(&r.service_type), r.held, r.size, pct);
        }
    }
}
