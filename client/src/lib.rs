//! The pure core shared by the CLI, the preload library and the built-in daemon.
//!
//! Nothing here starts a thread, an async runtime or does work at load time: the
//! preload library runs this code inside foreign processes.

pub mod api;
pub mod discovery;
pub mod eventlog;
pub mod http;
pub mod paths;
pub mod policy;
pub mod portmap;
pub mod session;
pub mod sticky;
