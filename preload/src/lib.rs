//! The seccomp supervisor's hooks' logic: what `exec --seccomp` does with a supervised
//! program's `bind()`, `listen()` and `connect()` (static and Go programs, and processes of
//! another user, where no preload library can go). Linked into the CLI; nothing of it is
//! ever loaded into a foreign process — that is `libstyxy_preload.so` alone (`shim/`).
//!
//! The decisions run over two seams, the caller's [`Socket`] (the supervisor's copy of it)
//! and a `bind::Coordinator` (the daemon, on `hook.sock` as the shim asks it), and ask the one decision
//! (`styxy_preload_common::decide`) as the shim does.

pub mod bind;
pub mod call;
pub mod connect;
pub mod listen;
pub mod process;
pub mod report;
pub mod sys;
#[cfg(test)]
mod testing;

pub use call::{Caller, Route, Socket, Verdict};
pub use sys::{Addr, AddrFn, ListenFn};
