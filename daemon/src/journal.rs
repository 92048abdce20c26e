//! The grant journal: each grant is appended (one `write()`) before its answer leaves,
//! so a daemon killed between two snapshots loses no grant it acknowledged
//! (docs/ARCHITECTURE.md "The built-in daemon"). A snapshot rotates it: the journal it
//! covers becomes `.old`, and goes once the snapshot is on disk. No fsync: the journal
//! guards against the daemon's death, not the machine's.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use parking_lot::Mutex;

use crate::state::Allocation;

pub struct Journal {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

fn open(path: &PathBuf) -> Option<std::fs::File> {
    std::fs::OpenOptions::new().append(true).create(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path).ok()
}

impl Journal {
    pub fn open(path: PathBuf) -> Journal {
        Journal { file: Mutex::new(open(&path)), path }
    }

    fn old(&self) -> PathBuf {
        self.path.with_extension("old")
    }

    /// Appends a grant. Call it with the state lock held, before answering.
    pub fn append(&self, a: &Allocation) {
        let Ok(mut line) = serde_json::to_vec(a) else { return };
        line.push(b'\n');
        if let Some(f) = self.file.lock().as_mut() {
            let _ = f.write_all(&line);
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

    /// The grants journaled since the last snapshot on disk, oldest first.
    pub fn replay(&self) -> Vec<Allocation> {
        [self.old(), self.path.clone()]
            .iter()
            .flat_map(|p| std::fs::read_to_string(p).unwrap_or_default().lines().map(str::to_string).collect::<Vec<_>>())
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }
}
