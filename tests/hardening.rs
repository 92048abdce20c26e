//! The library must never hurt its host (and the
//! notice under Node parents): a bad pointer gets EFAULT, not SIGSEGV; the remap notice
//! never blocks and lands only where a person reads it; a core that could not be loaded
//! once (EMFILE) is loaded later.

mod common;

use common::*;

/// A server outside any session holding `port`, so that a session's bind of it is moved.
fn hold(w: &mut World, port: u16) {
    let mut c = w.cmd(fixture("binder"));
    c.args(["serve", &port.to_string()]);
    let h = w.spawn(c, &format!("holder-{port}"));
    wait_for(10, "the holder", || listening_ports(h).into_iter().next());
}

#[test]
fn bad_address_pointers_get_efault_with_and_without_coordination() {
    let w = World::new();
    let plain = run({
        let mut c = w.cmd(fixture("binder"));
        c.args(["efault", "3000"]);
        c
    });
    assert!(plain.status.success());
    // no daemon, no session; then a session with its daemon
    let alone = run({
        let mut c = w.preloaded(None, fixture("binder"));
        c.args(["efault", "3000"]);
        c
    });
    assert_eq!(alone.status.code(), Some(0), "the library crashed the program: {:?}", alone.status);
    assert_eq!(text(&alone.stdout), text(&plain.stdout));
    w.start_daemon();
    let session = run({
        let mut c = w.preloaded(Some("ef"), fixture("binder"));
        c.args(["efault", "3000"]);
        c
    });
    assert_eq!(session.status.code(), Some(0), "{:?}", session.status);
    assert_eq!(text(&session.stdout), text(&plain.stdout));
    assert!(text(&plain.stdout).contains("bind-unmapped -1 14"), "{}", text(&plain.stdout));
}

/// Python in session `s`, with fd 2 set up by `setup` (which leaves `probe()` to check what
/// arrived), binding the held `port`; prints the outcome.
fn notice_case(w: &World, setup: &str, port: u16) -> String {
    let body = format!(
        "{setup}\nt = time.monotonic()\ns = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\nprint('bound', s.getsockname()[1] != {port}, round(time.monotonic() - t, 2), probe(), flush=True)"
    );
    // fd 2 is what the case makes it: a failure is told on stdout
    let indented: String = body.lines().map(|l| format!("  {l}\n")).collect();
    let script = format!(
        "import os, socket, time, sys, traceback\ntry:\n{indented}except Exception:\n  print('error', traceback.format_exc().replace(chr(10), ' | '), flush=True); sys.exit(1)"
    );
    // a session of its own per case: never the previous case's (still unswept) mapping
    let mut c = w.preloaded(Some(&format!("notice-{}", unique())), "python3");
    c.args(["-c", &script]);
    let out = run(c);
    assert!(out.status.success(), "{:?} {} {}", out.status, text(&out.stdout), text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

#[test]
fn the_notice_never_blocks_and_lands_only_where_a_person_reads() {
    let mut w = World::new();
    w.start_daemon();
    hold(&mut w, 3095);
    // a full pipe nobody reads: the bind returns at once, the line is dropped
    let full = "r, w = os.pipe(); os.set_blocking(w, False)\nwhile True:\n  try: os.write(w, b'x' * 4096)\n  except BlockingIOError: break\nos.set_blocking(w, True); os.dup2(w, 2)\nprobe = lambda: 'dropped'";
    let out = notice_case(&w, full, 3095);
    assert!(out.starts_with("bound True"), "{out}");
    let secs: f64 = out.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(secs < 3.0, "the bind waited {secs} s on a full stderr pipe");
    // a Unix socketpair (Node's child_process): the line arrives
    let pair = "a, b = socket.socketpair(); os.dup2(b.fileno(), 2); a.setblocking(False)\nprobe = lambda: 'got' if b'port 3095 is taken' in a.recv(4096) else 'nothing'";
    assert_eq!(notice_case(&w, pair, 3095).split_whitespace().last(), Some("got"));
    // a TCP socket at fd 2: the peer never reads our line
    let tcp = "l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(); c = socket.create_connection(l.getsockname()); p, _ = l.accept(); os.dup2(c.fileno(), 2); p.settimeout(0.3)\ndef probe():\n  try: return 'got' if p.recv(4096) else 'nothing'\n  except socket.timeout: return 'nothing'";
    assert_eq!(notice_case(&w, tcp, 3095).split_whitespace().last(), Some("nothing"));
    // a data file the program opened as fd 2: never written to
    let data = w.path("data.txt");
    let file = format!(
        "os.close(2); f = open('{}', 'w'); assert f.fileno() == 2\nprobe = lambda: 'got' if 'styxy-preload' in open('{}').read() else 'nothing'",
        data.display(),
        data.display()
    );
    assert_eq!(notice_case(&w, &file, 3095).split_whitespace().last(), Some("nothing"));
    // but `exec … 2>log` is the person's own file: the line is there
    let log = w.path("exec.err");
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", "notice2", "--", "python3", "-c"])
        .arg("import socket; s = socket.socket(); s.bind(('127.0.0.1', 3095)); s.listen()")
        .stderr(std::fs::File::create(&log).unwrap());
    c.stdin(std::process::Stdio::null()).status().unwrap();
    assert!(std::fs::read_to_string(&log).unwrap().contains("port 3095 is taken"), "{}", std::fs::read_to_string(&log).unwrap());
}

#[test]
fn a_bind_at_the_fd_limit_goes_as_asked_and_the_next_is_coordinated() {
    let mut w = World::new();
    w.start_daemon();
    let mut c = w.preloaded(Some("emfile"), fixture("binder"));
    c.args(["emfile", "3096"]);
    let pid = w.spawn(c, "emfile");
    let rows = wait_for(10, "the two binds", || {
        let l = rows(w.output_of("emfile").as_bytes());
        (l.len() == 2).then_some(l)
    });
    // at the limit: passed through as asked (no socket to ask the daemon on)
    assert_eq!(rows[0], Row::of("tight", 0, 0, 3096));
    // once fds are available again: coordinated (3096 is held by the first socket: moved)
    assert_eq!((rows[1].case.as_str(), rows[1].outcome()), ("relaxed", (Some(0), Some(0))), "{rows:?}");
    assert_ne!(rows[1].port, Some(3096), "{rows:?}");
    w.kill(pid);
}

/// Kills a process this test started outside its world (the attacker's daemon), pass or fail.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the daemon this test started.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// `program` run as `uid` with exactly `env` (nothing of the test's own environment).
fn as_user(uid: u32, env: &[(&str, String)], program: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new("setpriv");
    c.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()]).arg(program).args(args);
    c.env_clear().env("PATH", "/usr/local/bin:/usr/bin:/bin").envs(env.iter().map(|(k, v)| (*k, v)));
    c
}

#[test]
fn another_user_cannot_steer_a_sessions_connects_through_the_tmp_fallback() {
    if !root("needs root to create the attacker and the victim") {
        return;
    }
    let (att, vic) = (user("styxy-att"), user("styxy-vic"));
    let mut w = World::new();
    let open = |p: &std::path::Path| std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    open(w.dir.path());
    // the attacker's world: its own daemon, a session "vic" remap 12500 → D, a receiver on D
    let adir = w.path("att");
    std::fs::create_dir_all(&adir).unwrap();
    std::os::unix::fs::chown(&adir, Some(att), Some(att)).unwrap();
    let aenv = [
        ("XDG_RUNTIME_DIR", format!("{}/rt", adir.display())),
        ("XDG_STATE_HOME", format!("{}/st", adir.display())),
        ("HOME", adir.display().to_string()),
        ("STYXY_DAEMON_PORT", "1".into()),
    ];
    std::fs::create_dir_all(adir.join("rt")).unwrap();
    std::os::unix::fs::chown(adir.join("rt"), Some(att), Some(att)).unwrap();
    assert!(run(as_user(att, &aenv, &bin(), &["daemon", "start", "--idle-exit", "0", "--no-upstream"])).status.success());
    let pid: i32 = std::fs::read_to_string(adir.join("rt/styxy-preload/daemon.pid")).unwrap().trim().parse().unwrap();
    let _daemon = KillOnDrop(pid);
    let busy = std::net::TcpListener::bind("127.0.0.1:12500").unwrap(); // so that 12500 is remapped
    let d: u16 = text(&run(as_user(att, &aenv, &bin(), &["port", "--session", "vic", "12500"])).stdout).trim().parse().unwrap();
    drop(busy);
    assert_ne!(d, 12500);
    let got = adir.join("got");
    let receiver = format!(
        "import socket\nl=socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); l.bind(('127.0.0.1',{d})); l.listen()\nwhile True:\n  c,_=l.accept(); open('{}','ab').write(c.recv(100)); c.close()",
        got.display()
    );
    w.spawn(as_user(att, &aenv, std::path::Path::new("/usr/bin/python3"), &["-c", &receiver]), "receiver");
    wait_for(10, "the receiver", || std::net::TcpStream::connect(("127.0.0.1", d)).ok());
    // the attacker plants its runtime directory where the victim's fallback is
    let planted = std::path::PathBuf::from(format!("/tmp/styxy-preload-{vic}"));
    let _ = std::fs::remove_dir_all(&planted);
    std::fs::rename(adir.join("rt/styxy-preload"), &planted).unwrap();
    let mode = |p: std::path::PathBuf, m: u32| std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap();
    mode(planted.clone(), 0o755);
    mode(planted.join("daemon.sock"), 0o666);
    mode(planted.join("ports.map"), 0o644);
    // the victim, without XDG_RUNTIME_DIR: its own server on 12500, its client in session vic
    let vhome = w.path("vic");
    std::fs::create_dir_all(&vhome).unwrap();
    std::os::unix::fs::chown(&vhome, Some(vic), Some(vic)).unwrap();
    let venv = [("HOME", vhome.display().to_string()), ("STYXY_DAEMON_PORT", "1".into())];
    let server = "import socket\nl=socket.socket(); l.bind(('127.0.0.1',12500)); l.listen()\nwhile True:\n  c,_=l.accept(); c.sendall(b'victim'); c.close()";
    w.spawn(as_user(vic, &venv, std::path::Path::new("/usr/bin/python3"), &["-c", server]), "victim-server");
    wait_for(10, "the victim's server", || std::net::TcpStream::connect(("127.0.0.1", 12500)).ok());
    let mut cenv = venv.to_vec();
    cenv.extend([("LD_PRELOAD", lib().display().to_string()), ("STYXY_PRELOAD_SESSION", "vic".into())]);
    let client = "import socket; s=socket.create_connection(('127.0.0.1',12500),2); s.sendall(b'password'); print(s.recv(10).decode())";
    let out = run(as_user(vic, &cenv, std::path::Path::new("/usr/bin/python3"), &["-c", client]));
    let planted_gone = || std::fs::remove_dir_all(&planted);
    assert_eq!(text(&out.stdout).trim(), "victim", "{}", text(&out.stderr));
    assert!(!std::fs::read_to_string(&got).unwrap_or_default().contains("password"), "the attacker received the victim's bytes");
    // the CLI never uses the planted directory: it looks in a private one of the victim's own
    let t = std::time::Instant::now();
    let out = run(as_user(vic, &venv, &bin(), &["status"]));
    let _ = planted_gone();
    let own: Vec<_> = std::fs::read_dir("/tmp")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("styxy-preload-{vic}.")))
        .map(|e| e.path())
        .collect();
    for d in &own {
        let _ = std::fs::remove_dir_all(d);
    }
    assert_eq!(out.status.code(), Some(1), "no daemon answers there");
    assert!(t.elapsed() < std::time::Duration::from_secs(3), "{:?}", t.elapsed());
    let said = text(&out.stdout);
    assert!(!said.contains(&planted.join("daemon.sock").display().to_string()), "{said}");
    assert!(own.iter().any(|d| said.contains(&d.display().to_string())), "{said} {own:?}");
}
