//! The grant journal: each grant is appended (one `write()`, checked) before its answer
//! leaves, so a daemon killed between two snapshots loses no grant it acknowledged, and a
//! grant that could not be written (a full disk) is not made (docs/ARCHITECTURE.md "The
//! built-in daemon"). A snapshot rotates it: the journal it covers becomes `.old`, and
//! goes once the snapshot is on disk. No fsync: the journal guards against the daemon's
//! death, not the machine's.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use styxy_preload_common::paths;

use crate::state::Allocation;

pub struct Journal {
    path: PathBuf,
    file: Mutex<io::Result<std::fs::File>>,
}

fn open(path: &Path) -> io::Result<std::fs::File> {
    paths::open_regular(std::fs::OpenOptions::new().append(true).create(true).mode(0o600), path)
}

impl Journal {
    pub fn open(path: PathBuf) -> Journal {
        Journal { file: Mutex::new(open(&path)), path }
    }

    fn old(&self) -> PathBuf {
        self.path.with_extension("old")
    }

    /// Appends a grant. Call it with the state lock held, before answering; on `Err`
    /// the grant must not be made (nothing would remember it after a restart).
    pub fn append(&self, a: &Allocation) -> io::Result<()> {
        let mut line = serde_json::to_vec(a).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut f = self.file.lock();
        if f.is_err() {
            *f = open(&self.path); // it could not be opened before: perhaps now
        }
        match f.as_mut() {
            Ok(f) => f.write_all(&line),
            Err(e) => Err(io::Error::new(e.kind(), format!("cannot open the journal {}: {e}", self.path.display()))),
        }
    }

    /// Starts a new journal; the current one is covered by the snapshot being taken.
    /// Call it with the state lock held, as the snapshot is taken.
    pub fn rotate(&self) {
        let mut f = self.file.lock();
        if std::fs::rename(&self.path, self.old()).is_ok() {
            *f = open(&self.path);
        }
    }

    /// The snapshot that covers `.old` is on disk.
    pub fn retire(&self) {
        let _ = std::fs::remove_file(self.old());
    }

    /// The grants journaled since the last snapshot on disk, oldest first. Read line by
    /// line as bytes: a line torn by a crash (even inside a character) loses only itself.
    pub fn replay(&self) -> Vec<Allocation> {
        [self.old(), self.path.clone()]
            .iter()
            .flat_map(|p| {
                paths::read_regular(p, 64 << 20).unwrap_or_default().split(|b| *b == b'\n').map(<[u8]>::to_vec).collect::<Vec<_>>()
            })
            .filter_map(|l| serde_json::from_slice(&l).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Owner;

    fn grant(port: u16, name: &str) -> Allocation {
        let mut a: Allocation = serde_json::from_value(serde_json::json!({
            "port": port, "lock_id": "5a1c0d5e-0000-4000-8000-000000000000", "service_type": "dev",
            "service_name": name, "allocated_at_ms": 1, "owners": []
        }))
        .unwrap();
        a.owners = vec![Owner::pid(std::process::id())];
        a
    }

    /// A fresh directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("styxy-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_line_torn_inside_a_character_loses_only_itself() {
        let dir = scratch("torn");
        let j = Journal::open(dir.join("journal.jsonl"));
        j.append(&grant(3000, "café-server")).unwrap();
        let mut torn = serde_json::to_vec(&grant(3001, "naïve-ñ")).unwrap();
        let cut = torn.iter().position(|b| *b >= 0x80).unwrap() + 1; // after a lead byte
        torn.truncate(cut);
        std::fs::OpenOptions::new().append(true).open(dir.join("journal.jsonl")).unwrap().write_all(&torn).unwrap();
        let got: Vec<_> = j.replay().iter().map(|a| (a.port, a.service_name.clone())).collect();
        assert_eq!(got, vec![(3000, "café-server".to_string())]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn after_a_rotation_grants_go_to_the_new_journal_and_both_replay_until_retired() {
        let dir = scratch("rotate");
        let j = Journal::open(dir.join("journal.jsonl"));
        j.append(&grant(3000, "before")).unwrap();
        j.rotate();
        j.append(&grant(3001, "after")).unwrap();
        let lines = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default().lines().count();
        assert_eq!((lines("journal.old"), lines("journal.jsonl")), (1, 1));
        assert_eq!(j.replay().iter().map(|a| a.port).collect::<Vec<_>>(), [3000, 3001]);
        j.retire();
        assert_eq!(j.replay().iter().map(|a| a.port).collect::<Vec<_>>(), [3001]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_journal_that_is_not_a_regular_file_is_refused_not_waited_on() {
        let dir = scratch("fifo");
        let path = dir.join("journal.jsonl");
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let j = Journal::open(path);
        assert!(j.append(&grant(3000, "x")).is_err());
        assert!(j.replay().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
