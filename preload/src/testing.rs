//! What the decisions' unit tests share: a process built from an environment of the
//! test's own, whose runtime directory (the daemon's socket and maps) and event log are in
//! a private directory.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use styxy_preload_common::eventlog::{self, Event};

use crate::process::Process;

pub struct World {
    pub dir: tempfile::TempDir,
    /// A process of session `t`, or of what `vars` say.
    pub p: Process,
}

impl World {
    pub fn new(vars: &[(&str, &str)]) -> World {
        let dir = tempfile::tempdir().unwrap();
        std::fs::DirBuilder::new().mode(0o700).create(dir.path().join("styxy-preload")).unwrap();
        let p = process_in(&dir, vars);
        World { dir, p }
    }

    /// Another process in this world (its daemon, its log), with `vars`.
    pub fn process(&self, vars: &[(&str, &str)]) -> Process {
        process_in(&self.dir, vars)
    }

    /// Where the daemon keeps its socket and maps.
    pub fn runtime(&self) -> PathBuf {
        self.dir.path().join("styxy-preload")
    }

    pub fn events(&self) -> Vec<Event> {
        eventlog::read_all(&self.dir.path().join("events.jsonl")).unwrap_or_default()
    }
}

/// `vars` over the world's defaults: its runtime directory and log, no notice on stderr,
/// session `t` (`STYXY_PRELOAD_SESSION=""`: none).
fn process_in(dir: &tempfile::TempDir, vars: &[(&str, &str)]) -> Process {
    let mut env: BTreeMap<String, OsString> = BTreeMap::new();
    env.insert("XDG_RUNTIME_DIR".into(), dir.path().into());
    env.insert("STYXY_PRELOAD_LOG".into(), dir.path().join("events.jsonl").into());
    env.insert("STYXY_PRELOAD_NOTIFY".into(), "off".into());
    env.insert("STYXY_PRELOAD_SESSION".into(), "t".into());
    env.extend(vars.iter().map(|(k, v)| (k.to_string(), OsString::from(v))));
    Process::from_vars(&|k| env.get(k).cloned())
}
