//! What `getsockname()` tells a Node cluster primary about a socket our bind moved
//! (docs/ARCHITECTURE.md "What a program sees").
//!
//! Node's cluster workers ask the primary to listen for them; the primary sends back the
//! listening socket's `getsockname()`, and each worker's `checkBindError` (Node's
//! `lib/net.js`) turns a port other than the one it asked for into `EADDRINUSE`. So in a
//! process whose children are cluster workers (`NODE_UNIQUE_ID` in their environment),
//! `getsockname()` of a socket this process's bind moved answers the port the program
//! asked for. Every other process sees the port it really has, so servers that print
//! their address print where they serve.
//!
//! The record ([`Moved`], common/src/moved.rs) is the process's one table: the shim's remaps write it,
//! and the hooks' logic's through [`styxy_preload_moved`].

use core::ffi::c_int;

use crate::cstring::{append, put};
use crate::libc_calls::{above_stdio, errno, set_errno, O_CLOEXEC, O_DIRECTORY, O_NONBLOCK, O_RDONLY};
use crate::maps::each_entry;
use crate::moved_table::Moved;
use crate::sys::{close, open, read};

static MOVED: Moved = Moved::new();

/// `fd`, asked to bind `asked`, got `got`.
pub(crate) fn record(fd: c_int, asked: u16, got: u16) {
    MOVED.record(fd, asked, got);
}

/// A socket of this process asked for `asked` and got `got` already (a twin: told once).
pub(crate) fn seen(asked: u16, got: u16) -> bool {
    MOVED.seen(asked, got)
}

/// The hooks' logic moved `fd`'s bind from `asked` to `got`.
#[no_mangle]
pub extern "C" fn styxy_preload_moved(fd: c_int, asked: u16, got: u16) {
    MOVED.record(fd, asked, got);
}

/// The port to show for `fd` bound to `got`: the one it asked for when this process's
/// bind moved it and a child is a Node cluster worker; `None`: the kernel's answer.
pub(crate) fn shown(fd: c_int, got: u16) -> Option<u16> {
    if MOVED.is_empty() {
        return None;
    }
    let asked = MOVED.asked(fd, got)?;
    let saved = errno();
    let workers = has_cluster_workers();
    set_errno(saved);
    workers.then_some(asked)
}

/// Whether a child of this process (of any of its threads) is a Node cluster worker.
fn has_cluster_workers() -> bool {
    // SAFETY: a NUL-terminated path; the fd is ours (closed below), never waited on.
    let tasks = unsafe { open(c"/proc/self/task".as_ptr(), O_RDONLY | O_DIRECTORY | O_NONBLOCK | O_CLOEXEC) };
    if tasks < 0 {
        return false;
    }
    let mut found = false;
    each_entry(tasks, |tid| {
        if !found && tid.first().is_some_and(u8::is_ascii_digit) {
            found = task_children(tid).is_some_and(|(list, len)| pids(list.get(..len).unwrap_or(&[])).any(is_cluster_worker));
        }
    });
    // SAFETY: our own fd, opened above.
    unsafe { close(tasks) };
    found
}

/// `/proc/self/task/<tid>/children` (`tid` NUL-terminated): a buffer and its length.
fn task_children(tid: &[u8]) -> Option<([u8; 1024], usize)> {
    let mut path = [0u8; 64];
    let n = append(&mut path, 0, b"/proc/self/task/\0");
    let n = put(&mut path, n, tid.strip_suffix(&[0]).unwrap_or(tid));
    if n == 0 || append(&mut path, n, b"/children\0") == 0 {
        return None;
    }
    let mut list = [0u8; 1024];
    let len = read_file(&path, &mut list)?;
    Some((list, len))
}

/// The pids in a space-separated list.
fn pids(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    list.split(|c| *c == b' ' || *c == b'\n').filter(|p| !p.is_empty() && p.len() < 12)
}

/// `/proc/<pid>/environ` holds an entry `NODE_UNIQUE_ID=…`, read in pieces.
fn is_cluster_worker(pid: &[u8]) -> bool {
    const KEY: &[u8] = b"NODE_UNIQUE_ID=";
    let mut path = [0u8; 64];
    let n = append(&mut path, 0, b"/proc/\0");
    let n = put(&mut path, n, pid);
    if n == 0 || append(&mut path, n, b"/environ\0") == 0 {
        return false;
    }
    // SAFETY: `path` is NUL-terminated (append); the fd is ours, closed below.
    let fd = above_stdio(unsafe { open(path.as_ptr().cast(), O_RDONLY | O_NONBLOCK | O_CLOEXEC) });
    if fd < 0 {
        return false;
    }
    // how much of KEY the current entry has matched; None once it cannot
    let mut matched = Some(0usize);
    let mut buf = [0u8; 4096];
    let mut found = false;
    // an environment is at most a few MB: a bounded number of reads
    for _ in 0..1024 {
        // SAFETY: read writes at most `buf.len()` bytes into `buf`.
        let got = unsafe { read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let Some(chunk) = usize::try_from(got).ok().filter(|g| *g > 0).and_then(|g| buf.get(..g)) else { break };
        for c in chunk {
            matched = match matched {
                _ if *c == 0 => Some(0),
                Some(i) if KEY.get(i) == Some(c) => Some(i + 1),
                _ => None,
            };
            found |= matched == Some(KEY.len());
        }
        if found {
            break;
        }
    }
    // SAFETY: our own fd, opened above.
    unsafe { close(fd) };
    found
}

/// Reads the start of the file at `path` (NUL-terminated) into `buf`; the length read.
fn read_file(path: &[u8], buf: &mut [u8]) -> Option<usize> {
    // SAFETY: `path` is NUL-terminated (its callers' append); the fd is ours, closed below.
    let fd = above_stdio(unsafe { open(path.as_ptr().cast(), O_RDONLY | O_NONBLOCK | O_CLOEXEC) });
    if fd < 0 {
        return None;
    }
    // SAFETY: read writes at most `buf.len()` bytes into `buf`; then our fd is closed.
    let got = unsafe {
        let got = read(fd, buf.as_mut_ptr().cast(), buf.len());
        close(fd);
        got
    };
    usize::try_from(got).ok()
}
