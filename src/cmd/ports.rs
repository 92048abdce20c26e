//! `styxy-preload ports`: the coordinator's live allocations, and the sessions' servers
//! on ports nobody coordinates.

use styxy_preload_common::api::AllocationsReply;
use styxy_preload_common::http::{self, Timeouts};
use styxy_preload_common::{envvars, procinfo};

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
    } else {
        allocations_table(&reply);
    }
    let allocated: Vec<u16> = reply.allocations.iter().map(|a| a.port).collect();
    let others = uncoordinated(&allocated);
    if !others.is_empty() {
        println!("\nlistening in a session, on a port nobody coordinates (bound as asked):");
        println!("{:>5}  {:<20}  {:<8}  {:<15}", "PORT", "SESSION", "PID", "COMMAND");
        for l in others {
            println!("{:>5}  {:<20}  {:<8}  {:<15}", l.port, cell(&l.session), l.pid, cell(&l.comm));
        }
    }
    Ok(0)
}

/// A session's process listening on a port no allocation covers.
struct Listener {
    port: u16,
    session: String,
    pid: u32,
    comm: String,
}

/// The listening ports of processes in a session (`STYXY_PRELOAD_SESSION` in their
/// environment) that no allocation covers: servers on ports nobody coordinates
/// (chromedriver's 9515), found in `/proc`; one line per port and session. Only
/// processes of this network namespace: another one's ports (a container's, `unshare
/// -n`) are not the ones a connect from here reaches.
fn uncoordinated(allocated: &[u16]) -> Vec<Listener> {
    let mut out: Vec<Listener> = Vec::new();
    let here = procinfo::netns(procinfo::SELF);
    for pid in procinfo::all_pids().into_iter().filter(|p| here.is_none() || procinfo::netns(p) == here) {
        let Some(s) = procinfo::environ(pid).into_iter().find(|(k, _)| k == envvars::SESSION).and_then(|(_, v)| v.into_string().ok())
        else {
            continue;
        };
        for port in procinfo::listening_ports(pid) {
            if !allocated.contains(&port) && !out.iter().any(|l| l.port == port && l.session == s) {
                let comm = procinfo::comm(pid).unwrap_or_default();
                out.push(Listener { port, session: s.clone(), pid, comm });
            }
        }
    }
    out.sort_by_key(|l| l.port);
    out
}

fn allocations_table(reply: &AllocationsReply) {
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
