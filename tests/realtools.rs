//! The real dev tools, each run twice in two sessions as a person would: the
//! URL each prints is the one it serves, a port finder answers a port its program then
//! gets, a moved server is one event and one notice, and two Playwright suites with a
//! Vite `webServer` pass at once, each against its own page.
//!
//! The tools: `jupyter server` (pip `jupyter_server`) and, from npm, the exact versions in
//! tests/fixtures/realtools/package.json, which scripts/test.sh installs into
//! `${CARGO_TARGET_DIR:-target}/npm-tools` (and exports as `STYXY_TEST_NPM_TOOLS`), with
//! Debian's chromium for Playwright. A missing tool fails the test under CI and skips it
//! (saying what to install) elsewhere.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use styxy_preload_common::eventlog::{Action, Event};

/// Where scripts/test.sh installs the npm packages.
fn npm_tools() -> PathBuf {
    std::env::var_os("STYXY_TEST_NPM_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("npm-tools"))
}

/// True when `found`; otherwise fails where the tools were installed, or skips (see `missing`).
fn have(what: &str, found: bool) -> bool {
    if !found {
        missing(what);
    }
    found
}

/// The installed npm packages' `node_modules`, when each of `packages` is in it.
fn node_modules(packages: &[&str]) -> Option<PathBuf> {
    let nm = npm_tools().join("node_modules");
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !nm.join(p).join("package.json").is_file()).collect();
    let what = format!("npm packages {} (tests/fixtures/realtools/package.json, in {})", missing.join(", "), nm.display());
    have(&what, missing.is_empty()).then_some(nm)
}

/// `jupyter` of the Python that `python3` runs, with jupyter_server importable.
fn jupyter() -> Option<PathBuf> {
    let path = Command::new("python3")
        .args([
            "-c",
            // one statement a line: a `\` line continuation would eat the indentation
            "import jupyter_server, os, shutil, sysconfig\n\
dirs = (sysconfig.get_path('scripts'), sysconfig.get_path('scripts', os.name + '_user'))\n\
found = [os.path.join(d, 'jupyter') for d in dirs if os.access(os.path.join(d, 'jupyter'), os.X_OK)]\n\
print((found or [shutil.which('jupyter') or ''])[0])",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| text(&o.stdout).trim().to_string())
        .filter(|p| !p.is_empty());
    have("Jupyter Server (pip install jupyter_server)", path.is_some());
    path.map(PathBuf::from)
}

/// A project folder in the world: `files` (a `package.json` among them), and the installed
/// npm packages as its `node_modules`.
fn project(w: &World, name: &str, nm: &Path, files: &[(&str, &str)]) -> PathBuf {
    let dir = w.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(nm, dir.join("node_modules")).unwrap();
    for (file, content) in files {
        std::fs::write(dir.join(file), content).unwrap();
    }
    dir
}

/// `styxy-preload exec --session SESSION OPTIONS… -- CMD…` in `dir`, as a person runs a tool.
fn exec(w: &World, session: &str, options: &[&str], dir: &Path, cmd: &[&str]) -> Command {
    let mut c = w.cli();
    c.args(["exec", "--session", session])
        .args(options)
        .arg("--")
        .args(cmd)
        .current_dir(dir)
        // never install what is missing from the registry, never ask it about npm updates
        .env("NPM_CONFIG_YES", "false")
        .env("NPM_CONFIG_UPDATE_NOTIFIER", "false")
        .env("NEXT_TELEMETRY_DISABLED", "1")
        // the tools behave the same with and without CI (Playwright, Next and npm read it)
        .env_remove("CI");
    c
}

/// GET from outside any session, on IPv4 or IPv6 loopback (tools bind `localhost` as
/// their resolver orders it).
fn get(port: u16, path: &str) -> Option<String> {
    http_get("127.0.0.1", port, path).or_else(|| http_get("::1", port, path))
}

/// The port of the first `prefix<port>` in `text` (a printed URL).
fn printed_port(text: &str, prefix: &str) -> Option<u16> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())].parse().ok()
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

/// Every process below the given ones, killed when the test ends (pass or fail) — before
/// the world kills their process groups: tools start helpers of their own process group
/// (Playwright's `webServer` and browser), which would otherwise be orphaned and keep
/// their ports.
struct Reaper(Vec<u32>);

fn descendants(pid: u32, out: &mut Vec<u32>) {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        for c in std::fs::read_to_string(task.path().join("children")).unwrap_or_default().split_whitespace() {
            if let Ok(c) = c.parse() {
                out.push(c);
                descendants(c, out);
            }
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let mut all = Vec::new();
        for p in &self.0 {
            descendants(*p, &mut all);
        }
        for p in all {
            // SAFETY: kill(2) of a process this test started (a descendant of its own child).
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
    }
}

/// GET `url` from inside `session` (`exec … python3`): what that session's programs reach.
fn get_in_session(w: &World, session: &str, url: &str) -> String {
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", session, "--", "python3", "-c"])
        .arg(format!("import urllib.request; print(urllib.request.urlopen('{url}', timeout=120).read().decode())"));
    let out = run(c);
    assert!(out.status.success(), "GET {url} in {session}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Bind events of `session` that count (a start: kept, remapped, passed through, failed),
/// not observations (probes, twins).
fn starts(w: &World, session: &str) -> Vec<Event> {
    w.events().into_iter().filter(|e| e.session.as_deref() == Some(session) && e.call == "bind" && e.action != Action::Observed).collect()
}

#[test]
fn two_jupyter_servers_each_print_the_url_they_serve() {
    let Some(jupyter) = jupyter() else { return };
    let mut w = World::new();
    let mut reaper = Reaper(Vec::new());
    w.start_daemon();
    let mut ports = Vec::new();
    // C names the port: exec hands it the session's port in its place
    for who in ["A", "B", "C"] {
        let dir = w.path(who);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("notebook-of-{who}.txt")), who).unwrap();
        let jupyter = jupyter.to_str().unwrap();
        let mut cmd = vec![jupyter, "server", "--no-browser", "--allow-root", "--IdentityProvider.token=", "--ServerApp.password="];
        if who == "C" {
            cmd.extend(["--port", "8888"]);
        }
        let c = exec(&w, &format!("jup-{who}"), &[], &dir, &cmd);
        let pid = w.spawn(c, who);
        reaper.0.push(pid);
        let port = wait_for(60, "Jupyter's URL", || printed_port(&w.stderr_of(who), "http://127.0.0.1:"));
        assert_eq!(printed_port(&w.stderr_of(who), "http://localhost:"), Some(port), "{}", w.stderr_of(who));
        let served = wait_for(20, "Jupyter listening", || Some(tree_ports(pid)).filter(|p| !p.is_empty()));
        assert!(served.contains(&port), "{who} prints port {port} but listens on {served:?}:\n{}", w.stderr_of(who));
        // the printed URL, opened from outside any session, is this session's server
        let listing = wait_for(20, "the printed URL answers", || get(port, "/api/contents"));
        assert!(listing.contains(&format!("notebook-of-{who}.txt")), "{who}'s URL reached another server: {listing}");
        ports.push(port);
    }
    assert_eq!(ports[0], 8888);
    assert_ne!(ports[1], 8888, "B printed the URL A serves");
    assert!(ports[2] != 8888 && ports[2] != ports[1], "C: {ports:?}");
    assert!(w.stderr_of("B").contains("is already in use, trying another port"), "{}", w.stderr_of("B"));
}

#[test]
fn two_http_servers_each_print_the_url_they_serve() {
    let Some(nm) = node_modules(&["http-server"]) else { return };
    let mut w = World::new();
    let mut reaper = Reaper(Vec::new());
    w.start_daemon();
    let mut ports = Vec::new();
    // C names its port (-p 8080): exec hands it the session's port in its place
    for who in ["A", "B", "C"] {
        let dir = project(&w, who, &nm, &[("package.json", r#"{"private": true}"#)]);
        std::fs::create_dir_all(dir.join("site")).unwrap();
        std::fs::write(dir.join("site/who.txt"), who).unwrap();
        let mut cmd = vec!["npx", "http-server", "site", "-c-1"];
        if who == "C" {
            cmd.extend(["-p", "8080"]);
        }
        let pid = w.spawn(exec(&w, &format!("hs-{who}"), &[], &dir, &cmd), who);
        reaper.0.push(pid);
        let port = wait_for(60, "http-server's URL", || printed_port(&w.output_of(who), "http://127.0.0.1:"));
        let served = wait_for(20, "http-server listening", || Some(tree_ports(pid)).filter(|p| !p.is_empty()));
        assert!(served.contains(&port), "{who} prints port {port} but listens on {served:?}:\n{}", w.output_of(who));
        assert_eq!(get(port, "/who.txt").as_deref(), Some(who), "{who}'s printed URL reached another server");
        ports.push(port);
    }
    assert_eq!(ports[0], 8080);
    assert_ne!(ports[1], 8080, "B printed the URL A serves");
    assert!(ports[2] != 8080 && ports[2] != ports[1], "C: {ports:?}");
    for who in ["B", "C"] {
        assert!(!w.stderr_of(who).contains("is taken;"), "{who} printed where it serves, no notice needed: {}", w.stderr_of(who));
    }
}

/// A server on the port get-port answers (`RANGE` set: the first free one of 3000–3099).
const GET_PORT_JS: &str = "import http from 'node:http';
import getPort, { portNumbers } from 'get-port';
const port = await getPort({ port: process.env.RANGE ? portNumbers(3000, 3099) : 3000 });
http.createServer((q, r) => r.end(process.env.WHO)).listen(port, () => console.log(`get-port answered ${port}`));
";

#[test]
fn get_port_in_b_answers_a_port_b_then_gets() {
    let Some(nm) = node_modules(&["get-port"]) else { return };
    let mut w = World::new();
    let mut reaper = Reaper(Vec::new());
    w.start_daemon();
    // a project that finds its port with get-port: exec lets its own fallback happen
    let package = r#"{"private": true, "type": "module", "dependencies": {"get-port": "7.2.0"}}"#;
    let dir = project(&w, "app", &nm, &[("package.json", package), ("server.mjs", GET_PORT_JS)]);
    let mut answers = Vec::new();
    for (who, range) in [("A", false), ("B", false), ("C", true)] {
        let mut c = exec(&w, &format!("gp-{who}"), &[], &dir, &["node", "server.mjs"]);
        c.env("WHO", who);
        if range {
            c.env("RANGE", "1");
        }
        let pid = w.spawn(c, who);
        reaper.0.push(pid);
        let port = wait_for(30, "get-port's answer", || printed_port(&w.output_of(who), "get-port answered "));
        let served = tree_ports(pid);
        assert_eq!(served.into_iter().collect::<Vec<_>>(), [port], "{who}: get-port answered {port}:\n{}", w.stderr_of(who));
        assert_eq!(get(port, "/").as_deref(), Some(who));
        assert!(!w.stderr_of(who).contains("is taken;"), "{}", w.stderr_of(who));
        answers.push(port);
    }
    assert_eq!(answers[0], 3000);
    assert_ne!(answers[1], 3000, "get-port in B answered the port A holds");
    assert!((3001..3100).contains(&answers[2]), "C: {}", answers[2]);
    // where the tool went is its session's 3000
    assert_eq!(get_in_session(&w, "gp-C", "http://127.0.0.1:3000/").trim(), "C");
    assert_eq!(get_in_session(&w, "gp-A", "http://127.0.0.1:3000/").trim(), "A");
}

#[test]
fn next_dev_twice_each_session_reaches_its_own_app_and_the_move_is_one_event_one_notice() {
    let Some(nm) = node_modules(&["next", "react", "react-dom"]) else { return };
    let mut w = World::new();
    let mut reaper = Reaper(Vec::new());
    w.start_daemon();
    let mut pids = Vec::new();
    for who in ["A", "B"] {
        let page = format!("export default function Page() {{ return <h1>next-of-{who}</h1>; }}\n");
        let dir = project(&w, who, &nm, &[("package.json", r#"{"private": true}"#)]);
        std::fs::create_dir_all(dir.join("app")).unwrap();
        std::fs::write(dir.join("app/page.js"), page).unwrap();
        std::fs::write(
            dir.join("app/layout.js"),
            "export default function Layout({ children }) { return <html><body>{children}</body></html>; }\n",
        )
        .unwrap();
        let pid = w.spawn(exec(&w, &format!("next-{who}"), &[], &dir, &["npx", "next", "dev"]), who);
        reaper.0.push(pid);
        let port = wait_for(90, "next dev's URL", || printed_port(&w.output_of(who), "http://localhost:"));
        let served = wait_for(30, "next dev listening", || Some(tree_ports(pid)).filter(|p| !p.is_empty()));
        assert!(served.contains(&port), "{who} prints port {port} but listens on {served:?}:\n{}", w.output_of(who));
        pids.push((pid, port));
    }
    assert_eq!(pids[0].1, 3000);
    assert_ne!(pids[1].1, 3000);
    // localhost:3000 from inside each session is that session's app
    for who in ["A", "B"] {
        let page = get_in_session(&w, &format!("next-{who}"), "http://localhost:3000/");
        assert!(page.contains(&format!("next-of-{who}")), "session {who} reached another app: {page}");
    }
    // one start each: A kept 3000, B was moved once, said once
    let a = starts(&w, "next-A");
    assert!(a.len() == 1 && a[0].action == Action::Kept && a[0].port == 3000, "{a:#?}");
    let b = starts(&w, "next-B");
    assert_eq!(b.len(), 1, "{b:#?}");
    assert_eq!((b[0].action, b[0].requested_port, b[0].port), (Action::Remapped, 3000, pids[1].1), "{b:#?}");
    let err = w.stderr_of("B");
    let notices: Vec<&str> = err.lines().filter(|l| l.contains("is taken;")).collect();
    assert_eq!(notices.len(), 1, "{err}");
    assert!(notices[0].starts_with("styxy-preload: port 3000 is taken; ") && notices[0].ends_with(&format!(" got {}", pids[1].1)), "{err}");
    assert!(!w.stderr_of("A").contains("is taken;"), "{}", w.stderr_of("A"));
}

/// A Vite project whose page says `marker`; its dependency cache its own.
fn vite_project(w: &World, name: &str, nm: &Path, marker: &str) -> PathBuf {
    let html = format!("<!doctype html><html><head><title>{marker}</title></head><body><h1>{marker}</h1></body></html>\n");
    let config = "export default { cacheDir: 'vite-cache', clearScreen: false };\n";
    project(w, name, nm, &[("package.json", r#"{"private": true}"#), ("index.html", &html), ("vite.config.mjs", config)])
}

#[test]
fn vite_preview_is_a_dev_server_and_with_strict_port_is_moved_not_failed() {
    let Some(nm) = node_modules(&["vite"]) else { return };
    let mut w = World::new();
    let mut reaper = Reaper(Vec::new());
    w.start_daemon();
    let mut pids = Vec::new();
    // A: vite preview on its default; B: --strictPort, which turns Vite's own fallback off
    for (who, strict) in [("A", false), ("B", true)] {
        let dir = vite_project(&w, who, &nm, &format!("preview-of-{who}"));
        assert!(run(exec(&w, &format!("build-{who}"), &["--quiet"], &dir, &["npx", "vite", "build"])).status.success());
        let cmd: &[&str] = if strict { &["npx", "vite", "preview", "--strictPort"] } else { &["npx", "vite", "preview"] };
        let pid = w.spawn(exec(&w, &format!("pv-{who}"), &[], &dir, cmd), who);
        reaper.0.push(pid);
        wait_for(60, "vite preview listening", || Some(tree_ports(pid)).filter(|p| !p.is_empty()));
        pids.push(pid);
    }
    assert!(tree_ports(pids[0]).contains(&4173));
    assert!(!w.finished(pids[1]), "B's vite preview --strictPort ended: {}{}", w.output_of("B"), w.stderr_of("B"));
    assert!(!tree_ports(pids[1]).contains(&4173));
    for who in ["A", "B"] {
        let page = get_in_session(&w, &format!("pv-{who}"), "http://127.0.0.1:4173/");
        assert!(page.contains(&format!("preview-of-{who}")), "session {who} reached another preview: {page}");
    }
    let (_, v) = w.json("GET", "/allocations", None);
    let a = v["allocations"].as_array().unwrap().iter().find(|a| a["port"] == 4173).cloned().unwrap_or_default();
    assert_eq!(a["service_type"], "dev", "{v:#}");
}

#[test]
fn a_second_vite_does_not_take_3000_while_3001_to_3099_are_free() {
    let Some(nm) = node_modules(&["vite"]) else { return };
    let mut w = World::new();
    let mut reaper = Reaper(Vec::new());
    w.start_daemon();
    // B: as exec runs Vite (its own fallback); C: moved by the library (--mode coordinate)
    let mut ports = Vec::new();
    for (who, mode) in [("A", None), ("B", None), ("C", Some("coordinate"))] {
        let dir = vite_project(&w, who, &nm, &format!("vite-of-{who}"));
        let options: &[&str] = if let Some(m) = mode { &["--mode", m] } else { &[] };
        let pid = w.spawn(exec(&w, &format!("vite-{who}"), options, &dir, &["npx", "vite"]), who);
        reaper.0.push(pid);
        let port = wait_for(60, "Vite's URL", || printed_port(&w.output_of(who), "http://localhost:"));
        let served = wait_for(20, "Vite listening", || Some(tree_ports(pid)).filter(|p| !p.is_empty()));
        assert!(served.contains(&port) && !served.contains(&3000), "{who} prints {port}, listens on {served:?}:\n{}", w.output_of(who));
        let page = wait_for(20, "the printed URL answers", || get(port, "/"));
        assert!(page.contains(&format!("vite-of-{who}")), "{who}'s printed URL reached another server: {page}");
        ports.push(port);
    }
    assert_eq!(ports[0], 5173);
    assert_eq!(ports[1], 5174, "B fell back by itself to the next port");
    assert_eq!(ports[2], 5175, "C was moved where Vite itself would go next, not into the dev range");
    assert!(!listened(3000), "a Vite took 3000");
    let err = w.stderr_of("C");
    assert_eq!(err.matches("is taken;").count(), 1, "{err}");
    assert!(err.contains("port 5173 is taken; ") && err.contains(&format!(" got {}", ports[2])), "{err}");
}

/// Playwright Test against a Vite `webServer` on 5173 with Debian's chromium. The test
/// checks its suite's page, says so (`CHECKED`), and holds its server until `GO` exists,
/// so the two suites run at once.
const PLAYWRIGHT_CONFIG: &str = "import { defineConfig } from '@playwright/test';
export default defineConfig({
  testDir: '.',
  testMatch: 'marker.spec.mjs',
  reporter: 'line',
  workers: 1,
  retries: 0,
  timeout: 150000,
  use: {
    baseURL: 'http://localhost:5173',
    headless: true,
    launchOptions: {
      executablePath: '/usr/bin/chromium',
      args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    },
  },
  webServer: { command: 'npx vite --port 5173', url: 'http://localhost:5173', reuseExistingServer: false, timeout: 90000 },
});
";

const PLAYWRIGHT_SPEC: &str = "import { test, expect } from '@playwright/test';
import fs from 'node:fs';
test('the page is this suite\\'s', async ({ page }) => {
  await page.goto('/');
  await expect(page.locator('h1')).toHaveText(`suite-${process.env.SUITE}`);
  fs.writeFileSync(process.env.CHECKED, '');
  await expect.poll(() => fs.existsSync(process.env.GO), { timeout: 120000 }).toBe(true);
  await page.reload();
  await expect(page.locator('h1')).toHaveText(`suite-${process.env.SUITE}`);
});
";

#[test]
fn two_playwright_suites_with_a_vite_web_server_pass_at_once_each_on_its_own_page() {
    let Some(nm) = node_modules(&["@playwright/test", "vite"]) else { return };
    if !have("Debian's chromium (/usr/bin/chromium: apt-get install chromium)", Path::new("/usr/bin/chromium").exists()) {
        return;
    }
    let mut w = World::new();
    let mut reaper = Reaper(Vec::new());
    w.start_daemon();
    let go = w.path("go");
    let mut pids = Vec::new();
    for who in ["A", "B"] {
        let dir = vite_project(&w, who, &nm, &format!("suite-{who}"));
        std::fs::write(dir.join("playwright.config.mjs"), PLAYWRIGHT_CONFIG).unwrap();
        std::fs::write(dir.join("marker.spec.mjs"), PLAYWRIGHT_SPEC).unwrap();
        let checked = w.path(&format!("checked-{who}"));
        let mut c = exec(&w, &format!("pw-{who}"), &[], &dir, &["npx", "playwright", "test"]);
        c.env("SUITE", who).env("CHECKED", &checked).env("GO", &go);
        let pid = w.spawn(c, who);
        reaper.0.push(pid);
        // B starts while A's server holds 5173 and A's browser is on its page
        wait_for(180, "the suite's page checked", || {
            assert!(!w.finished(pid), "suite {who} ended early:\n{}\n{}", w.output_of(who), w.stderr_of(who));
            checked.exists().then_some(())
        });
        pids.push(pid);
    }
    std::fs::write(&go, "").unwrap();
    for (who, pid) in ["A", "B"].into_iter().zip(pids) {
        let status = wait_for(120, "the suite's end", || w.exit_status(pid));
        let out = w.output_of(who) + &w.stderr_of(who);
        assert!(status.success() && out.contains("1 passed"), "suite {who}: {status}\n{out}");
    }
    // the moved run said where its server went, in Playwright's own output ([WebServer])
    let b = w.output_of("B") + &w.stderr_of("B");
    let notice = b.lines().find(|l| l.contains("port 5173 is taken;")).unwrap_or_else(|| panic!("no notice in B's output:\n{b}"));
    let got = notice.rsplit(" got ").next().and_then(|p| p.trim().parse::<u16>().ok());
    assert!(got.is_some_and(|p| p != 5173), "{notice}");
    assert!(notice.contains("[WebServer]"), "the notice came through Playwright's webServer: {notice}");
    let a = w.output_of("A") + &w.stderr_of("A");
    assert!(!a.contains("is taken;"), "{a}");
}
