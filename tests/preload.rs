//! The preload library in real processes (python3, node, a C fixture) under the real
//! built-in daemon, checked with the kernel's view of the ports.

mod common;

use std::collections::BTreeSet;
use std::os::unix::ffi::OsStrExt;

use common::*;
use styxy_preload_common::eventlog::Action;

/// Starts the C fixture serving `port` in `session` (WHO=name) and waits until it listens; returns (pid, actual port).
fn serve(w: &mut World, session: Option<&str>, port: u16, name: &str) -> (u32, u16) {
    serve_as(w, session, "serve", port, name)
}

/// [`serve`] with the fixture's command `how` (`serve`, `serve-thread`).
fn serve_as(w: &mut World, session: Option<&str>, how: &str, port: u16, name: &str) -> (u32, u16) {
    let mut c = w.preloaded(session, fixture("binder"));
    c.args([how, &port.to_string()]).env("WHO", name);
    let pid = w.spawn(c, name);
    let p = wait_for(10, &format!("{name} listening"), || listening_ports(pid).into_iter().next());
    (pid, p)
}

#[test]
fn a_bind_on_a_thread_of_its_own_name_is_the_process_s() {
    let mut w = World::new();
    w.start_daemon();
    let (pid, port) = serve_as(&mut w, Some("threads"), "serve-thread", 4032, "named");
    assert_eq!(port, 4032);
    // the name the daemon records is the process's, not the binding thread's
    let e = wait_for(10, "the kept event", || w.events().into_iter().find(|e| e.pid == pid));
    assert_eq!((e.action, e.comm.as_str()), (Action::Kept, "binder"));
    let (_, all) = w.json("GET", "/allocations", None);
    let a = all["allocations"].as_array().unwrap().iter().find(|a| a["port"] == 4032).cloned().unwrap();
    assert_eq!((a["comm"].as_str(), a["service_name"].as_str()), (Some("binder"), Some("binder-4032")));
}

#[test]
fn five_python_servers_asking_for_8000_all_serve_on_distinct_ports() {
    let mut w = World::new();
    w.start_daemon();
    let mut pids = Vec::new();
    for i in 0..5 {
        let dir = w.path(&format!("srv{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("who"), format!("srv{i}")).unwrap();
        let mut c = w.preloaded(Some(&format!("py{i}")), "python3");
        c.args(["-m", "http.server", "8000"]).current_dir(&dir);
        pids.push(w.spawn(c, &format!("py{i}")));
    }
    let mut ports = BTreeSet::new();
    for (i, pid) in pids.iter().enumerate() {
        let port = wait_for(20, "python server listening", || tree_ports(*pid).into_iter().next());
        assert_eq!(http_get("127.0.0.1", port, "/who").as_deref(), Some(&*format!("srv{i}")), "server {i} on {port}");
        ports.insert(port);
    }
    assert_eq!(ports.len(), 5, "{ports:?}");
    assert!(ports.contains(&8000), "{ports:?}");
    assert!(ports.iter().all(|p| (8000..=8099).contains(p)), "{ports:?}");
    let ev = w.events();
    let remapped = ev.iter().filter(|e| e.action == Action::Remapped && e.requested_port == 8000).count();
    let kept = ev.iter().filter(|e| e.action == Action::Kept && e.requested_port == 8000).count();
    assert_eq!((remapped, kept), (4, 1), "{ev:#?}");
    // their stderr is a file they did not get from `exec`: the notice never goes there
    let who = w.stderr_of("py1") + &w.stderr_of("py2") + &w.stderr_of("py3") + &w.stderr_of("py4") + &w.stderr_of("py0");
    assert_eq!(who.matches("styxy-preload:").count(), 0, "{who}");
}

#[test]
fn node_dual_stack_next_to_python_on_ipv4_serves_one_port_for_both_families() {
    let mut w = World::new();
    w.start_daemon();
    let mut py = w.preloaded(Some("py"), "python3");
    py.args(["-m", "http.server", "3000", "--bind", "127.0.0.1"]).current_dir(w.path("home"));
    let py = w.spawn(py, "py");
    let py_port = wait_for(10, "python listening", || tree_ports(py).into_iter().next());
    assert_eq!(py_port, 3000);
    let mut node = w.preloaded(Some("node"), "node");
    node.args(["-e", "require('http').createServer((q,r)=>r.end('node')).listen(3000)"]);
    let node = w.spawn(node, "node");
    let ports = wait_for(10, "node listening", || Some(tree_ports(node)).filter(|p| !p.is_empty()));
    assert_eq!(ports.len(), 1, "node listens once, dual stack: {ports:?}");
    let p = *ports.iter().next().unwrap();
    assert_ne!(p, 3000);
    assert_eq!(http_get("127.0.0.1", p, "/").as_deref(), Some("node"));
    assert_eq!(http_get("::1", p, "/").as_deref(), Some("node"));
    assert!(http_get("127.0.0.1", 3000, "/").is_some(), "python still answers on 3000");
}

#[test]
fn only_interesting_binds_change_and_the_rest_return_exactly_what_libc_returns() {
    let mut w = World::new();
    w.start_daemon();
    let (_, held) = serve(&mut w, Some("other"), 4010, "holder");
    assert_eq!(held, 4010);
    let sock = |n: &str| w.path(n).to_string_lossy().into_owned();
    // without the library, on a free port of the same type
    let mut plain = w.cmd(fixture("binder"));
    plain.args(["battery", "4020", &sock("plain.sock")]);
    let plain = rows(&run(plain).stdout);
    // with it, on the port the other session holds
    let mut ours = w.preloaded(Some("mine"), fixture("binder"));
    ours.args(["battery", "4010", &sock("ours.sock")]);
    let out = run(ours);
    assert_battery(&plain, &rows(&out.stdout), 4010, &text(&out.stderr));
}

#[test]
fn thirty_two_threads_bind_at_once_and_a_fork_from_a_thread_still_binds() {
    let mut w = World::new();
    w.start_daemon();
    for p in [4040, 4045, 4050] {
        serve(&mut w, Some("other"), p, &format!("holder{p}"));
    }
    let mut c = w.preloaded(Some("threads"), fixture("binder"));
    c.args(["threads", "4040", "32", "4150"]);
    let t = std::time::Instant::now();
    let out = run(c);
    assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
    let got = thread_results(&out.stdout);
    assert_eq!(got.len(), 32, "{}", text(&out.stdout));
    assert!(got.iter().all(|p| *p > 0), "every bind succeeds: {got:?}");
    let distinct: BTreeSet<i64> = got.iter().copied().collect();
    assert_eq!(distinct.len(), 32, "no duplicates: {got:?}");
    assert!(!distinct.contains(&4040) && !distinct.contains(&4045) && !distinct.contains(&4050));
    assert_eq!(row(&rows(&out.stdout), "forked-child-exit").rc, Some(0), "{}", text(&out.stdout));
}

#[test]
fn without_a_daemon_behaviour_is_plain() {
    let mut w = World::new();
    // no daemon: STYXY_URL names a socket nobody serves
    let mut busy = w.cmd(fixture("binder"));
    busy.args(["serve", "8050"]);
    let busy = w.spawn(busy, "busy");
    wait_for(10, "busy server", || listening_ports(busy).into_iter().next());
    let script = "import socket,time\ns=socket.socket()\nt=time.perf_counter()\ntry:\n  s.bind(('0.0.0.0',8050)); r='bound'\nexcept OSError as e: r='errno %d' % e.errno\nprint(r, round((time.perf_counter()-t)*1000))";
    let mut c = w.preloaded(Some("nodaemon"), "python3");
    c.args(["-c", script]);
    let out = run(c);
    let f: Vec<String> = text(&out.stdout).split_whitespace().map(str::to_string).collect();
    assert_eq!(f[..2], ["errno", "98"], "{f:?}");
    assert!(f[2].parse::<u64>().unwrap() < 300, "bind took {} ms", f[2]);
    // no daemon ever ran here: no spool to log it in, the person is told
    assert!(w.events().is_empty());
    let err = text(&out.stderr);
    assert_eq!(err.matches("styxy-preload: no coordinator (unix:").count(), 1, "{err}");
}

#[test]
fn a_frozen_daemon_costs_a_bind_at_most_the_timeout() {
    let w = World::new();
    w.start_daemon();
    let pid = w.daemon_pid().unwrap();
    // SAFETY: this world's daemon.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let script = "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\nt=time.perf_counter()\ns.bind(('127.0.0.1',8060))\nprint(s.getsockname()[1], round((time.perf_counter()-t)*1000))";
    let mut c = w.preloaded(Some("frozen"), "python3");
    c.args(["-c", script]);
    let out = run(c);
    // SAFETY: kill(2) of this world's daemon, stopped above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let s = text(&out.stdout);
    let f: Vec<&str> = s.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"8060"), "{s} {}", text(&out.stderr));
    assert!(f[1].parse::<u64>().unwrap() <= 1000, "a bind took {} ms with the daemon frozen", f[1]);
    // spooled while the daemon was frozen, and logged once it runs again
    wait_for(10, "the timeout's event", || w.events().into_iter().find(|e| e.reason.as_deref() == Some("coordinator timeout")));
}

#[test]
fn a_unix_socket_at_fd_2_gets_the_notice_without_a_wait() {
    let mut w = World::new();
    w.start_daemon();
    serve(&mut w, Some("other"), 4060, "holder");
    let mut c = w.preloaded(Some("mine"), fixture("binder"));
    c.args(["stderr-socket", "4060"]);
    let out = text(&run(c).stdout);
    // Node's child_process hands children a socketpair as stderr: a person reads it
    let got: usize = out.split("bytes-in-socket ").nth(1).and_then(|n| n.trim().parse().ok()).unwrap_or(0);
    assert!(got > 0, "{out}");
    assert!(out.lines().next().unwrap().starts_with("bind 0 0 "), "the bind was remapped: {out}");
    wait_for(10, "the remap event", || w.events().into_iter().find(|e| e.action == Action::Remapped && e.requested_port == 4060));
}

#[test]
fn errno_is_untouched_stdio_may_be_closed_and_close_range_is_survived() {
    let mut w = World::new();
    w.start_daemon();
    serve(&mut w, Some("other"), 4070, "h1");
    serve(&mut w, Some("other"), 4071, "h2");
    let mut c = w.preloaded(Some("mine"), fixture("binder"));
    c.args(["errno0", "4070"]);
    let out = text(&run(c).stdout);
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f[..4], ["rc", "0", "errno", "0"], "{out}");
    assert_ne!(f[5], "4070");
    // again in another process: the session's port from the port map, errno as well
    let mut c = w.preloaded(Some("mine"), fixture("binder"));
    c.args(["errno0", "4070"]);
    let again = text(&run(c).stdout);
    assert_eq!(again.split_whitespace().collect::<Vec<_>>(), f, "{again}");
    // close_range(3, ~0) between two binds: a fresh connection per request
    let mut c = w.preloaded(Some("mine"), fixture("binder"));
    c.args(["closerange", "4071", "4072"]);
    let rows = rows(&run(c).stdout);
    let (first, second) = (row(&rows, "first"), row(&rows, "second"));
    assert_eq!(first.rc, Some(0), "{rows:?}");
    assert_ne!(first.port, Some(4071));
    assert_eq!((second.rc, second.port), (Some(0), Some(4072)), "{rows:?}");
    // started with fds 0-2 closed: our sockets never sit on them
    let mut c = w.preloaded(Some("mine"), "sh");
    c.args(["-c", &format!("exec 0<&- 1>&- 2>&- {} serve 4070", fixture("binder").display())]).env("WHO", "closed");
    let pid = w.spawn(c, "closed");
    let port = wait_for(10, "server with stdio closed", || listening_ports(pid).into_iter().next());
    assert_ne!(port, 4070);
    assert_eq!(http_get("127.0.0.1", port, "/").as_deref(), Some("closed"));
}

/// Whether something of ours besides the shim is mapped into `pid`.
fn core_loaded(pid: u32) -> bool {
    !ours_beside_the_shim(pid).is_empty()
}

#[test]
fn a_coordinated_bind_kept_or_moved_is_one_round_trip_without_loading_the_core() {
    let mut w = World::new();
    w.start_daemon();
    let (pid, port) = serve(&mut w, Some("fast"), 4031, "kept");
    assert_eq!(port, 4031);
    assert!(!core_loaded(pid), "the shim asked the daemon itself");
    // the daemon writes the event once the shim reported its bind
    let kept = wait_for(10, "the kept event", || {
        let mine: Vec<_> = w.events().into_iter().filter(|e| e.pid == pid).collect();
        (!mine.is_empty()).then_some(mine)
    });
    assert_eq!(kept.len(), 1, "{kept:#?}");
    let e = &kept[0];
    assert_eq!(
        (e.action, e.port, e.requested_port, e.session.as_deref(), e.comm.as_str()),
        (Action::Kept, 4031, 4031, Some("fast"), "binder")
    );
    // the daemon knows who holds it, as if the hooks' logic had asked
    let (_, all) = w.json("GET", "/allocations", None);
    let a = all["allocations"].as_array().unwrap().iter().find(|a| a["port"] == 4031).cloned().unwrap();
    assert_eq!(
        (a["comm"].as_str(), a["service_name"].as_str(), a["instance_id"].as_str()),
        (Some("binder"), Some("binder-4031"), Some("fast"))
    );
    assert_eq!(a["project_path"].as_str(), std::env::current_dir().unwrap().to_str());
    // another session asking for it is moved in the same one round trip: the daemon
    // grants another port, the shim binds it, and the daemon logs the remap
    let (other, moved) = serve(&mut w, Some("slow"), 4031, "moved");
    assert_ne!(moved, 4031);
    assert!(!core_loaded(other), "a remap needs no library load");
    let remap = wait_for(10, "the remap event", || w.events().into_iter().find(|e| e.pid == other));
    assert_eq!(
        (remap.action, remap.port, remap.requested_port, remap.session.as_deref(), remap.comm.as_str()),
        (Action::Remapped, moved, 4031, Some("slow"), "binder")
    );
    let why = remap.reason.unwrap_or_default();
    assert!(why.starts_with("port 4031 is taken by binder (pid ") && why.ends_with(", session fast)"), "{why}");
    let (_, all) = w.json("GET", "/allocations", None);
    let a = all["allocations"].as_array().unwrap().iter().find(|a| a["port"] == moved).cloned().unwrap();
    assert_eq!((a["instance_id"].as_str(), a["requested_port"].as_u64()), (Some("slow"), Some(4031)), "{a:#}");
}

/// The lock id of the allocation at `port`, and its owners' pids.
fn allocation_at(w: &World, port: u16) -> Option<(String, Vec<u64>)> {
    let (_, all) = w.json("GET", "/allocations", None);
    let a = all["allocations"].as_array()?.iter().find(|a| a["port"] == port)?.clone();
    let pids = a["pids"].as_array().map(|p| p.iter().filter_map(|p| p.as_u64()).collect()).unwrap_or_default();
    Some((a["lockId"].as_str()?.to_string(), pids))
}

/// Session stickiness: a server of the session started again (a reloader's) binds the
/// session's port for the one it asks with no question on `hook.sock` — the port map says
/// so — and the daemon, told in its mailbox, makes it an owner and logs the bind, a remap
/// as the first one was.
#[test]
fn a_restarted_server_gets_its_session_s_port_with_no_question() {
    let mut w = World::new();
    w.start_daemon();
    serve(&mut w, Some("a"), 4051, "holder");
    for attempt in 0..5 {
        // a session of its own each attempt: its first bind asks
        let session = format!("b{attempt}");
        let (first, moved) = serve(&mut w, Some(&session), 4051, "first");
        assert_ne!(moved, 4051);
        let _ = w.call("POST", "/flush", None);
        let Some((lock, _)) = allocation_at(&w, moved) else { continue }; // swept already
        let (asks, mailed) = (w.metric("styxy_hook_asks_total"), w.metric("styxy_hook_notes_total{via=\"mailbox\"}"));
        w.kill(first);
        let (second, again) = serve(&mut w, Some(&session), 4051, "second");
        let e = wait_for(10, "the second bind's event", || w.events().into_iter().find(|e| e.pid == second));
        let (lock_now, owners) = allocation_at(&w, moved).unwrap_or_default();
        if lock_now != lock {
            // a sweep freed the first one's grant before the second bound: it asked again
            w.kill(second);
            continue;
        }
        assert_eq!(again, moved);
        assert_eq!(w.metric("styxy_hook_asks_total"), asks, "the second bind asked on hook.sock");
        assert_eq!(w.metric("styxy_hook_notes_total{via=\"mailbox\"}"), mailed + 1);
        assert_eq!(
            (e.action, e.port, e.requested_port, e.session.as_deref(), e.comm.as_str()),
            (Action::Remapped, moved, 4051, Some(session.as_str()), "binder")
        );
        let why = e.reason.unwrap_or_default();
        assert!(why.starts_with("port 4051 is taken by binder (pid ") && why.ends_with(", session a)"), "{why}");
        assert!(owners.contains(&u64::from(second)), "{owners:?}");
        return;
    }
    panic!("a sweep came between the two binds five times");
}

/// A fresh process reads what the daemon says of a port's block in one `readlink` of the
/// block's link: a bind its class, a session's connect whether anyone holds or asked for
/// a port there (none: as asked, no look at the port map). With the links gone, it reads
/// the maps' files.
#[test]
fn a_fresh_process_reads_its_ports_block_in_one_link_else_in_the_maps() {
    use styxy_preload_common::{blocklink, policymap};
    let mut w = World::new();
    w.start_daemon();
    let bind_once = |w: &mut World| {
        let mut c = w.preloaded(Some("links"), fixture("binder"));
        c.args(["errno0", "12050"]);
        let out = run(c);
        let _ = w.call("POST", "/flush", None);
        text(&out.stdout)
    };
    let asks = |w: &World| w.metric("styxy_hook_asks_total");
    let links = w.path("run/styxy-preload/blocks");
    let set_link = |port: u16, classes: &[u8; blocklink::PORTS_PER_LINK as usize], used: bool| {
        let link = links.join(blocklink::link_of(port).to_string());
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&blocklink::encode(classes, used)), &link).unwrap();
    };
    // outside every range: bound as asked, asked of nobody
    let before = asks(&w);
    assert_eq!(bind_once(&mut w).trim(), "rc 0 errno 0 port 12050");
    assert_eq!(asks(&w), before, "an on-conflict port was asked about");
    // its link made to say it is coordinated: the next fresh process asks
    let mut classes = [policymap::ON_CONFLICT; blocklink::PORTS_PER_LINK as usize];
    classes[usize::from(12050 % blocklink::PORTS_PER_LINK)] = policymap::COORDINATED;
    set_link(12050, &classes, false);
    assert_eq!(bind_once(&mut w).trim(), "rc 0 errno 0 port 12050");
    assert_eq!(asks(&w), before + 1, "the link was not read");
    // a session's server remapped: its block's link says it is used, and the session's
    // connect to the port it asked for follows the remap
    serve(&mut w, Some("other"), 4060, "holder");
    let (_, moved) = serve(&mut w, Some("links"), 4060, "moved");
    assert_ne!(moved, 4060);
    let connect = |w: &World| {
        let mut c = w.preloaded(Some("links"), fixture("binder"));
        c.args(["get", "4060"]);
        text(&run(c).stdout)
    };
    assert_eq!(connect(&w).trim(), "body moved", "the session's connect did not follow its remap");
    let target = std::fs::read_link(links.join(blocklink::link_of(4060).to_string())).unwrap();
    assert!(!blocklink::vacant(target.as_os_str().as_bytes()), "{target:?}");
    // the link made to say the block is vacant: the connect goes as asked (to the holder)
    let said = blocklink::class(target.as_os_str().as_bytes(), 4060).unwrap();
    set_link(4060, &[said; blocklink::PORTS_PER_LINK as usize], false);
    assert_eq!(connect(&w).trim(), "body holder", "the link was not read");
    // the links gone: the maps' files say on-conflict, and where the remap goes
    std::fs::remove_dir_all(&links).unwrap();
    let before = asks(&w);
    assert_eq!(bind_once(&mut w).trim(), "rc 0 errno 0 port 12050");
    assert_eq!(asks(&w), before, "the map's file was not read");
    assert_eq!(connect(&w).trim(), "body moved", "the port map's file was not read");
}

/// Another preload library beside ours sees each socket call as it would without ours in
/// between: loaded after ours, as ours makes it (the session's remapped port); loaded
/// before, as the program makes it. With libc right after ours (a C program), a fresh
/// process looks none of them up in libc: the shim makes the system calls itself (and
/// calls libc's `connect` by its other name); with the other library after ours, it asks
/// the loader, which finds the other's.
#[test]
fn another_preload_library_sees_the_calls_as_ours_makes_them_and_alone_ours_looks_nothing_up() {
    let mut w = World::new();
    w.start_daemon();
    serve(&mut w, Some("other"), 4070, "holder");
    let (ours, other) = (lib().display().to_string(), shared_fixture("after").display().to_string());
    let py = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 4070)); s.listen(); \
              c = socket.socket(); c.connect(('127.0.0.1', 4070)); print(s.getsockname()[1], c.getpeername()[1])";
    let python = |preload: String| {
        let mut c = w.preloaded(Some("mine"), "python3");
        c.args(["-c", py]).env("LD_PRELOAD", preload);
        let out = run(c);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        let ports: Vec<u16> = stdout.split_whitespace().filter_map(|p| p.parse().ok()).collect();
        assert!(
            ports.len() == 2 && ports[0] != 4070 && ports[0] == ports[1],
            "not remapped, or the connect did not follow: {stdout} {stderr}"
        );
        (ports[0], stderr)
    };
    let (moved, seen) = python(format!("{ours}:{other}"));
    for call in [format!("bind {moved}"), "listen".into(), format!("getsockname {moved}"), format!("connect {moved}")] {
        assert!(seen.contains(&format!("other: {call}")), "after ours, {call} not seen: {seen}");
    }
    let (_, seen) = python(format!("{other}:{ours}"));
    assert!(seen.contains("other: bind 4070") && seen.contains("other: connect 4070"), "before ours, the program's calls not seen: {seen}");
    // the C fixture (libc right after ours) binds and connects, the loader logging each
    // lookup of the four names: (file, name) pairs
    let lookups = |preload: String| {
        let mut c = w.preloaded(Some("mine"), "sh");
        let binder = fixture("binder").display().to_string();
        c.args(["-c", &format!("\"{binder}\" errno0 4070 && \"{binder}\" get 4070")]).env("LD_PRELOAD", preload).env("LD_DEBUG", "symbols");
        let out = run(c);
        assert!(text(&out.stdout).starts_with("rc 0 errno 0 port "), "{}", text(&out.stdout));
        let log = text(&out.stderr);
        let mut found = BTreeSet::new();
        for line in log.lines() {
            let (Some(name), Some(file)) = (line.split("symbol=").nth(1), line.split("lookup in file=").nth(1)) else {
                continue;
            };
            let name = name.split(';').next().unwrap_or_default();
            if ["bind", "listen", "getsockname", "connect"].contains(&name) {
                found.insert((file.split_whitespace().next().unwrap_or_default().to_owned(), name.to_owned()));
            }
        }
        found
    };
    let alone = lookups(ours.clone());
    // the program's own references find ours (the log is read), and nothing looks in libc
    assert!(alone.contains(&(ours.clone(), "bind".to_owned())), "{alone:?}");
    assert!(!alone.iter().any(|(file, _)| file.contains("libc.so")), "{alone:?}");
    // another library after ours: the shim asks the loader, which looks there
    let beside = lookups(format!("{ours}:{other}"));
    assert!(beside.contains(&(other.clone(), "bind".to_owned())) && beside.contains(&(other, "connect".to_owned())), "{beside:?}");
}

/// A preload library after ours that is called `libc.so.6` but is not libc (it defines
/// `bind` and passes it on) still gets the program's calls: the shim takes libc as next
/// only where the loader found libc's own functions.
#[test]
fn a_preload_library_named_like_libc_after_ours_still_gets_the_calls() {
    let w = World::new();
    w.start_daemon();
    let dir = w.path("fake");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(shared_fixture("after"), dir.join("libc.so.6")).unwrap();
    let mut c = w.preloaded(Some("named"), fixture("binder"));
    c.args(["errno0", "4072"]).env("LD_PRELOAD", format!("{}:{}", lib().display(), dir.join("libc.so.6").display()));
    let out = run(c);
    assert!(text(&out.stdout).starts_with("rc 0 errno 0 port "), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("other: bind 4072"), "{}", text(&out.stderr));
}

/// Under an audit module (`LD_AUDIT`), which sees — and may change — what the loader finds
/// for a library, the shim asks the loader for libc's `bind` instead of making the system
/// call itself: the module sees the program's binding and the shim's.
#[test]
fn an_audit_module_sees_the_shim_find_libc_s_bind() {
    let w = World::new();
    w.start_daemon();
    let mut c = w.preloaded(Some("audited"), fixture("binder"));
    c.args(["errno0", "4071"]).env("LD_AUDIT", shared_fixture("audit"));
    let out = run(c);
    assert!(text(&out.stdout).starts_with("rc 0 errno 0 port "), "{}", text(&out.stdout));
    let seen = text(&out.stderr);
    assert_eq!(seen.matches("audit: bind").count(), 2, "{seen}");
}

/// A port outside every range is bound as asked first; found taken (by a server nobody
/// coordinates), the shim asks for another port of its type in the same one round trip.
#[test]
fn an_on_conflict_port_found_taken_moves_in_one_round_trip_without_the_core() {
    let mut w = World::new();
    w.start_daemon();
    let _holder = std::net::TcpListener::bind("0.0.0.0:12001").unwrap();
    let (pid, port) = serve(&mut w, Some("late"), 12001, "moved");
    assert_ne!(port, 12001);
    assert!(!core_loaded(pid), "an EADDRINUSE needs no library load");
    assert_eq!(http_get("127.0.0.1", port, "/").as_deref(), Some("moved"));
    let e = wait_for(10, "the remap event", || w.events().into_iter().find(|e| e.pid == pid));
    assert_eq!((e.action, e.port, e.requested_port), (Action::Remapped, port, 12001));
    assert!(e.reason.as_deref().is_some_and(|r| r.starts_with("port 12001 is taken")), "{e:?}");
    // the session's connects to 12001 follow it
    let (_, all) = w.json("GET", "/allocations", None);
    let a = all["allocations"].as_array().unwrap().iter().find(|a| a["port"] == port).cloned().unwrap();
    assert_eq!((a["instance_id"].as_str(), a["requested_port"].as_u64()), (Some("late"), Some(12001)), "{a:#}");
}

/// Fallback mode (a tool that moves on by itself, as `exec` runs Vite or Jupyter): a port
/// another session holds is the tool's `EADDRINUSE`, the next one it tries is its own,
/// and the session's connects to the first follow it — all on `hook.sock`, without the
/// hooks' logic.
#[test]
fn a_tool_that_moves_on_by_itself_is_told_in_one_round_trip_without_the_core() {
    let mut w = World::new();
    w.start_daemon();
    let (holder, _) = serve(&mut w, Some("first"), 4040, "first");
    let tool = "import os, socket, time\n\
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
for port in range(4040, 4050):\n    \
try: s.bind(('127.0.0.1', port)); break\n    \
except OSError as e: print('taken', port, e.errno, flush=True)\n\
s.listen()\n\
c = socket.create_connection(('127.0.0.1', 4040), 2); c.close()\n\
core = 'core' if any('libstyxy' in l and 'libstyxy_preload.so' not in l for l in open('/proc/self/maps')) else 'shim'\n\
print('serving', s.getsockname()[1], core, flush=True); time.sleep(30)";
    let mut c = w.preloaded(Some("second"), "python3");
    c.env("STYXY_PRELOAD_MODE", "fallback").args(["-c", tool]);
    let pid = w.spawn(c, "tool");
    let out = wait_for(10, "the tool serving", || w.output_of("tool").lines().find(|l| l.starts_with("serving")).map(str::to_string));
    assert_eq!(out, "serving 4041 shim", "{}", w.output_of("tool"));
    assert!(w.output_of("tool").contains("taken 4040 98"), "the tool's own EADDRINUSE: {}", w.output_of("tool"));
    let mine: Vec<_> = wait_for(10, "both events", || {
        let ev: Vec<_> = w.events().into_iter().filter(|e| e.pid == pid).collect();
        (ev.len() >= 2).then_some(ev)
    });
    let said: Vec<_> = mine.iter().map(|e| (e.action, e.requested_port, e.port, e.reason.clone().unwrap_or_default())).collect();
    assert_eq!(said[0], (Action::Observed, 4040, 4040, "port 4040 is taken; left to python3's own fallback".into()), "{said:#?}");
    assert_eq!(said[1], (Action::Kept, 4041, 4041, "python3 moved from 4040 by itself".into()), "{said:#?}");
    // the session's connects to 4040 lead to the tool, the first session's to its own server
    let (_, all) = w.json("GET", "/allocations", None);
    let a = all["allocations"].as_array().unwrap().iter().find(|a| a["port"] == 4041).cloned().unwrap();
    assert_eq!((a["instance_id"].as_str(), a["requested_port"].as_u64()), (Some("second"), Some(4040)), "{a:#}");
    assert!(listening_ports(holder).contains(&4040));
}

#[test]
fn the_shims_own_answers_return_exactly_what_libc_returns() {
    let w = World::new();
    w.start_daemon();
    let sock = |n: &str| w.path(n).to_string_lossy().into_owned();
    let mut plain = w.cmd(fixture("binder"));
    plain.args(["battery", "4021", &sock("plain.sock")]);
    let plain = rows(&run(plain).stdout);
    // a free coordinated port: kept through the shim's socket, twins and all
    let mut ours = w.preloaded(Some("mine"), fixture("binder"));
    ours.args(["battery", "4032", &sock("ours.sock")]);
    let out = run(ours);
    let ours = rows(&out.stdout);
    assert_eq!(plain.len(), ours.len(), "{plain:?}\n{ours:?}");
    for (a, b) in plain.iter().zip(&ours) {
        assert_eq!((&a.case, a.outcome()), (&b.case, b.outcome()), "{plain:?}\n{ours:?}\n{}", text(&out.stderr));
    }
    assert_eq!((row(&ours, "tcp4-any").port, row(&ours, "tcp6-any").port), (Some(4032), Some(4032)));
    // one start, one event: the twin is this process's own port again (a kernel call
    // alone); the forked child's second bind fails as without us, and says why
    let ev: Vec<_> = w.events().into_iter().filter(|e| e.requested_port == 4032 && e.call == "bind").collect();
    let count = |a: Action| ev.iter().filter(|e| e.action == a).count();
    assert_eq!((count(Action::Kept), count(Action::Remapped), count(Action::Error)), (1, 0, 1), "{ev:#?}");
}

#[test]
fn a_rule_giving_a_privileged_port_a_type_coordinates_its_bind() {
    if !root("binding port 80 needs root") {
        return;
    }
    let mut w = World::new();
    w.start_daemon();
    let mut ports = BTreeSet::new();
    for s in ["low-a", "low-b"] {
        let mut c = w.preloaded(Some(s), "python3");
        c.env("STYXY_PRELOAD_PORTS", "80=dev").arg("-c").arg(
            "import socket, time\ns=socket.socket(); s.bind(('127.0.0.1', 80)); s.listen()\nprint(s.getsockname()[1], flush=True); time.sleep(60)",
        );
        let pid = w.spawn(c, s);
        ports.insert(wait_for(10, "the server on 80 or its remap", || listening_ports(pid).into_iter().next()));
    }
    assert_eq!(ports.len(), 2, "both sessions serve, on distinct ports: {ports:?}");
    assert!(ports.iter().all(|p| *p == 80 || (3000..3100).contains(p)), "{ports:?}");
    let starts = w.events().into_iter().filter(|e| e.requested_port == 80 && matches!(e.action, Action::Kept | Action::Remapped)).count();
    assert_eq!(starts, 2, "{:#?}", w.events());
}

#[test]
fn rules_of_a_process_own_coordinate_its_binds_and_its_connects() {
    let mut w = World::new();
    w.start_daemon();
    // 4033 is nobody's type; a rule of the process's own makes it a dev port
    let ruled = |w: &World, session: &str, script: &str| {
        let mut c = w.preloaded(Some(session), "python3");
        c.env("STYXY_PRELOAD_PORTS", "4033=dev").arg("-c").arg(script);
        c
    };
    let server = "import socket, time\ns=socket.socket(); s.bind(('127.0.0.1', 4033)); s.listen()\nprint(s.getsockname()[1], flush=True); time.sleep(30)";
    let port = |w: &World, name: &str| wait_for(10, name, || w.output_of(name).trim().parse::<u16>().ok());
    let a = w.spawn(ruled(&w, "a", server), "a");
    let pa = port(&w, "a");
    let b = w.spawn(ruled(&w, "b", server), "b");
    let pb = port(&w, "b");
    assert_eq!(pa, 4033, "the first is kept");
    assert!((3000..3100).contains(&pb), "the second is moved to a dev port: {pb}");
    assert_eq!(ours_beside_the_shim(b), Vec::<String>::new(), "the shim is the whole library");
    // each session's connects follow its own server; a third's is refused; a datagram
    // connect (a DNS query) is left alone
    let client = "import socket\ntry:\n  c=socket.create_connection(('127.0.0.1', 4033), 2); print('to', c.getpeername()[1])\nexcept OSError as e: print('errno', e.errno)\nu=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect(('127.0.0.53', 53)); print('udp')";
    for (session, want) in [("a", format!("to {pa}")), ("b", format!("to {pb}")), ("c", "errno 111".to_string())] {
        let out = text(&run(ruled(&w, session, client)).stdout);
        assert_eq!(out.lines().collect::<Vec<_>>(), [want.as_str(), "udp"], "session {session}");
    }
    let ev = w.events();
    let bound: Vec<_> =
        ev.iter().filter(|e| e.requested_port == 4033 && e.call == "bind").map(|e| (e.action, e.port, e.service_type.as_deref())).collect();
    assert_eq!(bound, [(Action::Kept, 4033, Some("dev")), (Action::Remapped, pb, Some("dev"))], "{ev:#?}");
    w.kill(a);
    w.kill(b);
}

#[test]
fn what_the_shim_does_alone_the_daemon_logs() {
    let mut w = World::new();
    w.start_daemon();
    let py = |w: &World, session: &str, script: &str| {
        let mut c = w.preloaded(Some(session), "python3");
        c.arg("-c").arg(script);
        text(&run(c).stdout).trim().to_string()
    };
    let event = |w: &World, what: &str, f: &dyn Fn(&styxy_preload_common::eventlog::Event) -> bool| {
        wait_for(10, what, || w.events().into_iter().find(|e| f(e)))
    };
    // a single-instance type (ollama's 11434): a second instance's EADDRINUSE stands
    serve(&mut w, Some("a"), 11434, "ollama");
    let bind = |port: u16| {
        format!("import socket\ns=socket.socket()\ntry: s.bind(('127.0.0.1', {port})); print(s.getsockname()[1])\nexcept OSError as e: print('errno', e.errno)")
    };
    assert_eq!(py(&w, "b", &bind(11434)), "errno 98");
    let e = event(&w, "the single instance's event", &|e| e.session.as_deref() == Some("b"));
    assert_eq!(
        (e.action, e.port, e.service_type.as_deref(), e.reason.as_deref(), e.comm.as_str()),
        (Action::Passthrough, 11434, Some("ai"), Some("single-instance type ai: not remapped"), "python3")
    );
    // observe mode: bound as asked, what would have been coordinated logged
    let mut c = w.preloaded(Some("c"), "python3");
    c.env("STYXY_PRELOAD_MODE", "observe").arg("-c").arg(bind(3000));
    assert_eq!(text(&run(c).stdout).trim(), "3000");
    let e = event(&w, "the observed bind", &|e| e.session.as_deref() == Some("c"));
    assert_eq!(
        (e.action, e.call.as_str(), e.port, e.service_type.as_deref(), e.reason.as_deref()),
        (Action::Observed, "bind", 3000, Some("dev"), Some("observe mode"))
    );
    // a listen of an unbound socket: the port the kernel chose
    let chosen: u16 = py(&w, "d", "import socket\ns=socket.socket(); s.listen(); print(s.getsockname()[1])").parse().unwrap();
    let e = event(&w, "the kernel's choice", &|e| e.session.as_deref() == Some("d"));
    assert_eq!(
        (e.action, e.call.as_str(), e.requested_port, e.port, e.reason.as_deref()),
        (Action::Observed, "listen", 0, chosen, Some("port chosen by the kernel"))
    );
}

#[test]
fn a_supervised_variable_without_the_filter_leaves_no_bind_uncoordinated() {
    // STYXY_PRELOAD_SUPERVISED leaked out of `exec --seccomp`'s tree (or the filter was
    // refused): this process has no seccomp filter, so its binds are the library's
    let mut w = World::new();
    w.start_daemon();
    serve(&mut w, Some("a"), 3010, "holder");
    let mut c = w.preloaded(Some("b"), "python3");
    c.env("STYXY_PRELOAD_SUPERVISED", "1")
        .args(["-c", "import socket\ns=socket.socket(); s.bind(('127.0.0.1', 3010)); print(s.getsockname()[1])"]);
    let out = run(c);
    let port: u16 = text(&out.stdout).trim().parse().unwrap_or_else(|_| panic!("{}", text(&out.stderr)));
    assert_ne!(port, 3010, "another session's port: moved, as without the variable");
}

#[test]
fn the_library_needs_libc_and_nothing_else() {
    let lib = lib();
    let out = std::process::Command::new("readelf").args(["-dW", "--dyn-syms"]).arg(&lib).output().expect("readelf (binutils)");
    let text = text(&out.stdout);
    let needed: Vec<&str> = text.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert_eq!(needed.len(), 1, "{needed:?}");
    assert!(needed[0].contains("[libc.so.6]"), "{needed:?}");
    // every symbol it must take from elsewhere is libc's, versioned (a Rust runtime symbol
    // such as rust_eh_personality would make every program fail to start)
    let foreign: Vec<&str> = text.lines().filter(|l| l.contains(" GLOBAL ") && l.contains(" UND ") && !l.contains("@GLIBC_")).collect();
    assert!(foreign.is_empty(), "symbols from outside libc: {foreign:#?}");
}

#[test]
fn the_library_s_relocated_data_is_on_one_page() {
    // every process relocates and protects it at load: a second page costs each ~7 µs
    let out = std::process::Command::new("readelf").arg("-lW").arg(lib()).output().expect("readelf (binutils)");
    let text = text(&out.stdout);
    let relro = text.lines().find(|l| l.trim_start().starts_with("GNU_RELRO")).unwrap_or_else(|| panic!("no GNU_RELRO:\n{text}"));
    let hex = |f: &str| u64::from_str_radix(f.trim_start_matches("0x"), 16).unwrap();
    let fields: Vec<&str> = relro.split_whitespace().collect();
    let (vaddr, filesz) = (hex(fields[2]), hex(fields[4]));
    assert!(filesz > 0);
    assert_eq!(vaddr / 4096, (vaddr + filesz - 1) / 4096, "the relocated data straddles two pages: {relro}");
}
