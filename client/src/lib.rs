//! The pure core shared by the CLI, the preload library and the built-in daemon.
//!
//! Nothing here starts a thread, an async runtime or does work at load time: the
//! preload library runs this code inside foreign processes.

pub mod api;
pub mod discovery;
pub mod eventlog;
pub mod hookproto;
pub mod http;
pub mod mapview;
pub mod paths;
pub mod policy;
pub mod policymap;
pub mod portmap;
pub mod session;
pub mod sockaddr;
pub mod text;

/// Marks the built-in daemon's own test binds (the 4th syscall argument, which `bind`
/// ignores): `exec`'s seccomp filter lets them through. A daemon started inside a
/// supervised tree would otherwise wait on the supervisor while the supervisor waits
/// on it.
pub const UNSUPERVISED_BIND: u64 = 0x5354_5958_5950_524f;
