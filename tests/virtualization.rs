//! Session port virtualisation: inside a session, connects follow the session's
//! remaps and do not reach other sessions' servers (isolation).

mod common;

use common::*;

/// A GET of `url` that prints the body, or `error` and why.
const GET: &str = "import urllib.request,sys\ntry: print(urllib.request.urlopen(sys.argv[1],timeout=3).read().decode().strip())\nexcept Exception as e: print('error', getattr(e, 'reason', e))";

fn get_in(w: &World, session: Option<&str>, url: &str, extra: &[&str]) -> String {
    let script = GET;
    let mut c = match session {
        Some(s) => {
            let mut c = w.cli();
            c.args(["exec", "--quiet", "--session", s]).args(extra).args(["--", "python3", "-c", script, url]);
            c
        }
        None => {
            let mut c = w.cmd("python3");
            c.args(["-c", script, url]);
            c
        }
    };
    c.stderr(std::process::Stdio::null());
    text(&run(c).stdout).trim().to_string()
}

fn python_server(w: &mut World, session: &str, port: u16) -> u16 {
    let dir = w.path(session);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("who"), session).unwrap();
    let mut c = w.cli();
    c.args(["exec", "--session", session, "--", "python3", "-m", "http.server", &port.to_string()]).current_dir(&dir);
    let pid = w.spawn(c, session);
    wait_for(20, "server listening", || tree_ports(pid).into_iter().next())
}

#[test]
fn each_session_reaches_its_own_server_on_the_port_it_asked_for() {
    let mut w = World::new();
    assert_eq!(python_server(&mut w, "A", 3000), 3000);
    // isolation: before B has a server, B does not reach A's 3000
    let before = get_in(&w, Some("B"), "http://127.0.0.1:3000/who", &[]);
    assert!(before.starts_with("error") && before.contains("refused"), "{before}");
    let b_port = python_server(&mut w, "B", 3000);
    assert_ne!(b_port, 3000);
    assert_eq!(get_in(&w, Some("B"), "http://127.0.0.1:3000/who", &[]), "B");
    assert_eq!(get_in(&w, Some("B"), "http://localhost:3000/who", &[]), "B");
    assert_eq!(get_in(&w, Some("A"), "http://127.0.0.1:3000/who", &[]), "A");
    assert_eq!(get_in(&w, None, "http://127.0.0.1:3000/who", &[]), "A");
    // with isolation off, a session without its own server reaches A's as without us
    assert_eq!(get_in(&w, Some("C"), "http://127.0.0.1:3000/who", &["--no-isolate"]), "A");
    // … in any spelling the environment contract allows, in the shim as in the hooks' logic
    for off in ["OFF", " false", "No"] {
        let mut c = w.preloaded(Some("D"), "python3");
        c.args(["-c", GET, "http://127.0.0.1:3000/who"]).env("STYXY_PRELOAD_ISOLATE", off);
        assert_eq!(text(&run(c).stdout).trim(), "A", "STYXY_PRELOAD_ISOLATE={off:?}");
    }
    // a waiter polling 3000 non-blockingly (libuv), as Playwright's webServer does
    let poll = "const net=require('net');let n=0;(function t(){const s=net.connect(3000,'127.0.0.1',()=>{console.log('up',s.remotePort);process.exit(0)});s.on('error',()=>{if(++n>100)process.exit(1);setTimeout(t,50)})})()";
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", "B", "--", "node", "-e", poll]);
    let out = text(&run(c).stdout);
    // getpeername() of a redirected socket tells the truth: the actual port
    assert_eq!(out.trim(), format!("up {b_port}"));
}

#[test]
fn servers_outside_any_session_stay_reachable() {
    let mut w = World::new();
    w.start_daemon();
    // a shared server outside any session, on a coordinated port no session remapped
    let mut c = w.preloaded(None, fixture("binder"));
    c.args(["serve", "3050"]).env("WHO", "shared");
    let pid = w.spawn(c, "shared");
    assert_eq!(wait_for(10, "shared server", || listening_ports(pid).into_iter().next()), 3050);
    assert_eq!(get_in(&w, Some("B"), "http://127.0.0.1:3050/", &[]), "shared");
}

#[test]
fn a_process_started_before_the_remap_follows_it() {
    let mut w = World::new();
    w.start_daemon();
    let mut c = w.preloaded(Some("A"), fixture("binder"));
    c.args(["serve", "3060"]).env("WHO", "A");
    let a = w.spawn(c, "a");
    wait_for(10, "A", || listening_ports(a).into_iter().next());
    // B's poller starts first and keeps trying 3060
    let poll = "import socket,time\nfor i in range(200):\n  s=socket.socket()\n  try:\n    s.connect(('127.0.0.1',3060)); s.send(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(200).decode().split('\\r\\n\\r\\n')[1]); break\n  except OSError: time.sleep(0.05)\n  finally: s.close()";
    let mut c = w.preloaded(Some("B"), "python3");
    c.args(["-c", poll]);
    let poller = w.spawn(c, "poller");
    let mut c = w.preloaded(Some("B"), fixture("binder"));
    c.args(["serve", "3060"]).env("WHO", "B");
    let b = w.spawn(c, "b");
    let bp = wait_for(10, "B", || listening_ports(b).into_iter().next());
    assert_ne!(bp, 3060);
    wait_for(15, "the poller to finish", || {
        std::fs::read_to_string(format!("/proc/{poller}/stat")).ok().filter(|s| !s.contains(") Z")).map_or(Some(()), |_| None)
    });
    assert_eq!(w.output_of("poller").trim(), "B");
}
