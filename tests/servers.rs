//! Servers as people really run them, each started twice in two sessions: a server that
//! binds long before it listens (uvicorn's reloader and workers), a remapped port another
//! user grabs after its server exits.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// `styxy-preload exec --session SESSION -- CMD…` in `dir`.
fn exec(w: &World, session: &str, dir: &Path, cmd: &[&str]) -> Command {
    let mut c = w.cli();
    c.args(["exec", "--session", session, "--"]).args(cmd).current_dir(dir);
    c
}

/// A directory of the world holding `who` (what its servers answer).
fn site(w: &World, name: &str) -> std::path::PathBuf {
    let dir = w.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("who"), name).unwrap();
    dir
}

/// `python3 -m http.server PORT` in session `name`, serving `who` = name; the port it serves.
fn http_server(w: &mut World, name: &str, port: u16) -> (u32, u16) {
    let dir = site(w, name);
    let pid = w.spawn(exec(w, name, &dir, &["python3", "-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"]), name);
    (pid, wait_for(20, &format!("{name} listening"), || tree_ports(pid).into_iter().next()))
}

/// A client in `session` asking `http://127.0.0.1:PORT/who` every 250 ms for `secs`
/// seconds: one line per request, the answer or `refused`/the error.
fn ask_for(w: &World, session: &str, port: u16, secs: u32) -> Vec<String> {
    let script = "import sys, time, urllib.request\n\
end = time.monotonic() + float(sys.argv[2])\n\
while time.monotonic() < end:\n    \
try: print(urllib.request.urlopen('http://127.0.0.1:%s/who' % sys.argv[1], timeout=3).read().decode().strip(), flush=True)\n    \
except Exception as e: print('error', getattr(e, 'reason', e), flush=True)\n    \
time.sleep(0.25)";
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", session, "--", "python3", "-c", script, &port.to_string(), &secs.to_string()]);
    text(&run(c).stdout).lines().map(str::to_string).collect()
}

/// `GET /allocations`: the ports the daemon holds.
fn allocated(w: &World) -> Vec<u16> {
    let (_, v) = w.json("GET", "/allocations", None);
    v["allocations"].as_array().into_iter().flatten().filter_map(|a| a["port"].as_u64()).map(|p| p as u16).collect()
}

#[test]
fn a_server_that_listens_seconds_after_its_bind_keeps_its_remap() {
    let mut w = World::new();
    assert_eq!(http_server(&mut w, "A", 8050).1, 8050);
    // B binds 8050 (SO_REUSEADDR, as uvicorn's reloader does) and listens 2 s later
    let server = "import socket, time\n\
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', 8050))\n\
print('bound', s.getsockname()[1], flush=True)\n\
time.sleep(2); s.listen(); print('listening', flush=True)\n\
while True:\n    \
c, _ = s.accept(); c.recv(1000); c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nB'); c.close()";
    let dir = site(&w, "B");
    let pid = w.spawn(exec(&w, "B", &dir, &["python3", "-c", server]), "B");
    wait_for(20, "B listening", || w.output_of("B").contains("listening").then_some(()));
    let port: u16 = w.output_of("B").split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_ne!(port, 8050);
    assert!(tree_ports(pid).contains(&port));
    let answers = ask_for(&w, "B", 8050, 8);
    assert!(answers.len() >= 10 && answers.iter().all(|a| a == "B"), "B's connects to 8050 must reach B: {answers:?}");
}

/// An ASGI app answering what its directory's `who` holds.
const ASGI_APP: &str = "async def app(scope, receive, send):\n    \
if scope['type'] != 'http':\n        return\n    \
body = open('who', 'rb').read()\n    \
await send({'type': 'http.response.start', 'status': 200, 'headers': [(b'content-type', b'text/plain')]})\n    \
await send({'type': 'http.response.body', 'body': body})\n";

fn uvicorn_twice(extra: &[&str]) {
    if !Command::new("python3").args(["-c", "import uvicorn"]).status().is_ok_and(|s| s.success()) {
        return missing("uvicorn (pip install -r tests/fixtures/realtools/requirements.txt)");
    }
    let mut w = World::new();
    let mut pids = Vec::new();
    for s in ["A", "B"] {
        let dir = site(&w, s);
        std::fs::write(dir.join("app.py"), ASGI_APP).unwrap();
        let cmd: Vec<&str> = ["python3", "-m", "uvicorn", "app:app", "--port", "8000"].into_iter().chain(extra.iter().copied()).collect();
        pids.push(w.spawn(exec(&w, s, &dir, &cmd), s));
        wait_for(30, &format!("uvicorn {s} serving"), || w.stderr_of(s).contains("Application startup complete").then_some(()));
    }
    let b_port = wait_for(10, "B listening", || tree_ports(pids[1]).into_iter().next());
    assert_ne!(b_port, 8000);
    let answers = ask_for(&w, "B", 8000, 8);
    assert!(answers.len() >= 10 && answers.iter().all(|a| a == "B"), "B's connects to 8000 must reach B: {answers:?}");
    assert_eq!(http_get("127.0.0.1", 8000, "/").as_deref(), Some("A"));
    assert!(allocated(&w).contains(&b_port));
}

#[test]
fn uvicorn_with_its_reloader_keeps_its_remap() {
    uvicorn_twice(&["--reload"]);
}

#[test]
fn uvicorn_with_workers_keeps_its_remap() {
    uvicorn_twice(&["--workers", "2"]);
}

/// `program` run as `uid`, without the library.
fn as_user(w: &World, uid: u32, program: &str, args: &[&str]) -> Command {
    let mut c = w.cmd("setpriv");
    c.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()]).arg(program).args(args);
    c
}

#[test]
fn a_remapped_port_another_user_grabs_after_its_server_exits_is_not_the_sessions() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        return eprintln!("skipped: needs root to run a process as another user");
    }
    let mut w = World::new();
    assert_eq!(http_server(&mut w, "A", 3000).1, 3000);
    let (b, b_port) = http_server(&mut w, "B", 3000);
    assert_ne!(b_port, 3000);
    // the daemon stopped while B's server exits and another user takes its port: the sweep
    // that follows sees the port bound, by someone else
    let daemon = w.daemon_pid().unwrap();
    // SAFETY: kill(2) of this world's daemon.
    unsafe { libc::kill(daemon, libc::SIGSTOP) };
    w.kill(b);
    let attacker = "import socket, sys\n\
s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('listening', flush=True)\n\
while True:\n    \
c, _ = s.accept(); print('got', c.recv(1000)[:20], flush=True); c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nattacker'); c.close()";
    let att = w.spawn(as_user(&w, user("styxy-grab"), "/usr/bin/python3", &["-c", attacker, &b_port.to_string()]), "attacker");
    wait_for(10, "the attacker listening", || w.output_of("attacker").contains("listening").then_some(()));
    // SAFETY: as above.
    unsafe { libc::kill(daemon, libc::SIGCONT) };
    wait_for(10, "B's allocation freed", || (!allocated(&w).contains(&b_port)).then_some(()));
    let once = ask_for(&w, "B", 3000, 1);
    assert!(once.iter().all(|a| a.starts_with("error")), "B's connect reached someone: {once:?}");
    assert!(!w.output_of("attacker").contains("got"), "the attacker received B's request");
    // B's server, restarted, serves on a port of its own and B reaches it
    let (_, again) = http_server(&mut w, "B", 3000);
    assert!(again != 3000 && again != b_port);
    assert!(ask_for(&w, "B", 3000, 1).iter().all(|a| a == "B"));
    w.kill(att);
}

#[test]
fn a_fixed_port_node_server_in_a_get_port_project_is_moved_and_serves() {
    let mut w = World::new();
    let mut pids = Vec::new();
    for s in ["A", "B"] {
        let dir = site(&w, s);
        // the project lists get-port (another of its scripts uses it); this server does not
        std::fs::write(dir.join("package.json"), r#"{"private": true, "type": "module", "dependencies": {"get-port": "7.2.0"}}"#).unwrap();
        let server = "import http from 'node:http';\n\
http.createServer((q, r) => r.end(process.env.WHO)).listen(3000, () => console.log('listening'));\n";
        std::fs::write(dir.join("server.mjs"), server).unwrap();
        let mut c = exec(&w, s, &dir, &["node", "server.mjs"]);
        c.env("WHO", s);
        pids.push(w.spawn(c, s));
        wait_for(20, &format!("{s} listening"), || w.output_of(s).contains("listening").then_some(()));
    }
    let b_port = wait_for(10, "B's port", || tree_ports(pids[1]).into_iter().next());
    assert_ne!(b_port, 3000);
    assert!(!w.finished(pids[1]), "B's server ended: {}", w.stderr_of("B"));
    assert_eq!(http_get("127.0.0.1", b_port, "/").as_deref(), Some("B"));
    let b = ask_for(&w, "B", 3000, 1);
    assert!(!b.is_empty() && b.iter().all(|a| a == "B"), "{b:?}");
}

/// The port a client in `session` reaches when it connects to 127.0.0.1:`port` and the
/// first `len` bytes it reads after sending `hello` (`peer-port bytes`), or `error …`.
fn dial(w: &World, session: &str, port: u16, hello: &str, len: usize) -> String {
    let script = "import socket, sys\n\
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)\n\
s.sendall(sys.argv[2].encode()); got = b''\n\
while len(got) < int(sys.argv[3]):\n    \
b = s.recv(100)\n    \
if not b: break\n    \
got += b\n\
print(s.getpeername()[1], got.decode(errors='replace'))";
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", session, "--", "python3", "-c", script, &port.to_string(), hello, &len.to_string()]);
    let out = run(c);
    format!("{}{}", text(&out.stdout).trim(), if out.status.success() { String::new() } else { format!("error {}", text(&out.stderr)) })
}

#[test]
fn two_jvms_with_jdwp_on_5005_both_start_and_each_session_reaches_its_own() {
    let mut w = World::new();
    let mut pids = Vec::new();
    for s in ["A", "B"] {
        let dir = site(&w, s);
        std::fs::write(dir.join("Main.java"), "public class Main { public static void main(String[] a) throws Exception { System.out.println(\"up\"); Thread.sleep(600000); } }").unwrap();
        let agent = "-agentlib:jdwp=transport=dt_socket,server=y,suspend=n,address=5005";
        pids.push(w.spawn(exec(&w, s, &dir, &["java", agent, "Main.java"]), s));
        wait_for(60, &format!("JVM {s} up"), || w.output_of(s).contains("up").then_some(()));
    }
    assert!(!w.finished(pids[1]), "B's JVM ended: {}", w.stderr_of("B"));
    let ports: Vec<u16> = pids.iter().map(|p| wait_for(10, "JDWP listening", || tree_ports(*p).into_iter().next())).collect();
    assert_eq!(ports[0], 5005);
    assert_ne!(ports[1], 5005);
    for (s, port) in ["A", "B"].iter().zip(&ports) {
        assert_eq!(dial(&w, s, 5005, "JDWP-Handshake", 14), format!("{port} JDWP-Handshake"), "session {s}");
    }
}

#[test]
fn two_node_inspectors_on_9229_both_listen_and_each_session_reaches_its_own() {
    let mut w = World::new();
    let mut pids = Vec::new();
    for s in ["A", "B"] {
        let dir = site(&w, s);
        std::fs::write(dir.join(format!("app-{s}.js")), "setInterval(() => {}, 1000);\n").unwrap();
        pids.push(w.spawn(exec(&w, s, &dir, &["node", "--inspect=127.0.0.1:9229", &format!("app-{s}.js")]), s));
        wait_for(20, &format!("inspector {s}"), || w.stderr_of(s).contains("Debugger listening").then_some(()));
    }
    assert!(!w.stderr_of("B").contains("failed"), "{}", w.stderr_of("B"));
    for s in ["A", "B"] {
        let mut c = w.cli();
        let get = "import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:9229/json/list', timeout=5).read().decode())";
        c.args(["exec", "--quiet", "--session", s, "--", "python3", "-c", get]);
        let body = text(&run(c).stdout);
        assert!(body.contains(&format!("app-{s}.js")), "session {s} reached another inspector: {body}");
    }
}

#[test]
fn a_server_in_its_own_network_namespace_keeps_its_port() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        return eprintln!("skipped: needs root for unshare -n");
    }
    let mut w = World::new();
    assert_eq!(http_server(&mut w, "A", 8001).1, 8001);
    // in B, a sandbox with a network of its own: its 8001 is free, whatever A holds outside
    let dir = site(&w, "B");
    let client = "import socket, sys, time\n\
for i in range(100):\n    \
try:\n        \
s = socket.create_connection(('127.0.0.1', 8001), timeout=2); peer = s.getpeername()[1]\n        \
s.sendall(b'GET /who HTTP/1.0\\r\\n\\r\\n'); got = b''.join(iter(lambda: s.recv(1000), b''))\n        \
print(sys.argv[1], got.decode().split('\\r\\n\\r\\n')[-1], peer, flush=True); break\n    \
except OSError: time.sleep(0.1)";
    let script = format!(
        "ip link set lo up; python3 -m http.server 8001 --bind 127.0.0.1 2>server.err & \
         env -u LD_PRELOAD python3 -c \"{client}\" unhooked; python3 -c \"{client}\" hooked; kill $!"
    );
    let out = run(exec(&w, "B", &dir, &["unshare", "-n", "sh", "-c", &script]));
    let said = text(&out.stdout);
    assert!(said.contains("unhooked B 8001"), "an unhooked client in the namespace: {said}\n{}", text(&out.stderr));
    assert!(said.contains("hooked B 8001"), "a hooked client in the namespace: {said}\n{}", text(&out.stderr));
    let server_err = std::fs::read_to_string(dir.join("server.err")).unwrap_or_default();
    assert!(!server_err.contains("is taken"), "{server_err}");
}

#[test]
fn a_refused_connect_is_an_event_and_one_stderr_line() {
    let mut w = World::new();
    let (a, _) = http_server(&mut w, "A", 3000);
    // a client in B, twice: isolation refuses both, one line says why
    let client = "import urllib.request\n\
for i in range(2):\n    \
try: urllib.request.urlopen('http://127.0.0.1:3000/who', timeout=3); print('reached')\n    \
except Exception as e: print('error', getattr(e, 'reason', e))\n\
print('core' if any('libstyxy' in l and 'libstyxy_preload.so' not in l for l in open('/proc/self/maps')) else 'shim')";
    let mut c = w.cli();
    c.args(["exec", "--session", "B", "--", "python3", "-c", client]);
    let out = run(c);
    assert_eq!(text(&out.stdout).matches("Connection refused").count(), 2, "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("shim"), "refused by the library alone: {}", text(&out.stdout));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("refused")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    let a_pid = wait_for(5, "A's server", || w.json("GET", "/allocations", None).1["allocations"][0]["process_id"].as_u64());
    assert!(lines[0].contains(&format!("session A's server (python3, pid {a_pid})")), "{err}");
    assert!(lines[0].contains("--no-isolate") && lines[0].contains("styxy-preload ports"), "{err}");
    let ev: Vec<_> = w.events().into_iter().filter(|e| e.call == "connect" && e.session.as_deref() == Some("B")).collect();
    assert_eq!(ev.len(), 1, "{ev:#?}");
    assert_eq!(ev[0].action, styxy_preload_common::eventlog::Action::Isolated);
    assert!(ev[0].reason.as_deref().is_some_and(|r| r.contains("session A's server")), "{ev:#?}");
    let mut c = w.cli();
    c.args(["stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&run(c).stdout).unwrap();
    assert_eq!(stats["refused_connects"], 1, "{stats:#}");
    let mut c = w.cli();
    c.args(["log", "--session", "B"]);
    let log = text(&run(c).stdout);
    assert!(log.lines().any(|l| l.contains("isolated") && l.contains("session A's server")), "{log}");
    w.kill(a);
}

#[test]
fn the_notice_reaches_a_log_a_shell_redirect_made_under_exec_and_env() {
    let mut w = World::new();
    let (a, _) = http_server(&mut w, "A", 8000);
    let dir = site(&w, "B");
    // under exec: the shell inside the session makes the log
    let pid = w.spawn(exec(&w, "B", &dir, &["sh", "-c", "python3 -m http.server 8000 > exec.log 2>&1"]), "B");
    let b_port = wait_for(20, "B listening", || tree_ports(pid).into_iter().next());
    assert_ne!(b_port, 8000);
    let log =
        wait_for(10, "the notice in exec.log", || std::fs::read_to_string(dir.join("exec.log")).ok().filter(|l| l.contains("is taken")));
    assert!(log.contains("port 8000 is taken; ") && log.contains(&format!(" got {b_port}")), "{log}");
    w.kill(pid);
    // under env: a shell that evaluated `styxy-preload env`
    let script = format!("eval \"$({} env --session C)\"; exec python3 -m http.server 8000 > env.log 2>&1", bin().display());
    let mut c = w.cmd("bash");
    c.args(["-c", &script]).current_dir(&dir);
    let pid = w.spawn(c, "C");
    let c_port = wait_for(20, "C listening", || tree_ports(pid).into_iter().next());
    assert_ne!(c_port, 8000);
    let log =
        wait_for(10, "the notice in env.log", || std::fs::read_to_string(dir.join("env.log")).ok().filter(|l| l.contains("is taken")));
    assert!(log.contains(&format!(" got {c_port}")), "{log}");
    w.kill(pid);
    w.kill(a);
}

#[test]
fn the_notice_reaches_a_shells_log_where_kcmp_is_refused() {
    // Docker's default seccomp profile refuses kcmp(2): fds 1 and 2 are then compared
    // through /proc/self/fdinfo
    let mut w = World::new();
    let (a, _) = http_server(&mut w, "A", 8000);
    let dir = site(&w, "B");
    let nokcmp = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nokcmp.py");
    let shell = format!("python3 {} python3 -m http.server 8000 > k.log 2>&1", nokcmp.display());
    let pid = w.spawn(exec(&w, "B", &dir, &["sh", "-c", &shell]), "B");
    let b_port = wait_for(20, "B listening", || tree_ports(pid).into_iter().next());
    assert_ne!(b_port, 8000);
    let log = wait_for(10, "the notice in k.log", || std::fs::read_to_string(dir.join("k.log")).ok().filter(|l| l.contains("is taken")));
    assert!(log.contains(&format!(" got {b_port}")), "{log}");
    w.kill(pid);
    w.kill(a);
}

/// Whether anything in this test's network namespace listens on TCP `port` (the kernel's view).
fn listened(port: u16) -> bool {
    ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).unwrap_or_default().lines().skip(1).any(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            c.len() > 3 && c[3] == "0A" && c[1].rsplit(':').next().and_then(|h| u16::from_str_radix(h, 16).ok()) == Some(port)
        })
    })
}

/// The port of the first `prefix<port>` in `text` (a printed URL).
fn printed_port(text: &str, prefix: &str) -> Option<u16> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())].parse().ok()
}

/// A hugo site in the world whose page says `who`.
fn hugo_site(w: &World, who: &str) -> std::path::PathBuf {
    let dir = site(w, who);
    std::fs::write(
        dir.join("hugo.toml"),
        "baseURL = 'http://example.org/'\ntitle = 't'\ndisableKinds = ['taxonomy', 'term', 'RSS', 'sitemap']\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("layouts")).unwrap();
    std::fs::write(dir.join("layouts/index.html"), format!("<html><body>hugo-of-{who}</body></html>")).unwrap();
    dir
}

#[test]
fn hugo_twice_prints_the_port_it_serves() {
    if !Command::new("hugo").arg("version").status().is_ok_and(|s| s.success()) {
        return missing("hugo (apt-get install hugo)");
    }
    let mut w = World::new();
    // A and B name 1313; C names none (hugo's own fallback); D: --port auto
    let cases: [(&str, &[&str], &[&str]); 4] =
        [("A", &[], &["--port", "1313"]), ("B", &[], &["--port", "1313"]), ("C", &[], &[]), ("D", &["--port", "auto"], &[])];
    let mut printed = Vec::new();
    for (who, options, extra) in cases {
        let dir = hugo_site(&w, who);
        let mut c = w.cli();
        c.args(["exec", "--session", who]).args(options).args(["--", "hugo", "server"]).args(extra).current_dir(&dir);
        let pid = w.spawn(c, who);
        let port = wait_for(60, "hugo's URL", || printed_port(&w.output_of(who), "http://localhost:"));
        let served = wait_for(20, "hugo listening", || Some(tree_ports(pid)).filter(|p| !p.is_empty()));
        assert!(served.contains(&port), "{who} prints {port}, listens on {served:?}:\n{}{}", w.output_of(who), w.stderr_of(who));
        let page = wait_for(20, "the printed URL answers", || http_get("127.0.0.1", port, "/"));
        assert!(page.contains(&format!("hugo-of-{who}")), "{who}'s printed URL reached another site: {page}");
        // the page's live reload comes back to the same port
        assert!(page.contains(&format!("port={port}")), "{who}: {page}");
        printed.push(port);
    }
    assert_eq!(printed[0], 1313);
    assert!(printed[1..].iter().all(|p| *p != 1313), "{printed:?}");
}

#[test]
fn mkdocs_twice_prints_the_port_it_serves() {
    if !Command::new("mkdocs").arg("--version").status().is_ok_and(|s| s.success()) {
        return missing("mkdocs (apt-get install mkdocs)");
    }
    let mut w = World::new();
    // A: mkdocs' default 8000; B: --port auto; C names 8000 with -a
    let cases: [(&str, &[&str], &[&str]); 3] = [("A", &[], &[]), ("B", &["--port", "auto"], &[]), ("C", &[], &["-a", "127.0.0.1:8000"])];
    let mut printed = Vec::new();
    for (who, options, extra) in cases {
        let dir = site(&w, who);
        std::fs::write(dir.join("mkdocs.yml"), format!("site_name: docs-of-{who}\n")).unwrap();
        std::fs::create_dir_all(dir.join("docs")).unwrap();
        std::fs::write(dir.join("docs/index.md"), format!("# mkdocs-of-{who}\n")).unwrap();
        let mut c = w.cli();
        c.args(["exec", "--session", who]).args(options).args(["--", "mkdocs", "serve", "--no-livereload"]).args(extra).current_dir(&dir);
        let pid = w.spawn(c, who);
        let port = wait_for(60, "mkdocs' URL", || printed_port(&w.stderr_of(who), "Serving on http://127.0.0.1:"));
        let served = wait_for(20, "mkdocs listening", || Some(tree_ports(pid)).filter(|p| !p.is_empty()));
        assert!(served.contains(&port), "{who} prints {port}, listens on {served:?}:\n{}", w.stderr_of(who));
        let page = wait_for(20, "the printed URL answers", || http_get("127.0.0.1", port, "/"));
        assert!(page.contains(&format!("mkdocs-of-{who}")), "{who}'s printed URL reached another site: {page}");
        printed.push(port);
    }
    assert_eq!(printed[0], 8000);
    assert!(printed[1] != 8000 && printed[2] != 8000 && printed[1] != printed[2], "{printed:?}");
}

#[test]
fn a_server_restarted_in_one_session_is_one_remap_in_the_exit_summary() {
    let mut w = World::new();
    let (a, _) = http_server(&mut w, "A", 8000);
    // a reloader's way: the server started twice in one run, each time moved the same way
    let server = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 8000)); s.listen(); print(s.getsockname()[1])";
    let script = format!("python3 -c \"{server}\"; python3 -c \"{server}\"");
    let mut c = w.cli();
    c.args(["exec", "--session", "B", "--", "sh", "-c", &script]);
    let out = run(c);
    let ports: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert!(ports.len() == 2 && ports[0] == ports[1] && ports[0] != "8000", "{ports:?}");
    let err = text(&out.stderr);
    assert!(err.contains(&format!("1 port remapped: 8000→{} (python3)\n", ports[0])), "{err}");
    w.kill(a);
}

#[test]
fn two_debugpy_on_5678_both_listen_and_each_session_reaches_its_own() {
    if !Command::new("python3").args(["-c", "import debugpy"]).status().is_ok_and(|s| s.success()) {
        return missing("debugpy (pip install -r tests/fixtures/realtools/requirements.txt)");
    }
    let mut w = World::new();
    // debugpy's adapter detaches from its process group: ended by its session when the test ends
    let _reap = SessionReaper(w.path("run"), vec!["dbg-A", "dbg-B"]);
    for s in ["dbg-A", "dbg-B"] {
        let dir = site(&w, s);
        std::fs::write(dir.join("app.py"), "import time\nprint('up', flush=True)\ntime.sleep(600)\n").unwrap();
        w.spawn(exec(&w, s, &dir, &["python3", "-m", "debugpy", "--listen", "127.0.0.1:5678", "app.py"]), s);
        wait_for(30, &format!("debugpy {s}"), || w.output_of(s).contains("up").then_some(()));
    }
    // B's adapter was moved, and said where
    let moved: u16 = wait_for(20, "B's notice", || {
        let err = w.stderr_of("dbg-B");
        let line = err.lines().find(|l| l.contains("port 5678 is taken;"))?.to_string();
        line.rsplit(" got ").next()?.trim().parse().ok()
    });
    assert!((5680..5700).contains(&moved), "{moved}");
    for p in [5678, moved] {
        wait_for(10, "debugpy listening", || listened(p).then_some(()));
    }
    // a debugger in each session dialling 5678 reaches its own (the peer's port)
    for (s, port) in [("dbg-A", 5678), ("dbg-B", moved)] {
        let reached = dial(&w, s, 5678, "", 0);
        assert_eq!(reached.split_whitespace().next(), Some(port.to_string().as_str()), "session {s}: {reached}");
    }
}

/// Kills, when dropped, every process of this test's world (its `XDG_RUNTIME_DIR`) whose
/// environment names one of these sessions: processes that left their process group
/// (daemons, detached adapters). Another test's processes are never touched.
struct SessionReaper(std::path::PathBuf, Vec<&'static str>);

impl Drop for SessionReaper {
    fn drop(&mut self) {
        let world = format!("XDG_RUNTIME_DIR={}", self.0.display()).into_bytes();
        for pid in std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()) {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
            let session = vars.iter().any(|kv| self.1.iter().any(|s| *kv == format!("STYXY_PRELOAD_SESSION={s}").as_bytes()));
            if session && vars.contains(&world.as_slice()) {
                // SAFETY: kill(2) of a process of this test's world and sessions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

#[test]
fn ports_lists_a_sessions_server_on_a_port_nobody_coordinates() {
    let mut w = World::new();
    // 9515 (chromedriver's) is no type's: bound as asked, no allocation
    let (pid, port) = http_server(&mut w, "A", 9515);
    assert_eq!(port, 9515);
    let (_, api) = http_server(&mut w, "B", 8000);
    // a server of session A in another network namespace: its port is not this one's
    let mut elsewhere = w.cmd("unshare");
    elsewhere.args(["--net", "python3", "-m", "http.server", "9516", "--bind", "127.0.0.1"]).env("STYXY_PRELOAD_SESSION", "A");
    let other = w.spawn(elsewhere, "elsewhere");
    wait_for(20, "the server elsewhere listening", || (!listening_ports(other).is_empty()).then_some(()));
    let out = run({
        let mut c = w.cli();
        c.arg("ports");
        c
    });
    let table = text(&out.stdout);
    assert!(table.lines().any(|l| l.split_whitespace().next() == Some(&api.to_string())), "{table}");
    let line = table.lines().find(|l| l.split_whitespace().next() == Some("9515")).unwrap_or_else(|| panic!("9515 missing:\n{table}"));
    let python = wait_for(5, "the server's pid", || procinfo_children(pid).into_iter().find(|c| listening_ports(*c).contains(&9515)));
    assert_eq!(line.split_whitespace().collect::<Vec<_>>(), ["9515", "A", &python.to_string(), "python3"], "{table}");
    assert!(!table.lines().any(|l| l.split_whitespace().next() == Some("9516")), "another namespace's port:\n{table}");
}

/// `pid` and its descendants.
fn procinfo_children(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        for t in std::fs::read_dir(format!("/proc/{}/task", all[i])).into_iter().flatten().flatten() {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            all.extend(kids.split_whitespace().filter_map(|k| k.parse::<u32>().ok()));
        }
        i += 1;
    }
    all
}

#[test]
fn a_bind_that_fails_with_eaddrinuse_does_not_own_the_sessions_port() {
    let mut w = World::new();
    http_server(&mut w, "A", 3000);
    let (_, b_port) = http_server(&mut w, "B", 3000);
    // a second server of B asks for 3000 too: B's 3000 is taken (by B's own), as without us
    let script = "import errno, os, socket, time\n\
s = socket.socket()\n\
try: s.bind(('127.0.0.1', 3000)); print('bound', flush=True)\n\
except OSError as e: print(errno.errorcode[e.errno], os.getpid(), flush=True)\n\
time.sleep(600)";
    let dir = site(&w, "B2");
    let pid = w.spawn(exec(&w, "B", &dir, &["python3", "-c", script]), "B2");
    let out = wait_for(10, "the second bind", || Some(w.output_of("B2")).filter(|o| !o.is_empty()));
    let second: u32 = out.strip_prefix("EADDRINUSE ").and_then(|p| p.trim().parse().ok()).unwrap_or_else(|| panic!("{out}"));
    let (_, v) = w.json("GET", "/allocations", None);
    let a = v["allocations"].as_array().unwrap().iter().find(|a| a["port"] == b_port).cloned().unwrap();
    let pids: Vec<u64> = a["pids"].as_array().unwrap().iter().filter_map(|p| p.as_u64()).collect();
    assert!(!pids.contains(&u64::from(second)), "the failed bind's pid owns {b_port}: {a:#}");
    w.kill(pid);
}

/// A server that binds, forks, and leaves the serving to its child (a daemonizing
/// server, a pre-fork master): the child's `listen()` confirms the port its parent kept,
/// so the child is an owner of the allocation, and it stands once the parent is gone.
#[test]
fn a_forked_child_that_listens_owns_the_port_its_parent_kept() {
    let mut w = World::new();
    let server = "import os, socket, sys, time\n\
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', 3050))\n\
if os.fork():\n    \
os._exit(0)\n\
s.listen(); print('child', os.getpid(), s.getsockname()[1], flush=True)\n\
time.sleep(600)";
    let dir = site(&w, "A");
    w.spawn(exec(&w, "A", &dir, &["python3", "-c", server]), "A");
    let out = wait_for(20, "the child listening", || w.output_of("A").lines().find(|l| l.starts_with("child")).map(str::to_string));
    let (child, port): (u32, u16) = match out.split_whitespace().collect::<Vec<_>>()[..] {
        [_, pid, port] => (pid.parse().unwrap(), port.parse().unwrap()),
        _ => panic!("{out}"),
    };
    assert_eq!(port, 3050);
    let owners = |w: &World| {
        let (_, v) = w.json("GET", "/allocations", None);
        let all = v["allocations"].as_array().cloned().unwrap_or_default();
        let mine = all.into_iter().find(|a| a["port"] == 3050);
        mine.and_then(|a| a["pids"].as_array().map(|p| p.iter().filter_map(|p| p.as_u64()).collect::<Vec<_>>()))
    };
    wait_for(10, "the child among the owners", || owners(&w).filter(|p| p.contains(&u64::from(child))).map(|_| ()));
    assert!(listening_ports(child).contains(&3050), "the child serves 3050");
    assert_eq!(ours_beside_the_shim(child), Vec::<String>::new(), "the shim is the whole library");
}
