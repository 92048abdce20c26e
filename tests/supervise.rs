//! Static and Go programs coordinated wherever they start, without a flag: the library
//! runs them under the seccomp supervisor (`styxy-preload supervise`) when a shell, npx,
//! make or node starts them inside `exec`, and when they are started in a shell set up
//! with `eval "$(styxy-preload env)"`. Each runs twice, in two sessions: the second
//! session's server is moved and serves, its connects to the asked-for port reach it, and
//! nobody reaches the other session's server. Also: a supervised program never outlives
//! its supervisor with `ENOSYS`, and the supervisor acts on the address it checked.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A shell command run by `sh -c` inside `exec --session S` (no `--seccomp`), with the
/// fixtures' directory first on PATH; its pid.
fn in_exec(w: &mut World, session: &str, script: &str, name: &str) -> u32 {
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", session, "--", "sh", "-c", script]).env("PATH", path_with(&go_fixture("goserver")));
    w.spawn(c, name)
}

/// A bash that evaluates `styxy-preload env --session S` and then runs `script`: the
/// library is in what the shell starts, not in the shell itself.
fn in_env_shell(w: &mut World, session: &str, script: &str, name: &str, cwd: &Path) -> u32 {
    let mut c = w.cmd("bash");
    let setup = format!("eval \"$('{}' env --session {session})\" && {script}", bin().display());
    c.args(["-c", &setup]).current_dir(cwd).env("PATH", path_with(&go_fixture("goserver")));
    w.spawn(c, name)
}

/// PATH with `program`'s directory first.
fn path_with(program: &Path) -> String {
    format!("{}:{}", program.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default())
}

/// `GET /` on 127.0.0.1:`port` from a process of `session` (python3, which the library
/// routes): the body, or `connect-error ERRNO`.
fn get_in(w: &World, session: &str, port: u16) -> String {
    const GET: &str = "import socket, sys
try:
    s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)
except OSError as e:
    sys.exit(print('connect-error', e.errno))
s.sendall(b'GET / HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n')
data = b''
while chunk := s.recv(65536):
    data += chunk
print('body', data.partition(b'\\r\\n\\r\\n')[2].decode(errors='replace'))
";
    let mut c = w.preloaded(Some(session), "python3");
    c.args(["-c", GET, &port.to_string()]);
    text(&run(c).stdout).trim().to_string()
}

/// The server of session `a` got `port`, the server of `b` another one; each serves its
/// own page; inside each session a connect to `port` reaches that session's server; a
/// third session reaches neither, and neither reaches the other's.
/// Each side: the session, the name its output files have, the pid, a piece of its page.
fn assert_two_sessions(w: &World, port: u16, (a, out_a, pid_a, body_a): Side, (b, out_b, pid_b, body_b): Side) {
    let pa = wait_for(30, "session A's server", || tree_ports(pid_a).into_iter().next());
    assert_eq!(pa, port, "{}", w.stderr_of(out_a));
    let pb = wait_for(30, "session B's server", || tree_ports(pid_b).into_iter().next());
    assert_ne!(pb, port, "B's server was moved: {}", w.stderr_of(out_b));
    assert!(http_get("127.0.0.1", pb, "/").is_some_and(|body| body.contains(body_b)), "B's server serves on {pb}");
    let refused = format!("connect-error {}", libc::ECONNREFUSED);
    for _round in 0..2 {
        assert!(get_in(w, b, port).contains(body_b), "in session B, {port} reaches B's server");
        assert!(get_in(w, a, port).contains(body_a), "in session A, {port} reaches A's server");
        assert_eq!(get_in(w, "third", port), refused, "another session reaches neither");
        assert_eq!(get_in(w, "third", pb), refused);
        assert_eq!(get_in(w, a, pb), refused, "A does not reach B's server");
    }
    assert!(w.stderr_of(out_b).contains(&format!("port {port} is taken")), "{}", w.stderr_of(out_b));
}

type Side<'a> = (&'a str, &'a str, u32, &'a str);

#[test]
fn a_go_server_started_by_sh_inside_exec_is_moved_and_isolated() {
    let mut w = World::new();
    let a = in_exec(&mut w, "go-a", "goserver 8080 gopher-a; echo ended", "go-a");
    wait_for(30, "A's server", || tree_ports(a).into_iter().next());
    let b = in_exec(&mut w, "go-b", "goserver 8080 gopher-b; echo ended", "go-b");
    assert_two_sessions(&w, 8080, ("go-a", "go-a", a, "gopher-a"), ("go-b", "go-b", b, "gopher-b"));
    // the server itself, asking for its own port, reached itself
    let me = wait_for(10, "B's request to itself", || w.output_of("go-b").lines().find(|l| l.starts_with("self")).map(str::to_string));
    assert_eq!(me, "self gopher-b", "{}", w.stderr_of("go-b"));
}

/// The npm packages scripts/test.sh installs (tests/fixtures/realtools/package.json).
fn npm_tools() -> PathBuf {
    std::env::var_os("STYXY_TEST_NPM_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("npm-tools"))
}

#[test]
fn npx_esbuild_serve_under_exec_is_moved_and_isolated() {
    let tools = npm_tools();
    if !tools.join("node_modules/esbuild/package.json").is_file() {
        return missing(&format!("npm package esbuild (tests/fixtures/realtools/package.json, in {})", tools.display()));
    }
    let mut w = World::new();
    let mut pids = vec![];
    for who in ["esbuild-a", "esbuild-b"] {
        let www = w.path(who);
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), format!("page of {who}\n")).unwrap();
        // esbuild serves while its stdin is open: a pipe from a sleep
        let mut c = w.cli();
        let npx = format!("sleep 1000 | exec npx --no-install esbuild --servedir='{}' --serve=8000", www.display());
        c.args(["exec", "--quiet", "--session", who, "--", "sh", "-c", &npx]).current_dir(&tools);
        let pid = w.spawn(c, who);
        wait_for(60, who, || tree_ports(pid).into_iter().next());
        pids.push(pid);
    }
    assert_two_sessions(
        &w,
        8000,
        ("esbuild-a", "esbuild-a", pids[0], "page of esbuild-a"),
        ("esbuild-b", "esbuild-b", pids[1], "page of esbuild-b"),
    );
}

#[test]
fn a_go_server_and_hugo_server_in_an_env_shell_are_moved_and_isolated() {
    let mut w = World::new();
    let cwd = w.path("home");
    let a = in_env_shell(&mut w, "env-a", "goserver 8080 gopher-a", "env-go-a", &cwd);
    wait_for(30, "A's Go server", || tree_ports(a).into_iter().next());
    let b = in_env_shell(&mut w, "env-b", "goserver 8080 gopher-b", "env-go-b", &cwd);
    assert_two_sessions(&w, 8080, ("env-a", "env-go-a", a, "gopher-a"), ("env-b", "env-go-b", b, "gopher-b"));

    if Command::new("hugo").arg("version").output().is_err() {
        return missing("hugo (apt-get install hugo)");
    }
    let site = w.path("site");
    std::fs::create_dir_all(site.join("layouts")).unwrap();
    std::fs::write(
        site.join("hugo.toml"),
        "baseURL = \"http://localhost/\"\ndisableKinds = [\"taxonomy\", \"term\", \"RSS\", \"sitemap\", \"404\"]\n",
    )
    .unwrap();
    std::fs::write(site.join("layouts/index.html"), "hugo page of {{ getenv \"HUGO_WHO\" }}\n").unwrap();
    let ha = in_env_shell(&mut w, "env-a", "HUGO_WHO=hugo-a hugo server --port 1313", "env-hugo-a", &site);
    wait_for(30, "A's hugo", || tree_ports(ha).into_iter().next());
    let hb = in_env_shell(&mut w, "env-b", "HUGO_WHO=hugo-b hugo server --port 1313", "env-hugo-b", &site);
    assert_two_sessions(&w, 1313, ("env-a", "env-hugo-a", ha, "hugo page of hugo-a"), ("env-b", "env-hugo-b", hb, "hugo page of hugo-b"));
}

/// The parent of `pid`.
fn ppid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok()).unwrap_or(0)
}

/// The static program in `root`'s tree, with its supervisor and relay.
fn supervised_in(root: u32) -> (u32, u32, u32) {
    let program = *descendants(root).iter().find(|p| comm(**p) == "binder-static").expect("the program");
    let supervisor = ppid(program);
    (program, supervisor, ppid(supervisor))
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string()
}

/// Gone, or a zombie nobody reaped yet: either way it makes no call any more.
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
}

#[test]
fn a_supervised_program_ends_with_its_supervisor_and_is_never_left_with_enosys() {
    let mut w = World::new();
    let server = static_fixture("binder");
    // exec --seccomp's own child: exec is SIGKILLed (only exec, not its group)
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", "killed", "--"]).arg(&server).args(["serve", "4040"]);
    let e = w.spawn(c, "killed");
    assert_eq!(wait_for(20, "the server", || tree_ports(e).into_iter().next()), 4040);
    let program = descendants(e)[0];
    // SAFETY: kill(2) of the exec we started.
    unsafe { libc::kill(e as i32, libc::SIGKILL) };
    wait_for(10, "the program to end with its supervisor", || gone(program).then_some(()));
    // the same for a program the library put under `supervise`, whose supervisor is SIGKILLed
    let shell = in_exec(&mut w, "deep", &format!("{} serve 4041", server.display()), "deep");
    assert_eq!(wait_for(20, "the deep server", || tree_ports(shell).into_iter().next()), 4041);
    let (program, supervisor, _) = supervised_in(shell);
    // SAFETY: kill(2) of a process of the tree we started.
    unsafe { libc::kill(supervisor as i32, libc::SIGKILL) };
    wait_for(10, "the program to end with its supervisor", || gone(program).then_some(()));
    // and killing the pid its caller knows (the relay) ends it too, as it would without us
    let shell = in_exec(&mut w, "relay", &format!("{} serve 4042", server.display()), "relay");
    assert_eq!(wait_for(20, "the server", || tree_ports(shell).into_iter().next()), 4042);
    let (program, _, relay) = supervised_in(shell);
    // SAFETY: kill(2) of a process of the tree we started.
    unsafe { libc::kill(relay as i32, libc::SIGKILL) };
    wait_for(10, "the program to end with its relay", || gone(program).then_some(()));
}

#[test]
fn a_thread_flipping_the_address_after_the_check_never_reaches_another_sessions_server() {
    let mut w = World::new();
    let server = static_fixture("binder");
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", "held", "--"]).arg(&server).args(["serve", "8000"]);
    let a = w.spawn(c, "held");
    assert_eq!(wait_for(20, "the held server", || tree_ports(a).into_iter().next()), 8000);
    // 8999: a port nobody holds (its connect is left as asked); 8000: the other session's
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--seccomp", "--session", "racer", "--"]).arg(static_fixture("flip")).args(["8000", "8999", "3000"]);
    let out = run(c);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("refused 3000"),
        "every connect refused (8999: nobody; 8000: another session's): {stdout} {}",
        text(&out.stderr)
    );
    assert!(stdout.contains("reached-held 0"), "{stdout}");
}

#[test]
fn where_supervision_is_impossible_one_line_names_the_program_and_it_runs() {
    let mut w = World::new();
    let server = static_fixture("binder");
    // a kernel or container that refuses seccomp
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", "denied", "--"])
        .arg(fixture("deny"))
        .args(["seccomp", "EPERM", "sh", "-c"])
        .arg(format!("{} serve 4050", server.display()));
    let pid = w.spawn(c, "denied");
    assert_eq!(wait_for(20, "the server", || tree_ports(pid).into_iter().next()), 4050);
    let line = format!("styxy-preload: {} is not coordinated: seccomp is not permitted here", server.display());
    assert_eq!(w.stderr_of("denied").trim_end(), line);
    // a dynamically linked Go program, which would start supervise again as it loads: once
    let goserver = go_fixture("goserver");
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", "denied-go", "--"])
        .arg(fixture("deny"))
        .args(["seccomp", "EPERM", "sh", "-c"])
        .arg(format!("{} 4052 gopher", goserver.display()));
    let pid = w.spawn(c, "denied-go");
    assert_eq!(wait_for(20, "the Go server", || tree_ports(pid).into_iter().next()), 4052, "{}", w.stderr_of("denied-go"));
    let line = format!("styxy-preload: {} is not coordinated: seccomp is not permitted here", goserver.display());
    assert_eq!(w.stderr_of("denied-go").trim_end(), line);
    // a setuid program: the filter's no_new_privs would drop its privileges
    let setuid = w.path("setuid-binder");
    std::fs::copy(&server, &setuid).unwrap();
    std::fs::set_permissions(&setuid, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    let pid = in_exec(&mut w, "setuid", &format!("{} serve 4051", setuid.display()), "setuid");
    assert_eq!(wait_for(20, "the server", || tree_ports(pid).into_iter().next()), 4051);
    let line = format!(
        "styxy-preload: {} is not coordinated: it is setuid or setgid, and the seccomp filter needs no_new_privs, which would drop its privileges",
        setuid.display()
    );
    assert_eq!(w.stderr_of("setuid").trim_end(), line);
}

#[test]
fn a_dynamic_program_is_started_as_it_is() {
    let w = World::new();
    // sh execs grep, and node (execvp) and make (posix_spawn) would do the same: a
    // dynamically linked C program has the library, it gets no filter and no supervise
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", "plain", "--", "sh", "-c", "grep -E '^(Seccomp|PPid):' /proc/self/status; echo \"sh $$\""]);
    let out = text(&run(c).stdout);
    let field = |name: &str| out.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string());
    assert_eq!(field("Seccomp:").as_deref(), Some("0"), "{out}");
    assert_eq!(field("PPid:"), field("sh "), "grep's parent is the shell itself: {out}");
}

#[test]
fn no_seccomp_leaves_a_static_program_deeper_in_the_tree_alone() {
    let mut w = World::new();
    let server = static_fixture("binder");
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--no-seccomp", "--session", "off", "--", "sh", "-c"]).arg(format!("{} serve 4070", server.display()));
    let shell = w.spawn(c, "off");
    assert_eq!(wait_for(20, "the server", || tree_ports(shell).into_iter().next()), 4070);
    let program = *descendants(shell).iter().find(|p| comm(**p) == "binder-static").expect("the program");
    let status = std::fs::read_to_string(format!("/proc/{program}/status")).unwrap();
    assert!(status.lines().any(|l| l == "Seccomp:\t0"), "no filter: {status}");
    let cmdline = |p: u32| std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
    assert!(!descendants(shell).into_iter().any(|p| cmdline(p).split(|b| *b == 0).any(|a| a == b"supervise")), "no supervise in the tree");
}

#[test]
fn exit_status_and_signals_pass_through_the_supervisor() {
    let mut w = World::new();
    let server = static_fixture("binder");
    // the shell sees the program's own exit code
    let mut c = w.cli();
    c.args(["exec", "--quiet", "--session", "codes", "--", "sh", "-c"]).arg(format!("{} nosuch; echo \"code $?\"", server.display()));
    let out = run(c);
    let plain = run({
        let mut c = w.cmd("sh");
        c.arg("-c").arg(format!("{} nosuch; echo \"code $?\"", server.display()));
        c
    });
    assert_eq!(text(&plain.stdout), "code 2\n");
    assert_eq!(text(&out.stdout), text(&plain.stdout), "{}", text(&out.stderr));
    // a signal sent to the pid the caller knows reaches the program, which ends of it
    let shell = in_exec(&mut w, "signals", &format!("{} serve 4060; echo \"status $?\"", server.display()), "signals");
    assert_eq!(wait_for(20, "the server", || tree_ports(shell).into_iter().next()), 4060);
    let (program, _, relay) = supervised_in(shell);
    // SAFETY: kill(2) of a process of the tree we started.
    unsafe { libc::kill(relay as i32, libc::SIGTERM) };
    wait_for(10, "the program to end", || gone(program).then_some(()));
    let status =
        wait_for(10, "the shell's report", || w.output_of("signals").lines().find(|l| l.starts_with("status")).map(str::to_string));
    assert_eq!(status, format!("status {}", 128 + libc::SIGTERM), "the shell saw a death by SIGTERM");
}
