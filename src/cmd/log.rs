//! `styxy-preload log`: the event log as a table or JSON lines, optionally followed.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, UNIX_EPOCH};

use styxy_preload_common::eventlog::{self, Event};
use styxy_preload_common::paths;

use crate::cli::LogArgs;
use styxy_preload_common::text::cell;

pub fn run(a: LogArgs) -> Result<i32, String> {
    crate::coordinator::settle_log();
    let path = paths::event_log_path();
    let since_ms = a.since.map(|d| eventlog::now_ms().saturating_sub(d.as_millis() as u64));
    let wanted = |e: &Event| a.session.as_ref().is_none_or(|s| e.session.as_ref() == Some(s)) && since_ms.is_none_or(|t| e.ts >= t);
    // one line per server start in the table; JSON lines (for programs) hold everything
    let repeats_too = a.all || a.json;
    let keep = |e: &Event| wanted(e) && (repeats_too || !e.is_repeat());
    let (events, read_len) = match eventlog::read_with_len(&path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && a.follow => (vec![], 0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "styxy-preload: nothing logged yet ({} does not exist). Run a server under `styxy-preload exec -- …` first.",
                path.display()
            );
            return Ok(0);
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut shown: Vec<&Event> = events.iter().filter(|e| keep(e)).collect();
    if let Some(n) = a.lines {
        let skip = shown.len().saturating_sub(n);
        shown.drain(..skip);
    }
    let mut out = std::io::stdout().lock();
    if !a.json && (!shown.is_empty() || a.follow) {
        let _ = writeln!(out, "{}", header());
    }
    if shown.is_empty() && !a.follow {
        eprintln!("styxy-preload: no events match");
    }
    let hidden = if repeats_too { 0 } else { events.iter().filter(|e| wanted(e) && e.is_repeat()).count() };
    for e in shown {
        print(&mut out, e, a.json);
    }
    let _ = out.flush();
    drop(out);
    if hidden > 0 {
        eprintln!("styxy-preload: {hidden} repeated binds of a start hidden (a twin, a probe then the real bind): --all shows them");
    }
    if a.follow {
        // continue exactly after what was read above (0 if the log did not exist yet)
        follow(&path, read_len, |e| keep(e), a.json);
    }
    Ok(0)
}

fn header() -> String {
    format!(
        "{:<8}  {:<18}  {:>7}  {:<15}  {:<13}  {:<11}  {:<11}  {}",
        "TIME", "SESSION", "PID", "COMMAND", "PORT", "TYPE", "ACTION", "REASON"
    )
}

fn print(out: &mut impl Write, e: &Event, json: bool) {
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string(e).unwrap_or_default());
        return;
    }
    let t = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(e.ts)).to_string();
    let time = t.get(11..19).unwrap_or(&t);
    let port = if e.requested_port == e.port || e.requested_port == 0 {
        e.port.to_string()
    } else {
        format!("{} → {}", e.requested_port, e.port)
    };
    let _ = writeln!(
        out,
        "{:<8}  {:<18}  {:>7}  {:<15}  {:<13}  {:<11}  {:<11}  {}",
        time,
        cell(e.session.as_deref().unwrap_or("-")),
        e.pid,
        cell(&e.comm),
        port,
        cell(e.service_type.as_deref().unwrap_or("-")),
        e.action.as_str(),
        cell(e.reason.as_deref().unwrap_or(""))
    );
}

/// Prints events appended after byte `from`, like `tail -f`; follows the file across
/// rotation (a new file is read from its start).
fn follow(path: &std::path::Path, from: u64, keep: impl Fn(&Event) -> bool, json: bool) {
    let mut file: Option<std::fs::File> = None;
    let mut pending = Vec::new();
    let mut from = from;
    loop {
        if file.is_none() {
            if let Ok(mut f) = std::fs::File::open(path) {
                let _ = f.seek(SeekFrom::Start(from));
                from = 0;
                file = Some(f);
            }
        }
        if let Some(f) = file.as_mut() {
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            pending.extend_from_slice(&buf);
            if let Some(end) = pending.iter().rposition(|b| *b == b'\n') {
                let complete: Vec<u8> = pending.drain(..=end).collect();
                let mut out = std::io::stdout().lock();
                for e in eventlog::parse_lines(&complete).iter().filter(|e| keep(e)) {
                    print(&mut out, e, json);
                }
                if out.flush().is_err() {
                    return;
                }
            }
            // rotated: the path now names a new file; what remained in the old one was read above
            let rotated = match (std::fs::metadata(path), f.metadata()) {
                (Ok(now), Ok(ours)) => now.ino() != ours.ino(),
                (Err(_), _) => true,
                _ => false,
            };
            if rotated {
                file = std::fs::File::open(path).ok();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
