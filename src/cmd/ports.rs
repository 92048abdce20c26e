//! `styxy-preload ports`: the coordinator's live allocations.

use styxy_preload_common::api::AllocationsReply;
use styxy_preload_common::http::{self, Timeouts};

use crate::coordinator;
use styxy_preload_common::text::cell;

pub fn run(json: bool) -> Result<i32, String> {
    let ep = coordinator::local()?;
    let res = http::call(&ep, "GET", "/allocations", None, Timeouts::CLI)
        .map_err(|e| format!("{ep}: {e}. Start the daemon with `styxy-preload daemon start`"))?;
    if res.status != 200 {
        return Err(format!("{ep} answered HTTP {} to GET /allocations", res.status));
    }
    let reply: AllocationsReply = res.json().map_err(|e| e.to_string())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply.allocations).unwrap_or_default());
        return Ok(0);
    }
    if reply.allocations.is_empty() {
        println!("no allocations at {ep}");
        return Ok(0);
    }
    println!(
        "{:>5}  {:<14}  {:<20}  {:<16}  {:<15}  {:>9}  {:>6}  STYXY",
        "PORT", "TYPE", "SESSION", "PIDS", "COMMAND", "REQUESTED", "AGE"
    );
    for a in &reply.allocations {
        let pids = if a.pids.is_empty() {
            a.process_id.map(|p| p.to_string()).unwrap_or_default()
        } else {
            a.pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        };
        println!(
            "{:>5}  {:<14}  {:<20}  {:<16}  {:<15}  {:>9}  {:>6}  {}",
            a.port,
            cell(&a.service_type),
            cell(a.instance_id.as_deref().unwrap_or("-")),
            pids,
            cell(a.comm.as_deref().unwrap_or("-")),
            a.requested_port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            a.age_s.map(age).unwrap_or_default(),
            standing(a)
        );
    }
    Ok(0)
}

/// The allocation's standing in the upstream Styxy (`mirrored`, `served`, `pending`,
/// `conflict`), or `-` without one.
fn standing(a: &styxy_preload_common::api::AllocationInfo) -> String {
    cell(a.upstream.as_ref().and_then(|u| u["state"].as_str()).unwrap_or("-")).into_owned()
}

fn age(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}
