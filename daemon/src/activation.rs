//! How the daemon was started, and socket activation: a listening Unix socket handed
//! over by systemd (or `systemd-socket-activate`) with the `sd_listen_fds` protocol.
//!
//! The protocol: `LISTEN_PID` is our pid, `LISTEN_FDS` counts the sockets passed from
//! fd 3 on (`LISTEN_FDNAMES` names them). The variables are removed once read, whoever
//! they were for, so that nothing we start inherits them. An inherited socket belongs to
//! the service manager: the daemon never unlinks or rebinds its path, and when it exits
//! (idle) the manager keeps listening and starts it again on the next connection.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::OnceLock;

use styxy_preload_common::envvars::DAEMON_LAUNCH;
use styxy_preload_common::sock::sockopt;

/// The first fd of the `sd_listen_fds` protocol.
const LISTEN_FDS_START: RawFd = 3;

/// How this daemon runs; `GET /status` reports it as `run_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Its socket was inherited from systemd (or `systemd-socket-activate`).
    SocketActivated,
    /// Started in the background by the CLI when nothing answered.
    OnDemand,
    /// `styxy-preload daemon run` in a terminal or a script.
    Foreground,
}

impl RunMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RunMode::SocketActivated => "socket-activated",
            RunMode::OnDemand => "on-demand",
            RunMode::Foreground => "foreground",
        }
    }
}

static MODE: OnceLock<RunMode> = OnceLock::new();

/// How the daemon of this process runs (`Foreground` before `take`).
pub fn run_mode() -> RunMode {
    MODE.get().copied().unwrap_or(RunMode::Foreground)
}

/// Reads (and removes) the activation variables; the inherited listening socket, if
/// any, with `CLOEXEC` set. Call before any thread starts: it changes the environment.
pub fn take() -> Result<Option<UnixListener>, String> {
    let launch = std::env::var(DAEMON_LAUNCH).ok();
    let listen_pid = std::env::var("LISTEN_PID").ok();
    let listen_fds = std::env::var("LISTEN_FDS").ok();
    for v in [DAEMON_LAUNCH, "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let inherited = inherited(listen_pid.as_deref(), listen_fds.as_deref())?;
    let mode = match (&inherited, launch.as_deref()) {
        (Some(_), _) => RunMode::SocketActivated,
        (None, Some("on-demand")) => RunMode::OnDemand,
        (None, _) => RunMode::Foreground,
    };
    let _ = MODE.set(mode);
    Ok(inherited)
}

fn inherited(listen_pid: Option<&str>, listen_fds: Option<&str>) -> Result<Option<UnixListener>, String> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    // Not ours: the variables were meant for the process that exec'd us (sd_listen_fds
    // ignores them too).
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let n: RawFd =
        fds.trim().parse().ok().filter(|n| (0..=1024).contains(n)).ok_or_else(|| format!("LISTEN_FDS={fds} is not a count of sockets"))?;
    if n == 0 {
        return Ok(None);
    }
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + n {
        // SAFETY: fcntl on an fd number; an fd that is not open answers EBADF.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(format!("LISTEN_FDS={n} but fd {fd} is not open: {}", std::io::Error::last_os_error()));
        }
    }
    check_listening_unix_stream(LISTEN_FDS_START)?;
    if n > 1 {
        log(&format!("socket activation passed {n} sockets; serving fd {LISTEN_FDS_START}, closing the others"));
        for fd in LISTEN_FDS_START + 1..LISTEN_FDS_START + n {
            // SAFETY: fds the service manager handed to us and nothing else uses.
            unsafe { libc::close(fd) };
        }
    }
    // SAFETY: fd 3 is open, ours (passed to this process only) and owned from here on.
    Ok(Some(unsafe { UnixListener::from_raw_fd(LISTEN_FDS_START) }))
}

fn check_listening_unix_stream(fd: RawFd) -> Result<(), String> {
    let what = |e: std::io::Error| format!("socket activation: fd {fd} is not a socket ({e})");
    let domain = sockopt(fd, libc::SO_DOMAIN).map_err(what)?;
    let kind = sockopt(fd, libc::SO_TYPE).map_err(what)?;
    let listening = sockopt(fd, libc::SO_ACCEPTCONN).map_err(what)?;
    if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM || listening == 0 {
        return Err(format!(
            "socket activation: fd {fd} is not a listening Unix stream socket (domain {domain}, type {kind}, listening {}); \
             use ListenStream=%t/styxy-preload/daemon.sock in the socket unit",
            listening != 0
        ));
    }
    Ok(())
}

/// The listener to serve: the inherited one, or a fresh socket bound at `sock` (mode
/// 0600, a stale file from a dead daemon replaced: the caller holds the per-user lock).
pub fn listener(inherited: Option<UnixListener>, sock: &Path) -> Result<UnixListener, String> {
    let l = match inherited {
        Some(l) => {
            let at = l.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf));
            match at {
                Some(p) if p == sock => log(&format!("socket-activated on {}", p.display())),
                Some(p) => log(&format!(
                    "socket-activated on {}, not the default {}: clients need STYXY_URL=unix:{}",
                    p.display(),
                    sock.display(),
                    p.display()
                )),
                None => log("socket-activated on an unnamed socket: clients need its path in STYXY_URL"),
            }
            l
        }
        None => {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::remove_file(sock);
            let l = UnixListener::bind(sock).map_err(|e| format!("cannot bind {}: {e}", sock.display()))?;
            std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("cannot chmod {}: {e}", sock.display()))?;
            l
        }
    };
    l.set_nonblocking(true).map_err(|e| format!("cannot configure {}: {e}", sock.display()))?;
    Ok(l)
}

/// Removes the socket when dropped (the daemon's exit, or a start that failed after
/// binding it), unless the service manager owns it.
pub struct Released<'a>(pub &'a Path);

impl Drop for Released<'_> {
    fn drop(&mut self) {
        if run_mode() != RunMode::SocketActivated {
            let _ = std::fs::remove_file(self.0);
        }
    }
}

fn log(msg: &str) {
    eprintln!("{} styxy-preload daemon: {msg}", humantime::format_rfc3339_seconds(std::time::SystemTime::now()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn variables_for_another_process_are_ignored() {
        assert!(inherited(Some("1"), Some("1")).unwrap().is_none());
        assert!(inherited(None, Some("1")).unwrap().is_none());
        assert!(inherited(Some(&std::process::id().to_string()), None).unwrap().is_none());
    }

    #[test]
    fn a_bad_count_is_a_clear_error() {
        let me = std::process::id().to_string();
        let e = inherited(Some(&me), Some("many")).unwrap_err();
        assert!(e.contains("LISTEN_FDS=many"), "{e}");
        assert!(inherited(Some(&me), Some("0")).unwrap().is_none());
    }

    #[test]
    fn only_a_listening_unix_stream_socket_is_accepted() {
        let dir = tempfile_dir();
        let l = UnixListener::bind(dir.join("ok.sock")).unwrap();
        assert!(check_listening_unix_stream(l.as_raw_fd()).is_ok());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = check_listening_unix_stream(a.as_raw_fd()).unwrap_err();
        assert!(e.contains("not a listening Unix stream socket"), "{e}");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(check_listening_unix_stream(udp.as_raw_fd()).is_err());
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = check_listening_unix_stream(f.as_raw_fd()).unwrap_err();
        assert!(e.contains("is not a socket"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("styxy-activation-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
