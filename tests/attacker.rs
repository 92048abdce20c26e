//! Another local user, or a hostile program of the user's own, against a session: planted
//! FIFOs, `/tmp` directories made first by someone else, the overflow uid of a user
//! namespace, a log named as a FIFO, a flood at the daemon's fd limit, a full disk.
//! Each attacker is real: another uid, a FIFO, a small tmpfs, a real flood.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0, "mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
}

/// `cmd` run as `uid` (group `uid` too, no supplementary groups), set in its `pre_exec`.
fn as_uid(mut cmd: Command, uid: u32) -> Command {
    // SAFETY: setgroups, setgid and setuid are async-signal-safe; nothing else runs.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// `program` with exactly `env` (nothing of the test's own environment).
fn bare(program: impl AsRef<std::ffi::OsStr>, env: &[(&str, String)]) -> Command {
    let mut c = Command::new(program);
    c.env_clear().env("PATH", "/usr/local/bin:/usr/bin:/bin").env("STYXY_DAEMON_PORT", "1").envs(env.iter().map(|(k, v)| (*k, v)));
    c
}

/// Kills, pass or fail, the daemons a test started outside its world (their pid files in
/// `paths`), and removes what the test planted or made in `/tmp`: `paths`, and the private
/// fallbacks made beside them.
struct Cleanup {
    paths: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let made: Vec<PathBuf> = self.paths.iter().filter_map(|p| p.file_name()?.to_str().map(siblings)).flatten().collect();
        for dir in self.paths.iter().chain(&made) {
            let pid = std::fs::read_to_string(dir.join("daemon.pid")).ok().and_then(|p| p.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                // SAFETY: kill(2) of a daemon this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `/tmp` entries named `<name>.XXXXXX` (the private fallbacks made beside `name`).
fn siblings(name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}.");
    let mut found: Vec<PathBuf> = std::fs::read_dir("/tmp")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix) && n.len() == prefix.len() + 6))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

#[test]
fn fifos_planted_as_the_daemons_maps_never_hang_a_bind_or_a_connect() {
    let mut w = World::new();
    // a directory another party shapes, named by the session's STYXY_URL: FIFOs where the
    // daemon's maps go, nobody writing to them
    let dir = w.path("shaped");
    std::fs::create_dir(&dir).unwrap();
    mkfifo(&dir.join("policy.map"));
    mkfifo(&dir.join("ports.map"));
    // and where the link of port 3000's block goes
    std::fs::create_dir(dir.join("blocks")).unwrap();
    mkfifo(&dir.join(format!("blocks/{}", styxy_preload_common::blocklink::link_of(3000))));
    let script = "import socket\ns = socket.socket(); s.bind(('127.0.0.1', 3000)); s.listen()\nc = socket.create_connection(('127.0.0.1', 3000), 2)\nprint('served', s.getsockname()[1], flush=True)";
    let mut c = w.preloaded(Some("fifo"), "python3");
    c.args(["-c", script]).env("STYXY_URL", format!("unix:{}/daemon.sock", dir.display()));
    let started = Instant::now();
    let pid = w.spawn(c, "fifo");
    wait_for(10, "the bind and the connect (a blocking open of a FIFO waits forever)", || w.finished(pid).then_some(()));
    assert_eq!(w.output_of("fifo").trim(), "served 3000", "{}", w.stderr_of("fifo"));
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[test]
fn a_log_named_as_a_fifo_never_stalls_the_daemon() {
    let mut w = World::new();
    w.start_daemon();
    let fifo = w.path("log.fifo");
    mkfifo(&fifo);
    // a process of the user's own names a FIFO as its log and binds a coordinated port:
    // the daemon logs that bind for it (the shim's way), where it says
    let mut c = w.preloaded(Some("fifo-log"), fixture("binder"));
    c.args(["serve", "3000"]).env("STYXY_PRELOAD_LOG", &fifo);
    let pid = w.spawn(c, "fifo-log");
    wait_for(10, "the server", || listening_ports(pid).into_iter().next());
    // the daemon still answers, and another session's bind of that port is coordinated
    let t = Instant::now();
    assert!(w.call_maybe("GET", "/status").is_some_and(|r| r.status == 200), "the daemon stopped answering");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let mut c = w.preloaded(Some("other"), "python3");
    c.args(["-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 3000)); print(s.getsockname()[1])"]);
    let moved: u16 = text(&run(c).stdout).trim().parse().unwrap();
    assert_ne!(moved, 3000, "the other session's bind was not coordinated");
    // with a reader on the FIFO (it opens then): refused all the same, nothing written to it
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: open(2) of a NUL-terminated path; the fd is owned below.
    let reader = unsafe { OwnedFd::from_raw_fd(libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC)) };
    let mut c = w.preloaded(Some("fifo-log"), fixture("binder"));
    c.args(["serve", "3001"]).env("STYXY_PRELOAD_LOG", &fifo);
    let second = w.spawn(c, "fifo-log-2");
    wait_for(10, "the second server", || listening_ports(second).into_iter().next());
    assert_eq!(w.call("POST", "/flush", None).status, 200);
    let mut buf = [0u8; 4096];
    // SAFETY: read(2) into a buffer of its length, on our fd.
    let n = unsafe { libc::read(reader.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n <= 0, "an event was written into the FIFO: {}", String::from_utf8_lossy(&buf[..n as usize]));
}

/// `daemon start` in `w` with `RLIMIT_NOFILE` at `soft`/`hard`; the daemon's pid.
fn daemon_with_fd_limit(w: &World, soft: u64, hard: u64) -> i32 {
    let mut c = w.cli();
    c.args(["daemon", "start", "--idle-exit", "0"]);
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        c.pre_exec(move || {
            let r = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    w.daemon_pid().unwrap()
}

/// The daemon's soft limit on open files, from /proc.
fn open_files_limit(pid: i32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    limits.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().nth(3).unwrap().to_string()
}

#[test]
fn a_flood_at_the_fd_limit_never_livelocks_the_daemon() {
    // its soft limit is raised to the hard one at start
    let roomy = World::new();
    let pid = daemon_with_fd_limit(&roomy, 48, 4096);
    assert_eq!(open_files_limit(pid), "4096");
    drop(roomy);
    // a hard limit of 48 and 80 idle connections to the shim's socket: accept fails with EMFILE
    let w = World::new();
    let pid = daemon_with_fd_limit(&w, 48, 48);
    let idle: Vec<_> = (0..80).map(|_| w.hook_conn()).collect();
    // the daemon keeps answering (the idle ones time out and give their fds back)
    wait_for(15, "the daemon's answer after the flood", || w.call_maybe("GET", "/status").filter(|r| r.status == 200));
    let mut c = w.preloaded(Some("after-flood"), "python3");
    c.args(["-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 3000)); s.listen(); print(s.getsockname()[1])"]);
    assert_eq!(text(&run(c).stdout).trim(), "3000");
    assert!(w.json("GET", "/allocations", None).1["allocations"].as_array().unwrap().iter().any(|a| a["port"] == 3000));
    // the same on the HTTP socket: 80 connections that never send a header
    let silent: Vec<_> = (0..80).map(|_| std::os::unix::net::UnixStream::connect(w.socket()).unwrap()).collect();
    wait_for(15, "the daemon's answer after the HTTP flood", || w.call_maybe("GET", "/status").filter(|r| r.status == 200));
    // and SIGTERM ends it, while a flood still stands
    let more: Vec<_> = (0..40).map(|_| w.hook_conn()).collect();
    // SAFETY: kill(2) of this world's daemon.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_for(10, "the daemon's exit on SIGTERM", || (!Path::new(&format!("/proc/{pid}")).exists() || zombie(pid)).then_some(()));
    drop((idle, silent, more));
}

fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
}

/// A tmpfs of `size` mounted at `dir` in a mount namespace of the calling thread's own
/// (every process it starts from now on sees it; the machine does not); unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: unshare(2) of this thread's mount namespace, then mount(2) with
        // NUL-terminated strings.
        unsafe {
            assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare(CLONE_NEWNS): {}", std::io::Error::last_os_error());
            let none = c("none");
            let rc = libc::mount(none.as_ptr(), c("/").as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null());
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            let opts = c(&format!("size={size},mode=0700"));
            let rc = libc::mount(c("tmpfs").as_ptr(), target.as_ptr(), c("tmpfs").as_ptr(), 0, opts.as_ptr().cast());
            assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        }
        Tmpfs(dir.to_path_buf())
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2(2) of the mount this value made.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn a_grant_that_cannot_be_journaled_is_not_made_and_says_why() {
    let w = World::new();
    let disk = Tmpfs::mount(&w.path("state"), "256k");
    w.start_daemon();
    let filler = disk.fill();
    let ask = r#"{"service_type":"dev","service_name":"web","preferred_port":3000,"instance_id":"full"}"#;
    let (status, body) = w.json("POST", "/allocate", Some(ask));
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("journal") && e.contains("No space left")), "{body}");
    let held = || w.json("GET", "/allocations", None).1["allocations"].as_array().unwrap().len();
    assert_eq!(held(), 0, "a grant nothing would remember after a restart");
    // the shim's way: not kept either (the bind goes as asked, nothing held for it)
    let mut c = w.preloaded(Some("full"), "python3");
    c.args(["-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 3000)); s.listen(); print(s.getsockname()[1])"]);
    let out = run(c);
    assert_eq!(text(&out.stdout).trim(), "3000", "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cannot write its journal"), "said to the person: {}", text(&out.stderr));
    assert_eq!(held(), 0);
    // still serving; with room again, grants are made
    std::fs::remove_file(filler).unwrap();
    let (status, body) = w.json("POST", "/allocate", Some(ask));
    assert_eq!(status, 200, "{body}");
    assert_eq!(held(), 1);
    drop(disk); // before the world's directory goes
}

#[test]
fn tmp_fallbacks_another_user_made_first_are_never_used_and_stop_nothing() {
    if !root("to be the attacker and the victim") {
        return;
    }
    let (att, vic) = (user("styxy-att"), user("styxy-vic13"));
    let w = World::new();
    let run_dir = PathBuf::from(format!("/tmp/styxy-preload-{vic}"));
    let home_dir = PathBuf::from(format!("/tmp/styxy-preload-home-{vic}"));
    let _cleanup = Cleanup { paths: vec![run_dir.clone(), home_dir.clone()] };
    for d in siblings(&format!("styxy-preload-{vic}")).into_iter().chain(siblings(&format!("styxy-preload-home-{vic}"))) {
        let _ = std::fs::remove_dir_all(d);
    }
    // the attacker makes both fallbacks first: an empty runtime directory, and a state
    // directory whose event log is a FIFO
    for d in [&run_dir, &home_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
    let events = home_dir.join(".local/state/styxy-preload/events.jsonl");
    let mut plant = bare("sh", &[]);
    plant.args([
        "-c",
        &format!(
            "mkdir -m 755 {} && mkdir -p -m 755 {} && mkfifo -m 666 {}",
            run_dir.display(),
            events.parent().unwrap().display(),
            events.display()
        ),
    ]);
    let out = run(as_uid(plant, att));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // the victim, with neither XDG_RUNTIME_DIR nor HOME nor XDG_STATE_HOME: exec runs its
    // command, coordinated, without waiting on the FIFO
    let script =
        "import socket\ns = socket.socket(); s.bind(('127.0.0.1', 3000)); s.listen()\nprint('bound', s.getsockname()[1], flush=True)";
    let exec = || {
        let mut c = bare(bin(), &[]);
        c.args(["exec", "--session", "v13", "--", "python3", "-c", script]).current_dir("/");
        as_uid(c, vic)
    };
    let started = Instant::now();
    let out = run(exec());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("bound 3000"), "{}", text(&out.stdout));
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    // in private directories of its own, beside the attacker's
    let own_run = siblings(&format!("styxy-preload-{vic}"));
    let own_home = siblings(&format!("styxy-preload-home-{vic}"));
    assert_eq!((own_run.len(), own_home.len()), (1, 1), "{own_run:?} {own_home:?}");
    for d in own_run.iter().chain(&own_home) {
        let m = std::fs::symlink_metadata(d).unwrap();
        assert_eq!(
            (std::os::unix::fs::MetadataExt::uid(&m), std::os::unix::fs::MetadataExt::mode(&m) & 0o777),
            (vic, 0o700),
            "{}",
            d.display()
        );
    }
    assert!(own_run[0].join("daemon.sock").exists());
    // (exec lets the daemon log what it granted for a bounded while; a machine busy enough
    // can take longer, and the event comes after)
    let log = own_home[0].join(".local/state/styxy-preload/events.jsonl");
    wait_for(10, "the bind's event in the victim's own log", || std::fs::read_to_string(&log).ok().filter(|l| l.contains("\"port\":3000")));
    assert_eq!(std::fs::read_dir(&run_dir).unwrap().count(), 0, "the attacker's directory was used");
    // a world-readable file in place of the FIFO: never written either
    std::fs::remove_file(&events).unwrap();
    let mut plant = bare("sh", &[]);
    plant.args(["-c", &format!("touch {0} && chmod 666 {0}", events.display())]);
    let out = run(as_uid(plant, att));
    assert!(out.status.success());
    let out = run(exec());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::metadata(&events).unwrap().len(), 0, "the attacker read the victim's events");
    // FIFOs as maps in the attacker's directory; a program started without `exec` (no
    // STYXY_URL) finds the victim's own directory, and its daemon keeps its bind
    let mut plant = bare("sh", &[]);
    plant.args(["-c", &format!("mkfifo -m 666 {0}/policy.map {0}/ports.map", run_dir.display())]);
    assert!(run(as_uid(plant, att)).status.success());
    let script = "import socket\ns = socket.socket(); s.bind(('127.0.0.1', 3005)); s.listen()\nc = socket.create_connection(('127.0.0.1', 3005), 2)\ncore = 'core' if any('libstyxy' in l and 'libstyxy_preload.so' not in l for l in open('/proc/self/maps')) else 'shim'\nprint('served', s.getsockname()[1], core, flush=True)";
    let mut c = bare("python3", &[("LD_PRELOAD", lib().display().to_string()), ("STYXY_PRELOAD_SESSION", "v13b".into())]);
    c.args(["-c", script]).current_dir("/");
    let started = Instant::now();
    let out = run(as_uid(c, vic));
    // kept by the shim alone (it found the daemon's hook.sock and maps): the hooks' logic never loaded
    assert_eq!(text(&out.stdout).trim(), "served 3005 shim", "{}", text(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    let logged = wait_for(5, "the kept bind's event", || {
        let l = std::fs::read_to_string(own_home[0].join(".local/state/styxy-preload/events.jsonl")).ok()?;
        l.lines().any(|e| e.contains("\"session\":\"v13b\"") && e.contains("\"action\":\"kept\"")).then_some(l)
    });
    assert!(logged.contains("\"port\":3005"), "{logged}");
    drop(w);
}

#[test]
fn the_overflow_uid_of_a_user_namespace_is_nobodys() {
    if !root("to create the attacker") {
        return;
    }
    if run({
        let mut c = Command::new("unshare");
        c.args(["-U", "true"]);
        c
    })
    .status
    .code()
        != Some(0)
    {
        missing("unshare -U (user namespaces)");
        return;
    }
    let att = user("styxy-att");
    let mut w = World::new();
    std::fs::set_permissions(w.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // the attacker's own daemon remaps session "vic"'s 12500 to a port it listens on
    let adir = w.path("att");
    std::fs::create_dir_all(adir.join("rt")).unwrap();
    let chown = |p: &Path| std::os::unix::fs::chown(p, Some(att), Some(att)).unwrap();
    chown(&adir);
    chown(&adir.join("rt"));
    let aenv = [
        ("XDG_RUNTIME_DIR", format!("{}/rt", adir.display())),
        ("XDG_STATE_HOME", format!("{}/st", adir.display())),
        ("HOME", adir.display().to_string()),
    ];
    let planted = PathBuf::from("/tmp/styxy-preload-65534");
    let _ = std::fs::remove_dir_all(&planted);
    let _cleanup = Cleanup { paths: vec![adir.join("rt/styxy-preload"), planted.clone()] };
    let mut start = bare(bin(), &aenv);
    start.args(["daemon", "start", "--idle-exit", "0", "--no-upstream"]);
    assert!(run(as_uid(start, att)).status.success());
    let busy = std::net::TcpListener::bind("127.0.0.1:12500").unwrap(); // so that 12500 is remapped
    let mut port = bare(bin(), &aenv);
    port.args(["port", "--session", "vic", "12500"]);
    let d: u16 = text(&run(as_uid(port, att)).stdout).trim().parse().unwrap();
    drop(busy);
    assert_ne!(d, 12500);
    let trap = std::net::TcpListener::bind(("127.0.0.1", d)).unwrap();
    trap.set_nonblocking(true).unwrap();
    // planted where the fallback of the overflow uid is, readable by all
    std::fs::rename(adir.join("rt/styxy-preload"), &planted).unwrap();
    let mode = |p: PathBuf, m: u32| std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap();
    mode(planted.clone(), 0o755);
    mode(planted.join("ports.map"), 0o644);
    // the victim's server on 12500; its client inside `unshare -U` (its uid unmapped: 65534)
    let server = std::net::TcpListener::bind("127.0.0.1:12500").unwrap();
    server.set_nonblocking(true).unwrap();
    let client =
        "import os, socket; assert os.getuid() == 65534; s = socket.create_connection(('127.0.0.1', 12500), 2); print('connected')";
    // the shim decides the connect; then the hooks' logic (a mode of the process's own)
    for mode in [None, Some("coordinate")] {
        let mut c = Command::new("unshare");
        c.args(["-U", "python3", "-c", client]);
        c.env_clear().env("PATH", "/usr/bin:/bin").env("LD_PRELOAD", lib()).env("STYXY_PRELOAD_SESSION", "vic");
        if let Some(m) = mode {
            c.env("STYXY_PRELOAD_MODE", m);
        }
        let out = run(c);
        assert_eq!(text(&out.stdout).trim(), "connected", "{mode:?}: {}", text(&out.stderr));
        assert!(trap.accept().is_err(), "{mode:?}: the connect went to the attacker's port {d}");
        assert!(server.accept().is_ok(), "{mode:?}: the victim's server was not reached");
    }
    let _ = &mut w;
}
