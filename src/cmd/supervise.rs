//! `styxy-preload supervise PROGRAM ARGV0 ARGS…`: what the library runs in place of a
//! program it cannot reach (statically linked, or Go: raw syscalls), so that program runs
//! under the seccomp supervisor wherever it starts — under `exec` at any depth, under
//! `env`. docs/ARCHITECTURE.md "Programs the library cannot reach".
//!
//! Three processes: this one (the *relay*, the pid the caller knows) forks the
//! *supervisor*, whose child is the program under the filter. The relay forwards the
//! signals sent to it and ends as the program ends (same exit code, or the same signal).
//! The supervisor is the program's parent (an ancestor, as Yama wants for `pidfd_getfd`)
//! and stays while any process of the program's tree still uses the filter, so a
//! program that daemonises returns to its caller at once and its servers keep working.
//! Nobody outlives the one before silently: the supervisor dies with the relay while the
//! program runs, and the program with the supervisor (`PR_SET_PDEATHSIG`).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;

use signal_hook::consts::{SIGALRM, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::SignalsInfo;
use signal_hook::low_level::siginfo::Cause;
use styxy_preload_common::envvars;
use styxy_preload_core::process::seccomp_filters;

use crate::cli::SuperviseArgs;
use crate::seccomp;

/// The signals the relay passes on to the program (and the supervisor survives).
const FORWARDED: [i32; 7] = [SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGALRM];

pub fn run(a: SuperviseArgs) -> Result<i32, String> {
    let name = a.program.to_string_lossy().into_owned();
    let mut argv = a.argv;
    if argv.is_empty() {
        argv.push(a.program.clone());
    }
    if let Some(why) = impossible(&a.program) {
        eprintln!("styxy-preload: {name} is not coordinated: {why}");
        return Ok(plain(&a.program, &argv, &name));
    }
    let (rd, wr) = pipe()?;
    let relay = std::process::id() as i32;
    // SAFETY: no thread exists yet in this process (clap only parsed arguments), so the
    // child may go on with std as a process of its own.
    match unsafe { libc::fork() } {
        -1 => Err(format!("cannot start the supervisor: {}", std::io::Error::last_os_error())),
        0 => {
            drop(rd);
            std::process::exit(supervisor(&a.program, &argv, &name, wr, relay))
        }
        _ => {
            drop(wr);
            Ok(relay_until_done(rd, &name))
        }
    }
}

/// Why the program cannot be supervised here, checked before anything starts.
fn impossible(program: &std::ffi::OsStr) -> Option<String> {
    if let Ok(m) = std::fs::metadata(program) {
        if m.mode() & (libc::S_ISUID | libc::S_ISGID) != 0 {
            return Some("it is setuid or setgid, and the seccomp filter needs no_new_privs, which would drop its privileges".into());
        }
    }
    seccomp::unavailable()
}

/// Runs the program in this process, as the caller meant to: only returns when that fails.
/// The `execve` syscall itself, not libc's (which the library in this process hooks, and
/// would hand the program back to `supervise`), and without `STYXY_PRELOAD_CLI`: what
/// makes supervision impossible here does for the program's tree too, and a dynamically
/// linked Go program would otherwise start `supervise` again as it loads.
fn plain(program: &std::ffi::OsStr, argv: &[OsString], name: &str) -> i32 {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |s: &std::ffi::OsStr| CString::new(s.as_bytes()).unwrap_or_default();
    let env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != envvars::DISABLE && k != envvars::CLI)
        .map(|(k, v)| c(&[k.as_os_str(), v.as_os_str()].join(std::ffi::OsStr::new("="))))
        .collect();
    let args: Vec<CString> = argv.iter().map(|a| c(a)).collect();
    let ptrs = |v: &[CString]| v.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect::<Vec<_>>();
    let (path, args_p, env_p) = (c(program), ptrs(&args), ptrs(&env));
    // SAFETY: SIGPIPE back to its default (Rust's runtime ignores it, and an ignored signal
    // stays ignored across execve: std's spawn resets it too); then NUL-terminated strings
    // and NULL-terminated arrays of them, alive during the call.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::syscall(libc::SYS_execve, path.as_ptr(), args_p.as_ptr(), env_p.as_ptr());
    }
    not_started(name, &std::io::Error::last_os_error())
}

/// A program that could not be started: said as a shell would, with its exit code.
fn not_started(name: &str, e: &std::io::Error) -> i32 {
    let (code, what) = match e.kind() {
        std::io::ErrorKind::NotFound => (127, "command not found"),
        std::io::ErrorKind::PermissionDenied => (126, "permission denied"),
        _ => (126, "cannot execute"),
    };
    eprintln!("styxy-preload: {name}: {what}");
    code
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: a valid out-array of two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("cannot start the supervisor: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: two fresh fds we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The relay's report from the supervisor: the program's pid (or, negated, the exit code
/// of a program that did not start), then its wait status.
fn read_word(r: &mut std::fs::File) -> Option<i32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).ok().map(|_| i32::from_ne_bytes(b))
}

/// The relay: forwards signals to the program, and ends as it ended.
fn relay_until_done(report: OwnedFd, name: &str) -> i32 {
    let mut report = std::fs::File::from(report);
    let signals = SignalsInfo::<WithOrigin>::new(FORWARDED).ok();
    let pid = match read_word(&mut report) {
        Some(p) if p > 0 => p,
        Some(code) => return -code,
        None => {
            eprintln!("styxy-preload: the supervisor of {name} ended before it");
            return 1;
        }
    };
    // the forwarding thread ends with this process (nothing to wait for)
    if let Some(s) = signals {
        std::thread::spawn(move || forward(s, pid));
    }
    match read_word(&mut report) {
        Some(s) if libc::WIFSIGNALED(s) => die_of(libc::WTERMSIG(s)),
        Some(s) => libc::WEXITSTATUS(s),
        None => {
            eprintln!("styxy-preload: the supervisor of {name} ended before it");
            1
        }
    }
}

/// Passes on the signals a process sent (a terminal's ^C already reached the program:
/// same process group).
fn forward(mut signals: SignalsInfo<WithOrigin>, pid: i32) {
    for origin in signals.forever() {
        if !matches!(origin.cause, Cause::Kernel) {
            // SAFETY: kill(2) of the program (our grandchild) with the signal we got.
            unsafe { libc::kill(pid, origin.signal) };
        }
    }
}

/// Ends this process with the signal that ended the program, as its caller would have seen it.
fn die_of(sig: i32) -> i32 {
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain calls on this process: no core file (the program left its own), the
    // default action, the signal.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
    128 + sig
}

extern "C" fn ignore(_: libc::c_int) {}

/// The supervisor process: starts the program under the filter, reports to the relay,
/// and serves the filter until its last user is gone. Returns its own exit code.
fn supervisor(program: &std::ffi::OsStr, argv: &[OsString], name: &str, report: OwnedFd, relay: i32) -> i32 {
    // while the program runs, the relay's death (SIGKILL) is the supervisor's, so the
    // program's too: killing the pid the caller knows ends the program, as without us
    // SAFETY: prctl and getppid on ourselves.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != relay } {
        return 1;
    }
    for sig in FORWARDED {
        // SAFETY: a handler that does nothing (reset to the default in the program by execve):
        // the program decides how it ends, and the supervisor must outlive it.
        unsafe { libc::signal(sig, ignore as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
    let mut report = std::fs::File::from(report);
    let mut cmd = Command::new(program);
    cmd.arg0(&argv[0]).args(&argv[1..]).env_remove(envvars::DISABLE);
    let mut extra = std::collections::BTreeMap::new();
    extra.insert(envvars::SUPERVISED.to_string(), (seccomp_filters() + 1).to_string());
    cmd.envs(&extra);
    // connect is trapped only where the session's connects are routed
    let connect = std::env::var_os(envvars::SESSION).is_some_and(|s| !s.is_empty());
    let prepared = match seccomp::prepare(&mut cmd, &extra, connect) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("styxy-preload: {name} is not coordinated: {e}");
            cmd.env_remove(envvars::SUPERVISED).env_remove(envvars::CLI);
            None
        }
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = report.write_all(&(-not_started(name, &e)).to_ne_bytes());
            return 0;
        }
    };
    let _ = report.write_all(&(child.id() as i32).to_ne_bytes());
    let supervisor = prepared.and_then(|p| match p.start() {
        Ok(s) => Some(s),
        Err(why) => {
            if !why.contains("outer") {
                eprintln!("styxy-preload: {name} is not coordinated: {why}");
            }
            None
        }
    });
    let status = child.wait().map_or(1 << 8, |s| s.into_raw());
    // the program has ended: the relay may end now, the tree's rest still needs us
    // SAFETY: prctl on ourselves.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0) };
    let _ = report.write_all(&status.to_ne_bytes());
    drop(report);
    if let Some(s) = supervisor {
        if !seccomp::orphans().is_empty() {
            detach_stdio();
        }
        s.wait_for_tree();
    }
    0
}

/// Once the program has ended, the supervisor keeps none of its caller's pipes open (a
/// caller reading the program's output until EOF would wait for it).
fn detach_stdio() {
    let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: dup2 of an fd we own onto our own standard fds.
        unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
    }
}
