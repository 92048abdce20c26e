//! Faults, load and hostile input (docs/ARCHITECTURE.md "The hooks inside foreign processes",
//! "The built-in daemon"): the host program keeps working, the daemon keeps serving.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;

use common::*;
use serde_json::Value;
use styxy_preload_common::eventlog::Action;
use styxy_preload_common::http::{self, Timeouts};

/// Python in `session` binding 127.0.0.1:`port`: prints the port it got and the ms the bind took.
fn py_bind(w: &World, session: &str, port: u16, extra_env: &[(&str, &str)]) -> (u16, u64, String) {
    let script = format!(
        "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\nt=time.perf_counter()\ns.bind(('127.0.0.1',{port}))\nprint(s.getsockname()[1], round((time.perf_counter()-t)*1000))"
    );
    let mut c = w.preloaded(Some(session), "python3");
    c.args(["-c", &script]).envs(extra_env.iter().copied());
    let out = run(c);
    let s = text(&out.stdout);
    let f: Vec<u64> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    assert_eq!(f.len(), 2, "python failed: {s} {}", text(&out.stderr));
    (f[0] as u16, f[1], text(&out.stderr))
}

fn hold(w: &mut World, session: &str, port: u16, name: &str) -> u16 {
    let mut c = w.preloaded(Some(session), fixture("binder"));
    c.args(["serve", &port.to_string()]);
    let pid = w.spawn(c, name);
    wait_for(10, name, || listening_ports(pid).into_iter().next())
}

#[test]
fn an_unwritable_log_or_a_full_disk_changes_nothing_for_the_program() {
    let mut w = World::new();
    w.start_daemon();
    hold(&mut w, "other", 4200, "holder");
    for log in ["/dev/full", "/etc/passwd/not-a-dir/events.jsonl"] {
        let (port, _, err) = py_bind(&w, "mine", 4200, &[("STYXY_PRELOAD_LOG", log)]);
        assert_ne!(port, 4200, "still coordinated with the log at {log}");
        assert!(err.contains("got"), "{err}");
    }
}

#[test]
fn a_hooked_bind_never_reads_an_http_answer() {
    // a hostile HTTP server where the daemon's socket would be: the hooks ask only on
    // `hook.sock` beside it (absent here), never over HTTP, so nothing it says is read (a
    // connection without a word may come: it starts a socket-activated daemon)
    let w = World::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("daemon.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("unix:{}", sock.display());
    let (port, ms, err) = py_bind(&w, "hostile", 4410, &[("STYXY_URL", &url)]);
    assert_eq!(port, 4410, "the original address is bound");
    assert!(ms <= 1000, "bind took {ms} ms");
    assert!(err.contains("no coordinator") && err.contains("hook.sock"), "said why, once: {err}");
    if let Ok((mut conn, _)) = listener.accept() {
        let mut said = Vec::new();
        std::io::Read::read_to_end(&mut conn, &mut said).unwrap();
        assert!(said.is_empty(), "the hooks spoke HTTP: {}", String::from_utf8_lossy(&said));
    }
}

#[test]
fn a_hundred_processes_binding_three_ports_each_get_distinct_ports() {
    let mut w = World::new();
    w.start_daemon();
    // 300 binds over four types of 100 ports each: 75 per type, so ports this machine
    // uses in those ranges leave enough room
    let bases = [3000u16, 4000, 8000, 9200];
    let mut pids = Vec::new();
    for i in 0..100 {
        let ports: Vec<String> = (0..3).map(|k| bases[(i + k) % 4].to_string()).collect();
        let mut c = w.preloaded(Some(&format!("load{i}")), fixture("binder"));
        c.arg("hold").args(&ports);
        pids.push(w.spawn(c, &format!("load{i}")));
    }
    let mut all = BTreeSet::new();
    for (i, pid) in pids.iter().enumerate() {
        let ports = wait_for(60, "every process holding 3 ports", || Some(listening_ports(*pid)).filter(|p| p.len() == 3));
        for p in ports {
            assert!(all.insert(p), "port {p} twice (process {i})");
        }
    }
    assert_eq!(all.len(), 300);
    let (_, list) = w.json("GET", "/allocations", None);
    let held: BTreeSet<u16> = list["allocations"].as_array().unwrap().iter().filter_map(|a| a["port"].as_u64()).map(|p| p as u16).collect();
    let lost: Vec<_> = all.difference(&held).collect();
    let about: Vec<_> = w.events().into_iter().filter(|e| lost.contains(&&e.port) || lost.contains(&&e.requested_port)).collect();
    assert!(lost.is_empty(), "listening without an allocation: {lost:?}\n{about:#?}");
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap()
}

#[test]
fn ten_thousand_allocate_release_cycles_leak_neither_fds_nor_memory() {
    let w = World::new();
    w.start_daemon();
    let pid = w.daemon_pid().unwrap();
    let cycle = |n: usize| {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let ep = w.endpoint();
                std::thread::spawn(move || {
                    for i in 0..n / 4 {
                        let body = format!(r#"{{"service_type":"docs","instance_id":"c{t}-{i}"}}"#);
                        let r = http::call(&ep, "POST", "/allocate", Some(body.as_bytes()), Timeouts::CLI).unwrap();
                        let v: Value = serde_json::from_slice(&r.body).unwrap();
                        let lock = v["lock_id"].as_str().unwrap();
                        let r = http::call(&ep, "DELETE", &format!("/allocate/{lock}"), None, Timeouts::CLI).unwrap();
                        assert_eq!(r.status, 200);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    };
    cycle(2000); // warm up allocator arenas and the runtime
    let (fds, rss) = (fd_count(pid), rss_kb(pid));
    cycle(10_000);
    // the daemon closes its side of the clients' last connections after they do: a leak
    // is a count still high once it has had the time to
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let fds2 = loop {
        let n = fd_count(pid);
        if n <= fds + 2 || std::time::Instant::now() > until {
            break n;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let rss2 = rss_kb(pid);
    eprintln!("daemon fds {fds} -> {fds2}, RSS {rss} kB -> {rss2} kB");
    assert!(fds2 <= fds + 2, "fds grew from {fds} to {fds2}");
    assert!(rss2 <= rss + 4096, "RSS grew from {rss} kB to {rss2} kB");
    let (_, list) = w.json("GET", "/allocations", None);
    assert_eq!(list["allocations"].as_array().unwrap().len(), 0);
}

#[test]
fn forks_from_a_busy_multithreaded_process_bind_fine() {
    let w = World::new();
    w.start_daemon();
    let mut c = w.preloaded(Some("forks"), fixture("binder"));
    c.args(["forkstress", "4420", "50"]);
    let out = run(c);
    assert_eq!(text(&out.stdout).trim(), "forks-ok 50 of 50", "{}", text(&out.stderr));
}

#[test]
fn no_fd_of_ours_survives_exec() {
    let mut w = World::new();
    w.start_daemon();
    hold(&mut w, "other", 4430, "holder");
    // bind (remapped: log, daemon socket), connect in the session (port map), then exec
    let script = "import socket,os\ns=socket.socket(); s.bind(('127.0.0.1',4430)); s.listen()\nc=socket.socket()\ntry: c.connect(('127.0.0.1',4430))\nexcept OSError: pass\nos.execv('/bin/ls', ['ls','-l','/proc/self/fd'])";
    let mut c = w.preloaded(Some("mine"), "python3");
    c.args(["-c", script]);
    let out = text(&run(c).stdout);
    for ours in ["daemon.sock", "events.jsonl", "ports.map", "socket:", "styxy"] {
        assert!(!out.contains(ours), "{ours} survived exec:\n{out}");
    }
}

#[test]
fn another_uid_is_refused_on_the_unix_socket() {
    if !root("cannot drop privileges to test another uid; the 0700 directory refuses it anyway") {
        return;
    }
    let w = World::new();
    w.start_daemon();
    use std::os::unix::fs::PermissionsExt;
    // open the path up so that only the daemon's peer-uid check stands in the way
    for d in [w.path(""), w.path("run"), w.path("run/styxy-preload")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(w.socket(), std::fs::Permissions::from_mode(0o777)).unwrap();
    // refused: the connection is closed without an answer (EOF, or EPIPE/ECONNRESET if it is already gone)
    let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\ntry:\n  s.sendall(b'GET /status HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); print(repr(s.recv(100)))\nexcept (BrokenPipeError, ConnectionResetError): print(repr(b''))";
    let mut c = w.cmd("python3");
    c.args(["-c", script]).arg(w.socket());
    // SAFETY: setgid/setuid in the child before exec.
    unsafe {
        c.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = run(c);
    assert_eq!(text(&out.stdout).trim(), "b''", "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(w.json("GET", "/status", None).0, 200, "still serving its own user");
    let log = std::fs::read_to_string(w.path("state/styxy-preload/daemon.log")).unwrap();
    assert!(log.contains("refused a connection from uid 65534"), "{log}");
}

#[test]
fn planted_symlinks_are_not_followed() {
    let w = World::new();
    // a symlink where the socket goes: replaced by the daemon's socket, its target untouched
    let dir = w.path("run/styxy-preload");
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let target = w.path("precious");
    std::fs::write(&target, "keep").unwrap();
    std::os::unix::fs::symlink(&target, w.socket()).unwrap();
    w.start_daemon();
    assert!(std::fs::symlink_metadata(w.socket()).unwrap().file_type().is_socket_like());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    // a symlink in place of the runtime directory: refused with a clear error
    let w2 = World::new();
    std::os::unix::fs::symlink(w2.path("home"), w2.path("run/styxy-preload")).unwrap();
    let out = run({
        let mut c = w2.cli();
        c.args(["daemon", "run", "--idle-exit", "1"]);
        c
    });
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("is not a directory"), "{}", text(&out.stderr));
}

trait SocketLike {
    fn is_socket_like(&self) -> bool;
}

impl SocketLike for std::fs::FileType {
    fn is_socket_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_socket(self)
    }
}

#[test]
fn a_truncated_state_file_is_moved_aside_and_the_daemon_starts() {
    let w = World::new();
    let dir = w.path("state/styxy-preload");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("daemon-state.json"), b"").unwrap();
    w.start_daemon();
    assert_eq!(w.json("GET", "/status", None).0, 200);
}

#[test]
fn a_setuid_program_is_untouched() {
    if !root("cannot make a setuid-root program to test") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("suid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let plain = dir.join("binder");
    let suid = dir.join("binder-suid");
    std::fs::copy(fixture("binder"), &plain).unwrap();
    std::fs::copy(fixture("binder"), &suid).unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let w = World::new();
    let as_nobody = |prog: &std::path::Path| {
        let mut c = w.preloaded(Some("suid"), prog);
        c.arg("maps");
        // SAFETY: setgid/setuid in the child before exec.
        unsafe {
            c.pre_exec(|| {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        text(&run(c).stdout).trim().to_string()
    };
    let control = as_nobody(&plain);
    let suid_out = as_nobody(&suid);
    let _ = std::fs::remove_dir_all(&dir);
    if control != "styxy-mapped 1" {
        eprintln!("the library is not readable by nobody here ({control}); nothing to compare");
        return;
    }
    if suid_out.is_empty() {
        eprintln!("this mount ignores the setuid bit; nothing to compare");
        return;
    }
    assert_eq!(suid_out, "styxy-mapped 0", "the loader must not load us into a setuid program");
}

/// Six busy loops per core (a load near 12 on a 2-core machine) while 60 sessions each
/// bind 3000, 8000 and 9222 at once: the daemon is slow but alive (it beats), so every bind
/// waits for it — every listener has an allocation, none passed through, all distinct.
#[test]
fn on_a_machine_busy_with_cpu_hogs_every_bind_is_coordinated() {
    let mut w = World::new();
    w.start_daemon();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hogs: Vec<u32> = (0..cores * 6)
        .map(|i| {
            let mut c = w.cmd("sh");
            c.args(["-c", "while :; do :; done"]);
            w.spawn(c, &format!("hog{i}"))
        })
        .collect();
    let pids: Vec<u32> = (0..60)
        .map(|i| {
            let mut c = w.preloaded(Some(&format!("busy{i}")), fixture("binder"));
            c.args(["hold", "3000", "8000", "9222"]);
            w.spawn(c, &format!("busy{i}"))
        })
        .collect();
    let mut all = BTreeSet::new();
    for (i, pid) in pids.iter().enumerate() {
        let ports = wait_for(120, "every process holding 3 ports", || Some(listening_ports(*pid)).filter(|p| p.len() == 3));
        for p in ports {
            assert!(all.insert(p), "port {p} twice (process {i})");
        }
    }
    for h in hogs {
        w.kill(h);
    }
    let events = w.events();
    let passed: Vec<_> = events.iter().filter(|e| e.action == Action::Passthrough).collect();
    assert!(passed.is_empty(), "binds passed through uncoordinated: {passed:#?}");
    let (_, list) = w.json("GET", "/allocations", None);
    let held: BTreeSet<u16> = list["allocations"].as_array().unwrap().iter().filter_map(|a| a["port"].as_u64()).map(|p| p as u16).collect();
    let lost: Vec<_> = all.difference(&held).collect();
    assert!(lost.is_empty(), "listening without an allocation: {lost:?}");
}

/// `SIGALRM` every 50 µs (no `SA_RESTART`) interrupts the shim's wait for the daemon's
/// answer: the wait resumes, so a free port is kept — never asked again and found "taken"
/// by its own grant.
#[test]
fn a_signal_storm_during_coordinated_binds_moves_no_free_port() {
    let w = World::new();
    w.start_daemon();
    for (session, base) in [(None, 3000u16), (Some("storm"), 3100)] {
        let mut c = w.preloaded(session, fixture("binder"));
        c.args(["sigstorm", &base.to_string(), "20"]);
        let out = run(c);
        let (got, err) = (rows(&out.stdout), text(&out.stderr));
        assert_eq!(got.len(), 20, "{got:?}\n{err}");
        for (i, r) in got.iter().enumerate() {
            assert_eq!((r.rc, r.port), (Some(0), Some(base + i as u16)), "{session:?}: {got:?}\n{err}");
        }
        assert!(!err.contains("taken"), "{err}");
    }
}

/// Fills the listening backlog of the Unix socket at `path` with connections nobody
/// accepts (the daemon is stopped); they stay open while the returned sockets live.
fn fill_backlog(path: &std::path::Path, ty: libc::c_int) -> Vec<std::os::fd::OwnedFd> {
    let mut held = Vec::new();
    for _ in 0..20_000 {
        match unix_connect(path, ty | libc::SOCK_NONBLOCK) {
            Ok(fd) => held.push(fd),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return held, // the backlog is full
            Err(e) => panic!("connect to {}: {e}", path.display()),
        }
    }
    panic!("the backlog of {} never filled", path.display());
}

/// A stopped daemon whose two backlogs are full: a coordinated bind neither blocks in the
/// connect nor waits for a daemon that does not beat — it goes as asked, and says so.
#[test]
fn a_stopped_daemon_with_full_backlogs_never_hangs_a_bind() {
    let w = World::new();
    w.start_daemon();
    let pid = w.daemon_pid().unwrap();
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit of this test process's own fd limit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(65536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    // SAFETY: kill(2) of this world's daemon; it is continued below (and killed with the world).
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let hook = fill_backlog(&w.path("run/styxy-preload/hook.sock"), libc::SOCK_SEQPACKET);
    let http = fill_backlog(&w.socket(), libc::SOCK_STREAM);
    let (port, ms, err) = py_bind(&w, "stopped", 3000, &[]);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(port, 3000, "bound as asked: {err}");
    assert!(ms < 5000, "the bind hung for {ms} ms ({} + {} connections queued)", hook.len(), http.len());
    assert!(err.contains("styxy-preload"), "said once: {err}");
}

/// A CPU-quota cgroup (v1 `cpu` controller, or v2 `cpu.max`) holding a process: it runs
/// `quota_us` in every 100 ms, as a daemon starved by a busy machine would. Removed (the
/// process moved back to the root group) when dropped, pass or fail.
struct Throttle(std::path::PathBuf, std::path::PathBuf);

impl Throttle {
    fn new(pid: i32, quota_us: u32) -> Option<Throttle> {
        let name = format!("styxy-test-{}-{}", std::process::id(), unique());
        for (root, limit) in [("/sys/fs/cgroup/cpu", "cpu.cfs_quota_us"), ("/sys/fs/cgroup", "cpu.max")] {
            let dir = std::path::Path::new(root).join(&name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let value = if limit == "cpu.max" { format!("{quota_us} 100000") } else { quota_us.to_string() };
            let t = Throttle(dir.clone(), root.into());
            if std::fs::write(dir.join(limit), value).is_ok() && std::fs::write(dir.join("cgroup.procs"), pid.to_string()).is_ok() {
                return Some(t);
            }
        }
        None
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        for p in std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default().lines() {
            let _ = std::fs::write(self.1.join("cgroup.procs"), p);
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A daemon that runs 2 ms in every 100 ms answers twenty binds at once over seconds, but
/// it beats: every bind waits for its answer — distinct ports, none passed through.
#[test]
fn a_slow_but_live_daemon_is_waited_for() {
    let mut w = World::new();
    w.start_daemon();
    if !root("a CPU-quota cgroup for the daemon") {
        return;
    }
    let Some(_throttle) = Throttle::new(w.daemon_pid().unwrap(), 2000) else {
        return missing("a writable cgroup cpu controller (/sys/fs/cgroup/cpu or cgroup v2 cpu.max)");
    };
    let pids: Vec<u32> = (0..20)
        .map(|i| {
            let mut c = w.preloaded(Some(&format!("slow{i}")), fixture("binder"));
            c.args(["hold", "3000"]);
            w.spawn(c, &format!("slow{i}"))
        })
        .collect();
    let mut all = BTreeSet::new();
    for pid in &pids {
        let ports = wait_for(60, "every process listening", || Some(listening_ports(*pid)).filter(|p| p.len() == 1));
        all.extend(ports);
    }
    drop(_throttle);
    assert_eq!(all.len(), 20, "{all:?}");
    let passed: Vec<_> = w.events().into_iter().filter(|e| e.action == Action::Passthrough).collect();
    assert!(passed.is_empty(), "binds passed through uncoordinated: {passed:#?}");
}
