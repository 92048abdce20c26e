//! What the CLI, the preload library (its hooks' logic, and the `no_std` shim through
//! the files it includes: `decide`, `hookproto`, `mapview`, `sockaddr`) and the built-in
//! daemon share: what happens to a hooked call ([`decide`], pure), Styxy's API types ([`api`]), the port → type [`policy`], [`paths`], HTTP over
//! a Unix socket or TCP ([`http`]), the event log ([`eventlog`]), the shared port and
//! policy maps ([`portmap`], [`policymap`], and both as links: [`blocklink`], [`blocklinks`]). Not pure: it does file I/O, `mmap` and HTTP.
//!
//! Nothing here starts a thread, an async runtime or does work at load time: the
//! preload library runs this code inside foreign processes.

pub mod api;
pub mod blocklink;
pub mod blocklinks;
pub mod decide;
pub mod discovery;
pub mod envvars;
pub mod eventlog;
pub mod hookproto;
pub mod http;
pub mod mapview;
pub mod moved;
pub mod notice;
pub mod paths;
pub mod policy;
pub mod policymap;
pub mod portmap;
pub mod procinfo;
pub mod reason;
pub mod session;
pub mod sock;
pub mod sockaddr;
pub mod switch;
pub mod text;

/// Marks the built-in daemon's own test binds (the 4th syscall argument, which `bind`
/// ignores): `exec`'s seccomp filter lets them through. A daemon started inside a
/// supervised tree would otherwise wait on the supervisor while the supervisor waits
/// on it.
pub const UNSUPERVISED_BIND: u64 = 0x5354_5958_5950_524f;
