//! The CLI as people and agents use it: exec (daemon started on demand, exit codes,
//! signals, release), log, env, status.

mod common;

use std::time::Duration;

use common::*;

fn exec(w: &World, args: &[&str]) -> std::process::Command {
    let mut c = w.cli();
    c.arg("exec").args(args);
    c
}

#[test]
fn two_exec_sessions_start_the_daemon_and_both_serve() {
    let mut w = World::new();
    let mut pids = Vec::new();
    for i in 0..2 {
        let dir = w.path(&format!("s{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("who"), format!("s{i}")).unwrap();
        let mut c = exec(&w, &["--", "python3", "-m", "http.server", "8000"]);
        c.current_dir(&dir);
        pids.push(w.spawn(c, &format!("s{i}")));
    }
    let mut ports = Vec::new();
    for (i, pid) in pids.iter().enumerate() {
        let port = wait_for(20, "exec'd server listening", || tree_ports(*pid).into_iter().next());
        assert_eq!(http_get("127.0.0.1", port, "/who").as_deref(), Some(&*format!("s{i}")));
        ports.push(port);
    }
    assert_ne!(ports[0], ports[1]);
    assert!(ports.contains(&8000));
    let remapped = if ports[0] == 8000 { "s1" } else { "s0" };
    assert!(w.stderr_of(remapped).contains("port 8000 is taken; python3"), "{}", w.stderr_of(remapped));
    // log --json: every line parses and tells what happened
    let out = run({
        let mut c = w.cli();
        c.args(["log", "--json"]);
        c
    });
    let events: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(events.iter().any(|e| e["action"] == "remapped" && e["requested_port"] == 8000 && e["port"] != 8000), "{events:?}");
    assert!(events.iter().any(|e| e["action"] == "kept" && e["port"] == 8000));
    let table = text(
        &run({
            let mut c = w.cli();
            c.arg("log");
            c
        })
        .stdout,
    );
    assert!(table.contains("8000 →") && table.contains("remapped"), "{table}");
}

#[test]
fn exit_status_signals_and_missing_commands() {
    let mut w = World::new();
    let code = |args: &[&str]| run(exec(&w, args)).status.code();
    assert_eq!(code(&["--", "sh", "-c", "exit 3"]), Some(3));
    assert_eq!(code(&["--", "sh", "-c", "kill -TERM $$"]), Some(128 + 15));
    let out = run(exec(&w, &["--", "/nonexistent/cmd"]));
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("/nonexistent/cmd: command not found"));
    let notexec = w.path("notexec");
    std::fs::write(&notexec, "x").unwrap();
    assert_eq!(code(&["--", notexec.to_str().unwrap()]), Some(126));
    // SIGINT sent to exec reaches the child
    let script = "import signal,sys,time\nsignal.signal(signal.SIGINT, lambda *a: (print('got SIGINT', flush=True), sys.exit(7)))\nprint('ready', flush=True)\ntime.sleep(30)";
    let mut c = w.cli();
    c.args(["exec", "--", "python3", "-c", script]);
    c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut buf).unwrap();
    assert_eq!(&buf, b"ready\n");
    // SAFETY: kill(2) of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(status.code(), Some(7), "{rest}");
    assert!(rest.contains("got SIGINT"));
    let _ = &mut w;
}

#[test]
fn a_short_exec_in_the_session_leaves_the_servers_port_alone() {
    let mut w = World::new();
    let mut c = exec(&w, &["--session", "x", "--", "python3", "-m", "http.server", "8010"]);
    c.current_dir(w.path("home"));
    let srv = w.spawn(c, "srv");
    let port = wait_for(20, "server", || tree_ports(srv).into_iter().next());
    assert_eq!(port, 8010);
    let out = run(exec(&w, &["--session", "x", "--", "true"]));
    assert!(out.status.success());
    let (_, list) = w.json("GET", "/allocations", None);
    assert!(list["allocations"].as_array().unwrap().iter().any(|a| a["port"] == 8010 && a["instance_id"] == "x"), "{list}");
    // another session still finds 8010 taken
    let mut c = exec(
        &w,
        &[
            "--session",
            "y",
            "--",
            "python3",
            "-c",
            "import socket; s=socket.socket(); s.bind(('127.0.0.1',8010)); print(s.getsockname()[1])",
        ],
    );
    c.current_dir(w.path("home"));
    let out = text(&run(c).stdout);
    assert_ne!(out.trim(), "8010");
    assert!(http_get("127.0.0.1", 8010, "/").is_some());
}

#[test]
fn log_follow_shows_a_new_remap() {
    let mut w = World::new();
    w.start_daemon();
    let mut follow = w.cli();
    follow.args(["log", "-f", "--json"]);
    let f = w.spawn(follow, "follow");
    let _ = f;
    let mut c = w.preloaded(Some("a"), fixture("binder"));
    c.args(["serve", "4080"]);
    let a = w.spawn(c, "a");
    wait_for(10, "a listening", || listening_ports(a).into_iter().next());
    let start = std::time::Instant::now();
    let mut c = w.preloaded(Some("b"), fixture("binder"));
    c.args(["serve", "4080"]);
    let b = w.spawn(c, "b");
    let port = wait_for(10, "b listening", || listening_ports(b).into_iter().next());
    assert_ne!(port, 4080);
    wait_for(5, "log -f printing the remap", || w.output_of("follow").contains("\"remapped\"").then_some(()));
    eprintln!("log -f showed the remap {:?} after the bind started", start.elapsed());
    // the follower survives rotation of the log
    let log = w.log_path();
    std::fs::rename(&log, styxy_preload_common::eventlog::rotated_path(&log)).unwrap();
    let mut c = w.preloaded(Some("c"), fixture("binder"));
    c.args(["serve", "4080"]);
    let c = w.spawn(c, "c");
    wait_for(10, "c listening", || listening_ports(c).into_iter().next());
    wait_for(5, "log -f after rotation", || (w.output_of("follow").matches("\"remapped\"").count() == 2).then_some(()));
}

#[test]
fn env_makes_a_plain_shell_coordinated() {
    let mut w = World::new();
    w.start_daemon();
    let mut c = w.preloaded(Some("holder"), fixture("binder"));
    c.args(["serve", "8020"]);
    let h = w.spawn(c, "holder");
    wait_for(10, "holder", || listening_ports(h).into_iter().next());
    let mut c = w.cmd("bash");
    c.args(["-c", "eval \"$(\"$0\" env)\"; exec python3 -m http.server 8020", bin().to_str().unwrap()]).current_dir(w.path("home"));
    let srv = w.spawn(c, "shell");
    let port = wait_for(20, "server from the eval'd shell", || tree_ports(srv).into_iter().next());
    assert_ne!(port, 8020, "coordinated: moved off the held port");
    assert!(http_get("127.0.0.1", port, "/").is_some());
    let out = text(
        &run({
            let mut c = w.cli();
            c.args(["env", "--shell", "fish", "--session", "agent-1"]);
            c
        })
        .stdout,
    );
    assert!(out.contains("set -gx STYXY_PRELOAD_SESSION 'agent-1'") && out.contains("libstyxy_preload.so"), "{out}");
}

#[test]
fn status_names_each_problem_with_its_fix() {
    let w = World::new();
    // no daemon
    let out = run({
        let mut c = w.cli();
        c.arg("status");
        c
    });
    let s = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{s}");
    assert!(s.contains("✓ library") && s.contains("✗ coordinator: the daemon does not answer") && s.contains("fix: start it"), "{s}");
    w.start_daemon();
    let out = run({
        let mut c = w.cli();
        c.arg("status");
        c
    });
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    // STYXY_PRELOAD_DISABLE read as the library reads it: " 0 " leaves the hooks on
    for (value, disabled) in [(" 0 ", false), ("1", true)] {
        let out = run({
            let mut c = w.cli();
            c.arg("status").env("STYXY_PRELOAD_DISABLE", value);
            c
        });
        let s = text(&out.stdout);
        assert_eq!(s.contains("but STYXY_PRELOAD_DISABLE is set"), disabled, "{value:?}: {s}");
    }
    // a binary without its library beside it
    let lonely = w.path("bin/styxy-preload");
    std::fs::create_dir_all(lonely.parent().unwrap()).unwrap();
    std::fs::copy(bin(), &lonely).unwrap();
    let out = run({
        let mut c = w.cmd(&lonely);
        c.arg("status");
        c
    });
    let s = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(s.contains("✗ library: libstyxy_preload.so not found") && s.contains("fix: build it"), "{s}");
    let out = run({
        let mut c = w.cmd(&lonely);
        c.args(["exec", "--", "true"]);
        c
    });
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("STYXY_PRELOAD_LIB"), "{}", text(&out.stderr));
    let _ = Duration::ZERO;
}

#[test]
fn an_env_shell_stays_coordinated_past_the_daemons_idle_limit() {
    let mut w = World::new();
    // a server outside any session holds 8060
    let mut c = w.cmd(fixture("binder"));
    c.args(["serve", "8060"]);
    let h = w.spawn(c, "holder");
    wait_for(10, "holder", || listening_ports(h).into_iter().next());
    // an agent shell set up once with env; three idle limits pass before its server starts
    let script = "eval \"$(\"$0\" env --session idle)\" && sleep 3.5 && exec python3 -c \"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 8060)); print(s.getsockname()[1])\"";
    let mut c = w.cmd("bash");
    c.args(["-c", script, bin().to_str().unwrap()]).env("STYXY_PRELOAD_IDLE_EXIT", "1");
    let out = run(c);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let port: u16 = text(&out.stdout).trim().parse().unwrap();
    assert_ne!(port, 8060, "remapped, not passed through: the daemon stayed for the shell");
    assert!(text(&out.stderr).contains("port 8060 is taken"), "{}", text(&out.stderr));
    // with the shell gone, the idle limit applies again
    let pid = w.daemon_pid().unwrap();
    // SAFETY: kill(2) with signal 0 only asks whether the pid lives.
    wait_for(10, "the daemon's idle exit", || (unsafe { libc::kill(pid, 0) } != 0).then_some(()));
}

#[test]
fn an_env_shell_whose_daemon_is_gone_says_so_in_its_own_stderr_file() {
    let mut w = World::new();
    let mut c = w.cmd(fixture("binder"));
    c.args(["serve", "8061"]);
    let h = w.spawn(c, "holder");
    wait_for(10, "holder", || listening_ports(h).into_iter().next());
    // the agent's shell writes its stderr to a file (`2>log`); its daemon goes away
    let script = "eval \"$(\"$0\" env --session gone)\" && \"$0\" daemon stop >/dev/null && exec python3 -c \"
import socket
s = socket.socket()
try: s.bind(('0.0.0.0', 8061))
except OSError as e: print(e.errno)\"";
    let log = w.path("shell.err");
    let mut c = w.cmd("bash");
    c.args(["-c", script, bin().to_str().unwrap()]).stderr(std::fs::File::create(&log).unwrap());
    c.stdin(std::process::Stdio::null());
    let out = c.output().unwrap();
    assert_eq!(text(&out.stdout).trim(), "98", "{:?} {}", out.status, std::fs::read_to_string(&log).unwrap());
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(err.contains("styxy-preload: no coordinator"), "coordination stopped without a word: {err}");
}

#[test]
fn every_command_ends_quietly_on_a_closed_pipe() {
    let w = World::new();
    w.start_daemon();
    // something in the log and the table
    let mut c = w.preloaded(Some("pipe"), "python3");
    c.args(["-c", "import socket; s=socket.socket(); s.bind(('127.0.0.1',3000)); s.listen()"]);
    assert!(run(c).status.success());
    let mut c = w.cli();
    c.args(["port", "--session", "pipe-port", "3000"]);
    assert!(run(c).status.success());
    let gen = w.path("generated");
    std::fs::create_dir_all(&gen).unwrap();
    let commands: &[&[&str]] = &[
        &["ports"],
        &["ports", "--json"],
        &["status"],
        &["log"],
        &["log", "--all"],
        &["log", "--json"],
        &["stats"],
        &["stats", "--json"],
        &["env"],
        &["port", "3001"],
        &["port", "--json", "3002"],
        &["daemon", "status"],
        &["exec", "--", "echo", "hi"],
        &["log", "-f"],
        &["generate", "completions", gen.to_str().unwrap()],
        &["--help"],
        &["--version"],
        &["daemon", "stop"],
    ];
    for args in commands {
        // a pipe whose reader is gone before the command writes: every write is EPIPE
        let (read, write) = std::io::pipe().unwrap();
        drop(read);
        let mut c = w.cli();
        c.args(*args).stdout(write).stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        let status = wait_for(10, &format!("styxy-preload {} to end", args.join(" ")), || child.try_wait().unwrap());
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(stderr.is_empty(), "styxy-preload {}: {stderr}", args.join(" "));
        assert_ne!(status.code(), Some(101), "styxy-preload {} panicked", args.join(" "));
    }
}
