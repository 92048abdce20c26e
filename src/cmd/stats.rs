//! `styxy-preload stats`: counts from the event log and the coordinator.

use crate::cli::StatsArgs;

pub fn run(_a: StatsArgs) -> Result<i32, String> {
    Err("stats is not built yet".into())
}
