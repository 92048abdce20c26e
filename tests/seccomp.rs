//! `exec`'s seccomp mode: programs `LD_PRELOAD` never reaches — statically linked C,
//! Go — coordinated by the supervisor, with the kernel's view of their ports.
mod common;

use std::collections::BTreeSet;

use common::*;
use styxy_preload_common::eventlog::Action;

/// `exec --session S [flags] -- program args`, started in the world; its pid.
fn exec(w: &mut World, session: &str, flags: &[&str], program: &std::path::Path, args: &[&str], name: &str) -> u32 {
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", session]).args(flags).arg("--").arg(program).args(args).env("WHO", name);
    w.spawn(c, name)
}

/// The static `binder` serving 8000 in session `first`, then in session `second` (each
/// named after its session): their `exec` pids and the ports they serve.
fn two_on_8000(w: &mut World, first: &str, second: &str) -> ((u32, u16), (u32, u16)) {
    let server = static_fixture("binder");
    let a = exec(w, first, &[], &server, &["serve", "8000"], first);
    let pa = wait_for(20, &format!("{first}'s server"), || tree_ports(a).into_iter().next());
    let b = exec(w, second, &[], &server, &["serve", "8000"], second);
    let pb = wait_for(20, &format!("{second}'s server"), || tree_ports(b).into_iter().next());
    ((a, pa), (b, pb))
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string()
}

#[test]
fn two_static_servers_asking_for_8000_in_two_sessions_both_serve_on_distinct_ports() {
    let mut w = World::new();
    let ((_, pa), (b, pb)) = two_on_8000(&mut w, "one", "two");
    assert_eq!(pa, 8000, "{}", w.stderr_of("one"));
    assert_ne!(pb, 8000, "{}", w.stderr_of("two"));
    // each port is its own server's (the kernel's view, then a real request)
    assert_eq!(http_get("127.0.0.1", pa, "/").as_deref(), Some("one"));
    assert_eq!(http_get("127.0.0.1", pb, "/").as_deref(), Some("two"));
    // the program saw success and the port it got (getsockname after our bind)
    assert_eq!(rows(w.output_of("two").as_bytes())[0], Row::of("bind", 0, 0, pb));
    // the same stderr line and event as the library, with the server's own pid and name
    let server_pid = descendants(b)[0];
    let line = format!("styxy-preload: port 8000 is taken; binder-static (pid {server_pid}) got {pb}");
    assert!(w.stderr_of("two").lines().any(|l| l == line), "{}", w.stderr_of("two"));
    let ev = w.events().into_iter().find(|e| e.session.as_deref() == Some("two") && e.call == "bind").expect("an event");
    assert_eq!(
        (ev.action, ev.pid, ev.comm.as_str(), ev.requested_port, ev.port),
        (Action::Remapped, server_pid, "binder-static", 8000, pb)
    );
    // registered: the allocation is the server's
    let (_, list) = w.json("GET", "/allocations", None);
    let alloc = list["allocations"].as_array().unwrap().iter().find(|x| x["port"] == pb).cloned().unwrap_or_default();
    assert!(alloc["pids"].as_array().is_some_and(|p| p.contains(&server_pid.into())), "{list}");
}

#[test]
fn a_static_server_restarted_in_its_session_serves_on_the_sessions_port_and_the_daemon_logs_each_start() {
    let mut w = World::new();
    let (_, (b, pb)) = two_on_8000(&mut w, "one", "two");
    let server = static_fixture("binder");
    assert_ne!(pb, 8000, "{}", w.stderr_of("two"));
    let first = descendants(b)[0];
    w.kill(b);
    // restarted at once: the session's port (from the port map while the grant stands, else
    // granted again: the session asked for 8000 before)
    let c = exec(&mut w, "two", &[], &server, &["serve", "8000"], "two-again");
    let pc = wait_for(20, "the restarted server", || tree_ports(c).into_iter().next());
    assert_eq!(pc, pb, "{}", w.stderr_of("two-again"));
    assert_eq!(http_get("127.0.0.1", pc, "/").as_deref(), Some("two-again"));
    let second = descendants(c)[0];
    // the daemon wrote both starts, each with its own server's pid and name
    let starts: Vec<_> = w
        .events()
        .into_iter()
        .filter(|e| e.session.as_deref() == Some("two") && e.call == "bind")
        .map(|e| (e.pid, e.comm, e.action, e.requested_port, e.port))
        .collect();
    let start = |pid| (pid, "binder-static".to_string(), Action::Remapped, 8000, pb);
    assert_eq!(starts, [start(first), start(second)]);
    // the allocation is the restarted server's
    let (_, list) = w.json("GET", "/allocations", None);
    let alloc = list["allocations"].as_array().unwrap().iter().find(|x| x["port"] == pb).cloned().unwrap_or_default();
    assert!(alloc["pids"].as_array().is_some_and(|p| p.contains(&second.into())), "{list}");
}

#[test]
fn two_go_servers_asking_for_8080_both_serve_and_each_reaches_its_own() {
    let mut w = World::new();
    let server = go_fixture("goserver");
    let mut ports = BTreeSet::new();
    for name in ["gopher-a", "gopher-b"] {
        let pid = exec(&mut w, name, &[], &server, &["8080", name], name);
        let port = wait_for(30, name, || tree_ports(pid).into_iter().next());
        ports.insert(port);
        // inside its session, a connect to 8080 reaches its own server, wherever it went
        let out = wait_for(10, "its request to itself", || w.output_of(name).lines().find(|l| l.starts_with("self")).map(str::to_string));
        assert_eq!(out, format!("self {name}"), "{}", w.stderr_of(name));
        assert_eq!(w.output_of(name).lines().next(), Some(format!("listening {port}").as_str()));
        assert_eq!(http_get("127.0.0.1", port, "/").as_deref(), Some(name));
    }
    assert_eq!(ports.len(), 2, "{ports:?}");
    assert!(ports.contains(&8080), "{ports:?}");
    assert!(w.stderr_of("gopher-b").contains("port 8080 is taken; goserver (pid"), "{}", w.stderr_of("gopher-b"));
}

#[test]
fn a_blocking_connect_follows_the_remap_and_another_sessions_server_is_refused() {
    let mut w = World::new();
    let (_, (_, pb)) = two_on_8000(&mut w, "owner", "mine");
    let server = static_fixture("binder");
    assert_ne!(pb, 8000);
    let get = |w: &World, session: &str| {
        let mut c = w.cli();
        c.args(["exec", "--quiet", "--session", session, "--"]).arg(&server).args(["get", "8000"]);
        text(&run(c).stdout).trim().to_string()
    };
    assert_eq!(get(&w, "mine"), "body mine", "a blocking connect to 8000 in my session reaches my server");
    assert_eq!(get(&w, "owner"), "body owner");
    // another session's server is not reachable: as if nothing listened, said once, logged
    // by the daemon with the client's own pid
    let mut c = w.cli();
    c.args(["exec", "--session", "third", "--"]).arg(&server).args(["get", "8000"]);
    let out = run(c);
    assert_eq!(text(&out.stdout).trim(), format!("connect-error {}", libc::ECONNREFUSED));
    let said: Vec<_> = text(&out.stderr).lines().filter(|l| l.contains("connect to port 8000 refused")).map(str::to_string).collect();
    assert_eq!(said.len(), 1, "{}", text(&out.stderr));
    assert!(said[0].contains("session owner's server") && said[0].contains("session third has no server on 8000"), "{}", said[0]);
    let isolated: Vec<_> = w.events().into_iter().filter(|e| e.action == Action::Isolated).collect();
    assert_eq!(isolated.len(), 1, "{isolated:?}");
    let e = &isolated[0];
    assert_eq!((e.session.as_deref(), e.call.as_str(), e.port, e.comm.as_str()), (Some("third"), "connect", 8000, "binder-static"));
    assert!(e.reason.as_deref().is_some_and(|r| r.contains("session owner's server")), "{e:?}");
}

#[test]
fn every_other_bind_returns_exactly_what_the_kernel_returns() {
    let mut w = World::new();
    let server = static_fixture("binder");
    let holder = exec(&mut w, "other", &[], &server, &["serve", "4010"], "holder");
    assert_eq!(wait_for(20, "holder", || tree_ports(holder).into_iter().next()), 4010);
    let sock = |n: &str| w.path(n).to_string_lossy().into_owned();
    let mut plain = w.cmd(&server);
    plain.args(["battery", "4020", &sock("plain.sock")]);
    let plain = rows(&run(plain).stdout);
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", "mine", "--"]).arg(&server).args(["battery", "4010", &sock("ours.sock")]);
    let out = run(c);
    assert_battery(&plain, &rows(&out.stdout), 4010, &text(&out.stderr));
}

#[test]
fn a_dynamic_program_with_the_library_and_the_filter_is_remapped_once() {
    let mut w = World::new();
    let a = exec(&mut w, "first", &[], &fixture("binder"), &["serve", "8000"], "first");
    assert_eq!(wait_for(20, "first server", || tree_ports(a).into_iter().next()), 8000);
    // exec hands the library down too; under the filter it steps aside
    let b = exec(&mut w, "both", &["--seccomp"], &fixture("binder"), &["serve", "8000"], "both");
    let pb = wait_for(20, "second server", || tree_ports(b).into_iter().next());
    assert_ne!(pb, 8000);
    let server = descendants(b)[0];
    let maps = std::fs::read_to_string(format!("/proc/{server}/maps")).unwrap();
    assert!(maps.contains("libstyxy_preload.so"), "the library is loaded in the supervised program");
    let binds: Vec<_> = w.events().into_iter().filter(|e| e.pid == server && e.call == "bind").collect();
    assert_eq!(binds.len(), 1, "{binds:?}");
    assert_eq!((binds[0].action, binds[0].port), (Action::Remapped, pb));
}

#[test]
fn the_whole_tree_is_supervised_and_exec_stays_until_its_last_process_has_gone() {
    let mut w = World::new();
    let server = static_fixture("binder");
    let a = exec(&mut w, "first", &[], &server, &["serve", "8000"], "first");
    assert_eq!(wait_for(20, "first server", || tree_ports(a).into_iter().next()), 8000);
    // a shell that starts the server in the background and exits at once: the server is
    // an orphan, reparented to exec
    let script = format!("{} serve 8000 > {} &", server.display(), w.path("orphan.out").display());
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--seccomp", "--session", "tree", "--", "sh", "-c", &script]);
    let e = w.spawn(c, "tree");
    let port = wait_for(20, "the orphan's server", || tree_ports(e).into_iter().next());
    assert_ne!(port, 8000);
    let orphan = wait_for(10, "the shell to exit", || {
        let d = descendants(e);
        (d.len() == 1 && comm(d[0]) == "binder-static").then(|| d[0])
    });
    let bound = std::fs::read_to_string(w.path("orphan.out")).unwrap_or_default();
    assert_eq!(bound.lines().next(), Some(format!("bind 0 0 {port}").as_str()), "the orphan's bind was remapped");
    assert!(!w.finished(e), "exec answers the orphan's calls: it stays");
    // a SIGTERM to exec goes to what is left of the tree; exec ends after it, with the shell's status
    // SAFETY: kill(2) of the exec this test started.
    unsafe { libc::kill(e as i32, libc::SIGTERM) };
    let status = wait_for(10, "exec to end after the tree", || w.exit_status(e));
    assert_eq!(status.code(), Some(0), "the shell's status: {}", w.stderr_of("tree"));
    assert!(!std::path::Path::new(&format!("/proc/{orphan}")).exists(), "the orphan got the signal and was reaped");
}

#[test]
fn where_seccomp_is_refused_exec_says_so_in_one_line_and_runs_the_program() {
    let mut w = World::new();
    let server = static_fixture("binder");
    for (call, errno, reason) in [
        ("seccomp", "EPERM", "seccomp is not permitted here"),
        ("seccomp", "ENOSYS", "this kernel has no seccomp"),
        ("pidfd_getfd", "ENOSYS", "the kernel has no pidfd_getfd (Linux 5.6+)"),
        ("pidfd_getfd", "EPERM", "pidfd_getfd is refused: Operation not permitted (os error 1)"),
    ] {
        let name = format!("{call}-{errno}");
        let mut c = w.cmd(fixture("deny"));
        c.args([call, errno]).arg(bin()).args(["exec", "--quiet", "--session", &name, "--"]).arg(&server).args(["serve", "8000"]);
        let pid = w.spawn(c, &name);
        assert_eq!(wait_for(20, "the server", || tree_ports(pid).into_iter().next()), 8000);
        let line =
            format!("styxy-preload: seccomp mode is off ({reason}); {} runs without it: its ports are not coordinated", server.display());
        assert_eq!(w.stderr_of(&name).trim_end(), line);
        w.kill(pid);
    }
    // inside a tree an outer exec supervises: the inner one says so, and the outer one coordinates
    let a = exec(&mut w, "first", &[], &server, &["serve", "8000"], "first");
    assert_eq!(wait_for(20, "first server", || tree_ports(a).into_iter().next()), 8000);
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--seccomp", "--session", "outer", "--"])
        .arg(bin())
        .args(["exec", "--quiet", "--seccomp", "--session", "inner", "--"])
        .arg(&server)
        .args(["serve", "8000"]);
    let nested = w.spawn(c, "nested");
    assert_ne!(wait_for(20, "the nested server", || tree_ports(nested).into_iter().next()), 8000);
    assert!(
        w.stderr_of("nested").contains("seccomp mode is off (an outer seccomp supervisor already answers this tree)"),
        "{}",
        w.stderr_of("nested")
    );
    assert!(w.events().iter().any(|e| e.session.as_deref() == Some("outer") && e.action == Action::Remapped));
}

#[test]
fn no_seccomp_leaves_a_static_program_alone_and_says_why() {
    let mut w = World::new();
    let server = static_fixture("binder");
    let seccomp_of = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status.lines().find_map(|l| l.strip_prefix("Seccomp:")).unwrap().trim().to_string()
    };
    let off = exec(&mut w, "off", &["--no-seccomp"], &server, &["serve", "4030"], "off");
    assert_eq!(wait_for(20, "the server", || tree_ports(off).into_iter().next()), 4030);
    assert_eq!(seccomp_of(descendants(off)[0]), "0", "no filter");
    assert!(w.stderr_of("off").contains("is statically linked: LD_PRELOAD does not reach it"), "{}", w.stderr_of("off"));
    // and without the flag, the same program gets the filter
    let on = exec(&mut w, "on", &[], &server, &["serve", "4031"], "on");
    assert_eq!(wait_for(20, "the server", || tree_ports(on).into_iter().next()), 4031);
    assert_eq!(seccomp_of(descendants(on)[0]), "2", "filtered");
    assert_eq!(w.stderr_of("on"), "", "nothing to say when nothing changed");
}

#[test]
fn threads_binding_at_once_and_a_fork_from_a_thread_are_all_answered() {
    let mut w = World::new();
    let server = static_fixture("binder");
    for p in [4040, 4045, 4050] {
        let pid = exec(&mut w, "other", &[], &server, &["serve", &p.to_string()], &format!("holder{p}"));
        assert_eq!(wait_for(20, "holder", || tree_ports(pid).into_iter().next()), p);
    }
    // binds from threads other than the main one: the supervisor finds their process
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", "threads", "--"]).arg(&server).args(["threads", "4040", "16", "4150"]);
    let out = run(c);
    let got: BTreeSet<i64> = thread_results(&out.stdout).into_iter().collect();
    assert_eq!(got.len(), 16, "every bind succeeds, no duplicates: {}{}", text(&out.stdout), text(&out.stderr));
    assert!(got.iter().all(|p| *p > 0 && ![4040, 4045, 4050].contains(p)), "{got:?}");
    assert_eq!(row(&rows(&out.stdout), "forked-child-exit").rc, Some(0), "{}", text(&out.stdout));
    let threads = w.events().into_iter().filter(|e| e.session.as_deref() == Some("threads") && e.call == "bind").count();
    assert!(threads >= 16, "the supervisor answered the threads' binds: {threads} events");
}

#[test]
fn a_daemon_started_inside_the_supervised_tree_is_not_waited_on_by_its_own_test_binds() {
    let mut w = World::new();
    // 8000 is held by a program nobody coordinates: the daemon finds it with a test bind
    let mut plain = w.cmd(fixture("binder"));
    plain.args(["serve", "8000"]);
    let plain = w.spawn(plain, "plain");
    assert_eq!(wait_for(10, "the plain server", || listening_ports(plain).into_iter().next()), 8000);
    // no coordinator when exec starts: the tree starts the daemon, under the filter
    let script = format!("\"{}\" daemon start && exec \"{}\" serve 8000", bin().display(), static_fixture("binder").display());
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--seccomp", "--no-start-daemon", "--session", "inside", "--", "sh", "-c", &script]);
    let e = w.spawn(c, "inside");
    let port = wait_for(20, "the server", || tree_ports(e).into_iter().find(|p| *p != 8000));
    let ev = w.events().into_iter().find(|x| x.session.as_deref() == Some("inside") && x.call == "bind").expect("an event");
    assert_eq!((ev.action, ev.port), (Action::Remapped, port), "{ev:?} {}", w.stderr_of("inside"));
    // the daemon is now exec's (its subreaper's) child, but exec does not wait for it:
    // the server ends, exec ends, the daemon serves on
    let daemon = w.daemon_pid().expect("the daemon's pid file");
    assert!(descendants(e).contains(&(daemon as u32)), "the daemon started inside the tree");
    let server = ev.pid;
    // SAFETY: kill(2) of the server this test started.
    unsafe { libc::kill(server as i32, libc::SIGTERM) };
    let status = wait_for(10, "exec to end, the daemon still running", || w.exit_status(e));
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "the server's status: {}", w.stderr_of("inside"));
    assert_eq!(w.json("GET", "/status", None).0, 200, "the daemon still answers");
}
