//! The command line: every command, flag and help text.

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "styxy-preload",
    version,
    about = "Coordinate the ports of every dev server a tool starts, without changing the tool.",
    long_about = "Runs tools with libstyxy_preload.so loaded: their bind() calls ask a port coordinator (Styxy, or the built-in daemon) \
and get another port when the one they want is taken by another session. Connects inside the session follow the remap."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a command with coordinated ports
    #[command(
        after_help = "Examples:\n  styxy-preload exec -- npm run dev\n  styxy-preload exec --session agent-1 -- python3 -m http.server 8000\n  styxy-preload exec --port PORT=dev -- node server.js\n  styxy-preload exec --port P=dev -- vite --port {P}"
    )]
    Exec(ExecArgs),
    /// Show what the hooks did (remaps, pass-throughs, errors)
    #[command(
        after_help = "Examples:\n  styxy-preload log\n  styxy-preload log -f\n  styxy-preload log --json --since 10m --session agent-1"
    )]
    Log(LogArgs),
    /// List the coordinator's live allocations
    #[command(after_help = "Examples:\n  styxy-preload ports\n  styxy-preload ports --json")]
    Ports {
        /// JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Allocate (or look up) a port for a script: PORT=$(styxy-preload port 3000)
    #[command(
        after_help = "Examples:\n  PORT=$(styxy-preload port 3000)\n  styxy-preload port --type storybook\n  styxy-preload port --session agent-1 --json 8000"
    )]
    Port(PortArgs),
    /// Print the environment that makes every process of a shell coordinated
    #[command(
        after_help = "Examples:\n  eval \"$(styxy-preload env)\"\n  styxy-preload env --shell fish | source\n  eval \"$(styxy-preload env --session agent-1)\""
    )]
    Env(EnvArgs),
    /// Check the setup: library, coordinator, mode, log; exit non-zero when broken
    Status,
    /// Numbers: remaps, pass-throughs and failures by type and session, range use
    #[command(after_help = "Examples:\n  styxy-preload stats\n  styxy-preload stats --json --since 1h")]
    Stats(StatsArgs),
    /// Run, start, stop or check the built-in coordinator daemon
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Run PROGRAM under the seccomp supervisor (the library does this by itself for
    /// static and Go programs it cannot reach)
    #[command(hide = true)]
    Supervise(SuperviseArgs),
    /// Write shell completions (bash, zsh, fish) or man pages into DIR (for packagers)
    #[command(
        after_help = "Examples:\n  styxy-preload generate completions packaging/completions\n  styxy-preload generate man packaging/man"
    )]
    Generate {
        what: Generated,
        /// Directory to write into (created if missing)
        dir: std::path::PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Generated {
    /// styxy-preload.bash, _styxy-preload (zsh) and styxy-preload.fish
    Completions,
    /// styxy-preload.1 and one page per subcommand
    Man,
}

#[derive(Args)]
pub struct ExecArgs {
    /// Join (or name) a session; default: the current STYXY_PRELOAD_SESSION, else a new one
    #[arg(long, value_name = "NAME")]
    pub session: Option<String>,
    /// coordinate (default), on-conflict (ask only after EADDRINUSE), observe (never change a port) or
    /// fallback (a port another session holds fails with EADDRINUSE: for tools that move on by themselves;
    /// the default for those exec recognises)
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// No summary line at the end
    #[arg(long, short)]
    pub quiet: bool,
    /// Do not start the built-in daemon when no coordinator answers (ports then pass through)
    #[arg(long)]
    pub no_start_daemon: bool,
    /// Let connects reach other sessions' servers (isolation off)
    #[arg(long)]
    pub no_isolate: bool,
    /// Allocate before starting: NAME=TYPE, NAME=PORT or NAME (a dev port); exported as $NAME and
    /// substituted for {NAME} in arguments. `auto`: the variables the recognised tool reads (PORT, UVICORN_PORT, …)
    #[arg(long = "port", value_name = "NAME[=TYPE|=PORT]|auto")]
    pub ports: Vec<String>,
    /// Answer the tree's bind/listen/connect from a seccomp filter (Linux): reaches static and Go
    /// programs, which LD_PRELOAD does not. On by itself when CMD is one of those
    #[arg(long, conflicts_with = "no_seccomp")]
    pub seccomp: bool,
    /// Never use the seccomp filter, even for a static or Go CMD
    #[arg(long)]
    pub no_seccomp: bool,
    /// The command and its arguments
    #[arg(trailing_var_arg = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Mode {
    Coordinate,
    OnConflict,
    Observe,
    Fallback,
}

impl Mode {
    pub fn as_env(self) -> &'static str {
        match self {
            Mode::Coordinate => "coordinate",
            Mode::OnConflict => "on-conflict",
            Mode::Observe => "observe",
            Mode::Fallback => "fallback",
        }
    }
}

#[derive(Args)]
pub struct SuperviseArgs {
    /// The program's path, as `execve` takes it
    pub program: std::ffi::OsString,
    /// Its argv, from argv[0]
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub argv: Vec<std::ffi::OsString>,
}

#[derive(Args)]
pub struct LogArgs {
    /// JSON lines instead of a table
    #[arg(long)]
    pub json: bool,
    /// Keep printing new events (survives log rotation)
    #[arg(long, short)]
    pub follow: bool,
    /// Only this session
    #[arg(long)]
    pub session: Option<String>,
    /// Only events newer than this (e.g. 30s, 10m, 2h)
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// Only the last N events
    #[arg(short = 'n', long = "lines")]
    pub lines: Option<usize>,
    /// Also the repeats of a start (the same process binding the same port again: a
    /// server's dual-stack twin, a probe then the real bind), which the table hides
    #[arg(long)]
    pub all: bool,
}

#[derive(Args)]
pub struct PortArgs {
    /// Session (default: STYXY_PRELOAD_SESSION)
    #[arg(long)]
    pub session: Option<String>,
    /// Service type (default: the type of REQUESTED, or dev)
    #[arg(long = "type")]
    pub service_type: Option<String>,
    /// JSON with port, type, session and lock id
    #[arg(long)]
    pub json: bool,
    /// The port the tool would ask for
    pub requested: Option<u16>,
}

#[derive(Args)]
pub struct EnvArgs {
    #[arg(long, value_enum, default_value = "bash")]
    pub shell: Shell,
    /// Session for everything started from this shell
    #[arg(long)]
    pub session: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Args)]
pub struct StatsArgs {
    #[arg(long)]
    pub json: bool,
    /// Only events newer than this (e.g. 10m, 1h, 1d)
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    #[arg(long)]
    pub session: Option<String>,
}

#[derive(Subcommand)]
pub enum DaemonCommand {
    /// Run in the foreground
    Run(DaemonRunArgs),
    /// Start in the background; returns once the socket answers
    Start(DaemonRunArgs),
    /// Stop the running daemon
    Stop,
    /// Is it running, where, since when, how many allocations
    Status,
}

#[derive(Args, Clone)]
pub struct DaemonRunArgs {
    /// Also serve TCP (bearer token in the runtime directory's token file), e.g. 127.0.0.1:9877
    #[arg(long, value_name = "ADDR")]
    pub http: Option<std::net::SocketAddr>,
    /// Exit after this many idle seconds while holding no allocation and no session's
    /// shell or exec runs (0: never)
    #[arg(long, default_value_t = 600, value_name = "SECS", env = styxy_preload_common::envvars::IDLE_EXIT)]
    pub idle_exit: u64,
    /// Front this Styxy: every grant becomes an allocation there, e.g. http://127.0.0.1:9876.
    /// Default: STYXY_URL when it is an http URL, else STYXY_DAEMON_HOST:STYXY_DAEMON_PORT
    /// (127.0.0.1:9876), whenever it answers; token from STYXY_TOKEN or ~/.styxy/auth.token
    #[arg(long, value_name = "URL", conflicts_with = "no_upstream")]
    pub upstream: Option<String>,
    /// Never talk to Styxy
    #[arg(long)]
    pub no_upstream: bool,
    /// Seconds after which Styxy forgets an allocation (live ones are re-asserted at 3/5 of it)
    #[arg(long, default_value_t = 1800, value_name = "SECS", hide = true)]
    pub upstream_expiry: u64,
    /// Seconds a session's freed mapping is kept for a restarting server
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub grace: u64,
}
