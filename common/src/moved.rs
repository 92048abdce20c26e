//! The sockets whose bind a process's hooks moved, for what `getsockname()` tells a Node
//! cluster primary (docs/ARCHITECTURE.md "What a program sees"): a few lock-free slots,
//! each one `(fd, asked, got)`, written when a bind lands elsewhere than asked and read
//! by the `getsockname` hook. `no_std`: the shim includes this file.

use core::ffi::c_int;
use core::sync::atomic::{AtomicU64, Ordering};

/// How many moved sockets one process keeps track of; a cluster primary has one or two.
const SLOTS: usize = 8;

/// Sockets whose bind this process's hooks moved.
pub struct Moved {
    slots: [AtomicU64; SLOTS],
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
            .or(self.slots.get(fd.unsigned_abs() as usize % SLOTS));
        if let Some(slot) = slot {
            slot.store(entry, Ordering::Release);
        }
    }

    /// Some socket of this process asked for `asked` and got `got` (a dual-stack twin,
    /// a probe then the real bind: one move, told once).
    pub fn seen(&self, asked: u16, got: u16) -> bool {
        self.slots.iter().any(|s| {
            let v = s.load(Ordering::Acquire);
            v != 0 && (v >> 16) as u16 == asked && v as u16 == got
        })
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
        assert!(m.seen(5173, 5174) && !m.seen(3000, 3001) && !m.seen(5174, 5173));
    }

    #[test]
    fn a_full_record_overwrites_rather_than_grows() {
        let m = Moved::new();
        for fd in 0..20 {
            m.record(fd, 3000, 3100 + fd as u16);
        }
        assert_eq!(m.asked(19, 3119), Some(3000));
    }
}
