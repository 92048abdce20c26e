//! The end-to-end tests' world: a private HOME / XDG_RUNTIME_DIR / XDG_STATE_HOME per
//! test, its own network namespace and daemon, every process it starts killed when it ends (pass or fail),
//! and the kernel's view of ports (/proc/net/tcp*).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use styxy_preload_common::http::{self, Endpoint, Timeouts};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_styxy-preload"))
}

/// What process `pid` maps of ours besides `libstyxy_preload.so` (which must be the whole
/// library): empty, or the paths that should not be there.
pub fn ours_beside_the_shim(pid: u32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut extra: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains("libstyxy") && !p.ends_with("/libstyxy_preload.so"))
        .map(str::to_string)
        .collect();
    extra.dedup();
    extra
}

/// `libstyxy_preload.so`, beside the binary (the build script puts it there).
pub fn lib() -> PathBuf {
    let p = bin().with_file_name("libstyxy_preload.so");
    assert!(p.is_file(), "{} missing: build with cargo build --workspace", p.display());
    p
}

/// Puts the calling thread — and so every process and thread it starts from now on — into
/// a network namespace of its own with `lo` up: a test's ports are its own, never the
/// machine's nor another test's, so tests run in parallel without a lock. Namespaces are
/// per thread (libtest runs each test on a thread of its own); a second world in the same
/// test shares the first one's namespace, as two terminals on one machine would.
/// Needs `CAP_SYS_ADMIN` over the current network namespace: root, or `scripts/test.sh`'s
/// `unshare --user --map-root-user` for a normal user.
pub fn private_network() {
    thread_local!(static PRIVATE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if PRIVATE.with(|p| p.replace(true)) {
        return;
    }
    // SAFETY: unshare(2) of this thread's network namespace; no memory is involved.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {} (run the tests as root, or through scripts/test.sh)", std::io::Error::last_os_error());
    loopback_up();
}

/// `ip link set lo up`, in this thread's network namespace.
fn loopback_up() {
    // SAFETY: a datagram socket of ours for the interface ioctls, closed below; `ifreq` is
    // plain data, zeroed, its name "lo" NUL-terminated, read and written by the kernel.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        let ok = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) == 0 && {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) == 0
        };
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert!(ok, "setting lo up: {err}");
    }
}

/// Compiles a C fixture from tests/fixtures (once: [`fixtures_dir`]).
pub fn fixture(name: &str) -> PathBuf {
    build_fixture(name, name, &[])
}

/// The C fixture built as a shared library (`NAME.so`), to preload beside ours.
pub fn shared_fixture(name: &str) -> PathBuf {
    build_fixture(name, &format!("{name}.so"), &["-shared", "-fPIC"])
}

/// The C fixture, statically linked: `LD_PRELOAD` never reaches it.
pub fn static_fixture(name: &str) -> PathBuf {
    build_fixture(name, &format!("{name}-static"), &["-static"])
}

/// A Go fixture (tests/fixtures/NAME.go) built with the distribution's Go (once:
/// [`fixtures_dir`]); the build cache is shared by all tests.
pub fn go_fixture(name: &str) -> PathBuf {
    let out = fixtures_dir().join(name);
    if !out.exists() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("{name}.go"));
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let built = building(&out);
        let status = Command::new("go")
            .args(["build", "-o"])
            .arg(&built)
            .arg(&src)
            .env("GOCACHE", tmp.join("go-cache"))
            .env("GOPATH", tmp.join("go-path"))
            .env("GO111MODULE", "off")
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "")
            .status()
            .expect("cannot run go: install the distribution's Go (apt-get install golang-go)");
        assert!(status.success(), "go build failed for {}", src.display());
        std::fs::rename(&built, &out).unwrap();
    }
    out
}

/// Where the fixtures are built: one directory per content of tests/fixtures, so that a
/// fixture is built once for every test process that uses it, and a changed source is
/// never run from an old build. Each build goes to a file of its own, then is renamed into
/// place: a process never runs another's half-written build.
fn fixtures_dir() -> &'static Path {
    use std::hash::{Hash, Hasher};
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&src).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
        files.sort();
        // SipHash with fixed keys: the same in every process
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for f in files {
            (f.file_name(), std::fs::read(&f).unwrap()).hash(&mut h);
        }
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fixtures-{:016x}", h.finish()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

/// A file of this thread's own beside `out`, to build into before the rename.
fn building(out: &Path) -> PathBuf {
    let me = format!("{}.{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], "");
    out.with_file_name(format!("{}.tmp.{me}", out.file_name().unwrap().to_string_lossy()))
}

fn build_fixture(name: &str, out_name: &str, flags: &[&str]) -> PathBuf {
    let dir = fixtures_dir();
    let out = dir.join(out_name);
    if !out.exists() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("{name}.c"));
        let compiler = cc::Build::new().cargo_metadata(false).target(&target_triple()).host(&target_triple()).opt_level(1).get_compiler();
        let tmp = building(&out);
        let status = compiler.to_command().args(flags).arg("-o").arg(&tmp).arg(&src).arg("-lpthread").status().unwrap();
        assert!(status.success(), "cc failed for {}", src.display());
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

fn target_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

pub struct World {
    pub dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl World {
    pub fn new() -> World {
        lib();
        private_network();
        let dir = tempfile::Builder::new().prefix("styxy-test-").tempdir().unwrap();
        for d in ["home", "run", "state", "config"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::set_permissions(dir.path().join("run"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        World { dir, children: Vec::new() }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("run/styxy-preload/daemon.sock")
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket())
    }

    pub fn log_path(&self) -> PathBuf {
        self.path("state/styxy-preload/events.jsonl")
    }

    /// A command in this world: private dirs, nothing of ours inherited from the test's environment.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("HOME", self.path("home"))
            .env("XDG_RUNTIME_DIR", self.path("run"))
            .env("XDG_STATE_HOME", self.path("state"))
            .env("XDG_CONFIG_HOME", self.path("config"))
            .env("STYXY_DAEMON_PORT", "1") // never reach a real Styxy on this machine
            .env_remove("LD_PRELOAD")
            .env_remove("STYXY_URL")
            .env_remove("STYXY_PRELOAD_SESSION")
            .env_remove("STYXY_PRELOAD_DISABLE")
            .env_remove("STYXY_PRELOAD_MODE")
            .env_remove("STYXY_PRELOAD_PORTS")
            .env_remove("STYXY_DAEMON_HOST");
        c
    }

    pub fn cli(&self) -> Command {
        self.cmd(bin())
    }

    /// `program` with the library loaded, in `session`, told where the daemon is.
    pub fn preloaded(&self, session: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = self.cmd(program);
        c.env("LD_PRELOAD", lib()).env("STYXY_URL", format!("unix:{}", self.socket().display()));
        if let Some(s) = session {
            c.env("STYXY_PRELOAD_SESSION", s);
        }
        c
    }

    pub fn start_daemon(&self) {
        let out = self.cli().args(["daemon", "start", "--idle-exit", "0"]).output().unwrap();
        assert!(out.status.success(), "daemon start: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.path("run/styxy-preload/daemon.pid")).ok()?.trim().parse().ok()
    }

    /// Starts `cmd` in its own process group (killed with the world), output captured to files.
    pub fn spawn(&mut self, mut cmd: Command, name: &str) -> u32 {
        let out = std::fs::File::create(self.path(&format!("{name}.out"))).unwrap();
        let err = std::fs::File::create(self.path(&format!("{name}.err"))).unwrap();
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// The exit status of a process `spawn` started, once it has ended.
    pub fn exit_status(&mut self, pid: u32) -> Option<std::process::ExitStatus> {
        self.children.iter_mut().find(|c| c.id() == pid)?.try_wait().ok().flatten()
    }

    pub fn finished(&mut self, pid: u32) -> bool {
        self.exit_status(pid).is_some()
    }

    /// What `name` has written to stdout so far, in whole lines: a line still being
    /// written (Python under `PYTHONUNBUFFERED` writes `print`'s pieces one by one) is
    /// left out until its newline comes.
    pub fn output_of(&self, name: &str) -> String {
        self.lines_in(&format!("{name}.out"))
    }

    /// What `name` has written to stderr so far, in whole lines (as `output_of`).
    pub fn stderr_of(&self, name: &str) -> String {
        self.lines_in(&format!("{name}.err"))
    }

    fn lines_in(&self, file: &str) -> String {
        let mut s = std::fs::read_to_string(self.path(file)).unwrap_or_default();
        s.truncate(s.rfind('\n').map_or(0, |i| i + 1));
        s
    }

    pub fn kill(&mut self, pid: u32) {
        // SAFETY: kill(2) of a process group we created.
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.remove(i);
            let _ = c.wait();
        }
    }

    /// SIGTERM to `pid` alone (not its group), then wait for it: what a supervisor does to `exec`.
    pub fn terminate(&mut self, pid: u32) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) of our child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let i = self.children.iter().position(|c| c.id() == pid)?;
        let mut c = self.children.remove(i);
        c.wait().ok()
    }

    /// The event log, once the daemon has written every event it owes (`/flush` asked
    /// until it owes none, for at most 10 s: on a loaded machine one call's 250 ms may
    /// not do). A world with no daemon has its log read as it is.
    pub fn events(&self) -> Vec<styxy_preload_common::eventlog::Event> {
        let until = Instant::now() + Duration::from_secs(10);
        while let Some(r) = self.call_maybe("POST", "/flush") {
            if !styxy_preload_common::api::FlushReply::owes(&r.body) || Instant::now() > until {
                break;
            }
        }
        styxy_preload_common::eventlog::read_all(&self.log_path()).unwrap_or_default()
    }

    /// A counter of the daemon's `/metrics` (the first sample whose line starts with `name`).
    pub fn metric(&self, name: &str) -> u64 {
        let body = String::from_utf8_lossy(&self.call("GET", "/metrics", None).body).into_owned();
        body.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or_else(|| panic!("no {name} in {body}"))
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> http::Response {
        http::call(&self.endpoint(), method, path, body.map(str::as_bytes), Timeouts::CLI).unwrap()
    }

    /// The daemon's answer, or `None` when it does not answer.
    pub fn call_maybe(&self, method: &str, path: &str) -> Option<http::Response> {
        http::call(&self.endpoint(), method, path, None, Timeouts::CLI).ok()
    }

    pub fn json(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let r = self.call(method, path, body);
        (r.status, serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SAFETY: kill(2) of process groups we created.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
        if let Some(pid) = self.daemon_pid() {
            // SAFETY: the daemon of this world (its pid file is private to the world).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Polls `f` every 20 ms until it returns Some, or panics after `secs` (a "does not hang" bound).
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs}s waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// TCP ports the process `pid` listens on (kernel view: its socket inodes in its own
/// network namespace's /proc/PID/net/tcp*).
pub fn listening_ports(pid: u32) -> BTreeSet<u16> {
    let mut inodes = BTreeSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(l) = std::fs::read_link(fd.path()) {
                let l = l.to_string_lossy().into_owned();
                if let Some(i) = l.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.insert(i.to_string());
                }
            }
        }
    }
    let mut ports = BTreeSet::new();
    for f in ["tcp", "tcp6"] {
        for line in std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).unwrap_or_default().lines().skip(1) {
            let c: Vec<&str> = line.split_whitespace().collect();
            if c.len() > 9 && c[3] == "0A" && inodes.contains(c[9]) {
                if let Some(p) = c[1].rsplit(':').next().and_then(|h| u16::from_str_radix(h, 16).ok()) {
                    ports.insert(p);
                }
            }
        }
    }
    ports
}

/// Listening ports of `pid` and all its descendants.
pub fn tree_ports(pid: u32) -> BTreeSet<u16> {
    let mut out = listening_ports(pid);
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            out.extend(tree_ports(c));
        }
    }
    out
}

/// GET http://host:port/path with our own client; the body as text.
pub fn http_get(host: &str, port: u16, path: &str) -> Option<String> {
    let addr: std::net::IpAddr = host.parse().ok()?;
    let ep = Endpoint::Tcp { addr: std::net::SocketAddr::new(addr, port), token: None };
    let r = http::call(&ep, "GET", path, None, Timeouts::CLI).ok()?;
    (r.status == 200).then(|| String::from_utf8_lossy(&r.body).trim().to_string())
}

pub fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fixture's output as rows of words (`label rc errno port`).
/// One line of the binder fixture's output: `CASE RC ERRNO PORT` for a bind (`bind`'s
/// return value, `errno` after it, the port `getsockname` then gave, 0 when it failed).
/// Shorter lines leave the last fields out (`unix RC ERRNO`; `forked-child-exit STATUS`
/// and `port0-nonzero 0|1` carry their one number in `rc`); a field that is not a number
/// reads as absent. The `threads` lines have their own reader, [`thread_results`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub case: String,
    pub rc: Option<i64>,
    pub errno: Option<i64>,
    pub port: Option<u16>,
}

impl Row {
    /// A whole bind line.
    pub fn of(case: &str, rc: i64, errno: i64, port: u16) -> Row {
        Row { case: case.into(), rc: Some(rc), errno: Some(errno), port: Some(port) }
    }

    fn parse(line: &str) -> Row {
        let mut f = line.split_whitespace();
        let case = f.next().unwrap_or_default().to_string();
        let mut num = || f.next().and_then(|x| x.parse::<i64>().ok());
        let (rc, errno, port) = (num(), num(), num());
        Row { case, rc, errno, port: port.and_then(|p| u16::try_from(p).ok()) }
    }

    /// What the program saw of the call: its return value and errno.
    pub fn outcome(&self) -> (Option<i64>, Option<i64>) {
        (self.rc, self.errno)
    }
}

/// The binder's output, a [`Row`] per line.
pub fn rows(out: &[u8]) -> Vec<Row> {
    text(out).lines().map(Row::parse).collect()
}

/// The row of `case`.
pub fn row<'a>(rows: &'a [Row], case: &str) -> &'a Row {
    rows.iter().find(|r| r.case == case).unwrap_or_else(|| panic!("no {case} in {rows:?}"))
}

/// The binder's `threads BASE N FORKPORT` lines (`thread ASKED RESULT`): what each
/// thread's bind gave, the port it got or `-errno`.
pub fn thread_results(out: &[u8]) -> Vec<i64> {
    text(out)
        .lines()
        .filter_map(|l| l.strip_prefix("thread "))
        .map(|l| l.split_whitespace().nth(1).and_then(|r| r.parse().ok()).unwrap_or_else(|| panic!("a thread line without a result: {l}")))
        .collect()
}

/// The binder's `battery` run on `held` (a port another session holds) against the same
/// battery run with nothing in the way: the interesting binds are remapped to one port
/// for IPv4 and IPv6, everything else returns exactly what the kernel returned.
pub fn assert_battery(plain: &[Row], ours: &[Row], held: u16, stderr: &str) {
    assert_eq!(plain.len(), ours.len(), "{plain:?}\n{ours:?}\n{stderr}");
    let (v4, v6) = (row(ours, "tcp4-any"), row(ours, "tcp6-any"));
    assert_eq!((v4.rc, v6.rc), (Some(0), Some(0)));
    assert_ne!(v4.port, Some(held));
    assert_eq!(v4.port, v6.port, "one requested port → one actual port per session, v4 and v6");
    // a forked child binding it again fails as it would without us (the parent holds it)
    let again = row(ours, "child-tcp4-again");
    assert_eq!(again.outcome(), row(plain, "child-tcp4-again").outcome());
    assert_eq!(again.outcome(), (Some(-1), Some(i64::from(libc::EADDRINUSE))));
    for case in ["udp4", "tcp4-port0", "port0-nonzero", "tcp4-low", "tcp4-badaddr", "unix", "badfd", "nulladdr"] {
        assert_eq!(row(ours, case).outcome(), row(plain, case).outcome(), "{case}: {ours:?} vs {plain:?}");
    }
    assert_eq!(row(ours, "udp4").port, Some(held), "UDP is never remapped");
}

/// A number no other call in this test binary returns (names of spawned processes).
pub fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A throwaway user for processes run as someone else (CI runs as root), created when
/// missing; its uid.
pub fn user(name: &str) -> u32 {
    let id = || Command::new("id").args(["-u", name]).output().ok().filter(|o| o.status.success());
    if id().is_none() {
        let _ = Command::new("useradd").args(["-M", "-s", "/usr/sbin/nologin", name]).output();
    }
    text(&id().expect("useradd").stdout).trim().parse().unwrap()
}

/// A program a test needs is missing: a failure where `scripts/test.sh` installed what the
/// tests need (it sets `STYXY_TEST_INSTALLED`) or under CI; elsewhere a skip, said on stderr.
pub fn missing(what: &str) {
    cannot_run(&format!("missing: {what}; run scripts/test.sh (it installs it), or install it by hand"));
}

/// A test cannot run: a failure where `scripts/test.sh` installed what the tests need (it
/// sets `STYXY_TEST_INSTALLED`) or under CI; elsewhere a skip, said on stderr.
fn cannot_run(msg: &str) {
    let strict = std::env::var_os("CI").is_some() || std::env::var_os("STYXY_TEST_INSTALLED").is_some();
    assert!(!strict, "{msg}");
    eprintln!("skipped: {msg}");
}

/// Whether this test runs as root, which `why` needs (another uid, a privileged port); when
/// it does not, the test cannot run (a failure wherever `scripts/test.sh`
/// installed what the tests need, a skip said on stderr elsewhere).
pub fn root(why: &str) -> bool {
    // SAFETY: getuid cannot fail.
    let root = unsafe { libc::getuid() } == 0;
    if !root {
        cannot_run(&format!("needs root: {why}; run the tests as root"));
    }
    root
}

/// `path` as a `sockaddr_un`; pass the whole struct (`size_of` bytes).
pub fn sockaddr_un(path: &Path) -> libc::sockaddr_un {
    // SAFETY: sockaddr_un is plain integers and bytes, for which zero is valid.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sun.sun_path.iter_mut().zip(path.as_os_str().as_encoded_bytes()) {
        *d = *s as libc::c_char;
    }
    sun
}

/// Connects a new Unix socket of `ty` (flags may be or'ed in) to `path`: the socket, or
/// the connect's error.
pub fn unix_connect(path: &Path, ty: libc::c_int) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let sun = sockaddr_un(path);
    // SAFETY: a new socket of ours, owned by the OwnedFd; connect reads the whole sockaddr_un.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::connect(fd, (&sun as *const libc::sockaddr_un).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(owned)
    }
}

impl World {
    /// A `SOCK_SEQPACKET` connection to the daemon's shim socket.
    pub fn hook_conn(&self) -> std::os::fd::OwnedFd {
        unix_connect(&self.path("run/styxy-preload/hook.sock"), libc::SOCK_SEQPACKET).unwrap()
    }
}

/// The pids of `pid`'s descendants (not `pid` itself).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            out.push(c);
            out.extend(descendants(c));
        }
    }
    out
}
