//! The environment contract: every `STYXY_*` variable styxy-preload reads or sets, who
//! reads it and what it means, in one list ([`ALL`]). README's "Configuration" table names
//! the same variables (`common/tests/envvars.rs` checks it, and that no source names a
//! `STYXY_*` variable missing here). How a value parses lives beside the code that is its
//! one reader, except the on/off switches, which the shim shares: [`switch`](super::switch).
//! `no_std`, no allocation: the shim can include this file.

/// Who reads a variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// The preload library, inside a foreign process (or the seccomp supervisor, for
    /// the tree it answers for).
    Library,
    /// The built-in daemon.
    Daemon,
    /// The `styxy-preload` command.
    Cli,
}

/// One variable of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var {
    pub name: &'static str,
    pub read_by: &'static [Reader],
    pub meaning: &'static str,
}

/// Each variable's constant and its entry in [`ALL`], from one line each.
macro_rules! contract {
    ($($(#[$doc:meta])* $id:ident = $name:literal, [$($r:ident),+], $meaning:literal;)+) => {
        $($(#[$doc])* pub const $id: &str = $name;)+
        /// Every `STYXY_*` variable, in README's order.
        pub const ALL: &[Var] = &[$(Var { name: $id, read_by: &[$(Reader::$r),+], meaning: $meaning }),+];
    };
}

contract! {
    URL = "STYXY_URL", [Library, Daemon, Cli],
        "unix:PATH: the local daemon's socket (set by exec/env); http://HOST:PORT: the Styxy the daemon fronts";
    SESSION = "STYXY_PRELOAD_SESSION", [Library, Daemon, Cli],
        "the session, sent as Styxy's instance_id (set by exec/env)";
    /// Set by `exec` and `env`: this program, which the library runs static and Go
    /// programs under (`styxy-preload supervise`); unset, they run as they are.
    CLI = "STYXY_PRELOAD_CLI", [Library],
        "the styxy-preload the library runs static and Go programs under (set by exec/env)";
    MODE = "STYXY_PRELOAD_MODE", [Library, Cli],
        "coordinate (default), on-conflict, observe or fallback";
    DISABLE = "STYXY_PRELOAD_DISABLE", [Library, Cli],
        "set, and neither empty nor 0: the hooks do nothing (switch::disables)";
    NOTIFY = "STYXY_PRELOAD_NOTIFY", [Library],
        "off: no stderr line on a remap (switch::is_off)";
    ISOLATE = "STYXY_PRELOAD_ISOLATE", [Library],
        "off: connects may reach other sessions' servers (switch::is_off)";
    PORTS = "STYXY_PRELOAD_PORTS", [Library, Daemon, Cli],
        "extra port=type, from-to=type and port=off rules";
    TYPES = "STYXY_PRELOAD_TYPES", [Library],
        "the daemon's service types, its GET /config as JSON (set by exec)";
    IDLE_EXIT = "STYXY_PRELOAD_IDLE_EXIT", [Daemon],
        "seconds the daemon waits idle before it exits (600)";
    LOG = "STYXY_PRELOAD_LOG", [Library, Daemon, Cli],
        "the event log's path";
    LOG_MAX = "STYXY_PRELOAD_LOG_MAX", [Library, Daemon],
        "the event log's size in bytes before it rotates (16 MiB)";
    DAEMON_HOST = "STYXY_DAEMON_HOST", [Daemon],
        "Styxy's host, as Styxy's own interceptor reads it (127.0.0.1)";
    DAEMON_PORT = "STYXY_DAEMON_PORT", [Library, Daemon, Cli],
        "Styxy's port, as Styxy's own interceptor reads it (9876)";
    DISABLE_REASSIGN = "STYXY_DISABLE_REASSIGN", [Library],
        "1, true or yes: observe mode, as Styxy's own interceptor reads it";
    TOKEN = "STYXY_TOKEN", [Daemon],
        "Styxy's token, else ~/.styxy/auth.token";
    LIB = "STYXY_PRELOAD_LIB", [Cli],
        "the preload library, when it is not beside the program or installed";
    /// The variable `exec` and `env` set to the daemon's network namespace
    /// (`procinfo::netns`): a process in another one is left alone by the hooks.
    NETNS = "STYXY_PRELOAD_NETNS", [Library],
        "the daemon's network namespace inode: the hooks act only inside it (set by exec/env)";
    /// Set by `exec` and `env` when their stderr is a regular file (`cmd 2>log`):
    /// `<dev>:<ino>` of that file. A regular file at fd 2 is written to only when it is
    /// this one: otherwise the program closed fd 2 and reopened a data file of its own there.
    STDERR = "STYXY_PRELOAD_STDERR", [Library],
        "dev:ino of the regular file exec's or env's stderr is: the notice may go there (set by exec/env)";
    /// Set by `exec --seccomp` in the environment it hands down: how many seccomp filters
    /// a process under its filter has at least. The variable alone could have leaked into
    /// a process outside the supervised tree, or the filter could have been refused.
    SUPERVISED = "STYXY_PRELOAD_SUPERVISED", [Library],
        "seccomp filters a supervised process has at least (set by exec/supervise)";
    /// The write end of a pipe the CLI hands the daemon it starts (the fd number): a
    /// daemon that cannot start writes why there before it exits, and the pipe's
    /// end-of-file tells that it has exited.
    START_FD = "STYXY_PRELOAD_START_FD", [Daemon],
        "the fd the daemon the CLI starts reports a failed start on (set by the CLI)";
    /// Set by the CLI when it starts the daemon itself (`exec`, `env`, `port`, `daemon start`).
    DAEMON_LAUNCH = "STYXY_PRELOAD_DAEMON_LAUNCH", [Daemon],
        "how the daemon was started, its run_mode (set by the CLI)";
}
