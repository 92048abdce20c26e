//! What `getsockname()` tells a Node cluster primary about a socket we moved
//! (docs/ARCHITECTURE.md "What a program sees").
//!
//! Node's cluster workers ask the primary to listen for them; the primary sends back
//! the listening socket's `getsockname()`, and each worker's `checkBindError` (Node's
//! `lib/net.js`) turns a port other than the one it asked for into `EADDRINUSE`. So
//! in a process whose children are cluster workers (`NODE_UNIQUE_ID` in their
//! environment), `getsockname()` of a socket this process's bind moved answers the
//! port the program asked for. Every other process sees the port it really has, so
//! servers that print their address print where they serve.
//!
//! [`Moved`] is the per-process record: a few lock-free slots, each one `(fd,
//! asked, got)`, written by the bind hook and read by the `getsockname` hook.

use std::sync::atomic::{AtomicU64, Ordering};

use libc::c_int;
use styxy_preload_common::procinfo;

/// How many moved sockets one process keeps track of; a cluster primary has one or two.
const SLOTS: usize = 8;

/// Sockets whose bind this process's hooks moved.
pub struct Moved {
    slots: [AtomicU64; SLOTS],
}

static MOVED: Moved = Moved::new();

/// The process's record.
pub fn moved() -> &'static Moved {
    &MOVED
}

fn pack(fd: c_int, asked: u16, got: u16) -> u64 {
    (u64::from(fd as u32) << 32) | (u64::from(asked) << 16) | u64::from(got)
}

impl Default for Moved {
    fn default() -> Moved {
        Moved::new()
    }
}

impl Moved {
    pub const fn new() -> Moved {
        Moved { slots: [const { AtomicU64::new(0) }; SLOTS] }
    }

    /// Notes that `fd`, asked to bind `asked`, got `got`. A slot of the same fd is
    /// reused (the program closed and reopened it); when all are taken the oldest
    /// record is overwritten.
    pub fn record(&self, fd: c_int, asked: u16, got: u16) {
        let entry = pack(fd, asked, got);
        let slot = self
            .slots
            .iter()
            .find(|s| {
                let v = s.load(Ordering::Acquire);
                v == 0 || (v >> 32) as c_int == fd
            })
            .unwrap_or(&self.slots[fd.unsigned_abs() as usize % SLOTS]);
        slot.store(entry, Ordering::Release);
    }

    /// The port `fd` asked for, when it is a socket we moved and still has the port it
    /// got (an fd closed and reused for another socket no longer matches).
    pub fn asked(&self, fd: c_int, port: u16) -> Option<u16> {
        self.slots.iter().find_map(|s| {
            let v = s.load(Ordering::Acquire);
            (v != 0 && (v >> 32) as c_int == fd && v as u16 == port).then_some((v >> 16) as u16)
        })
    }

    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(|s| s.load(Ordering::Relaxed) == 0)
    }
}

/// Whether a child of this process is a Node cluster worker.
pub fn has_cluster_workers() -> bool {
    children().into_iter().any(|pid| procinfo::env_has(pid, "NODE_UNIQUE_ID"))
}

/// This process's children.
fn children() -> Vec<u32> {
    procinfo::children(procinfo::SELF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_socket_answers_the_port_it_asked_for_until_its_fd_is_reused() {
        let m = Moved::new();
        assert!(m.is_empty());
        m.record(7, 3000, 3001);
        assert_eq!(m.asked(7, 3001), Some(3000));
        assert_eq!(m.asked(7, 3005), None, "the fd now holds another port");
        assert_eq!(m.asked(8, 3001), None);
        m.record(7, 5173, 5174);
        assert_eq!(m.asked(7, 3001), None, "one record per fd");
        assert_eq!(m.asked(7, 5174), Some(5173));
    }

    #[test]
    fn a_full_record_overwrites_rather_than_grows() {
        let m = Moved::new();
        for fd in 0..20 {
            m.record(fd, 3000, 3100 + fd as u16);
        }
        assert_eq!(m.asked(19, 3119), Some(3000));
    }

    #[test]
    fn a_child_with_node_unique_id_is_a_cluster_worker() {
        let mut plain = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let plain_seen = children().contains(&plain.id());
        let before = has_cluster_workers();
        let mut worker = std::process::Command::new("sleep").arg("30").env("NODE_UNIQUE_ID", "1").spawn().unwrap();
        // the child's environ is its own once exec is done: wait for it, boundedly
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !has_cluster_workers() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let after = has_cluster_workers();
        for c in [&mut plain, &mut worker] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(plain_seen, "children() lists a child");
        assert!(!before, "a plain child is not a worker");
        assert!(after, "a child with NODE_UNIQUE_ID is");
    }
}
