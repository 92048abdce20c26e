//! Everything styxy-preload reads about a process from `/proc`, in one place: who it is
//! (pid + start time, which tells a live process from a reused pid), its parent and
//! children, its name, working directory, environment and `status` fields.
//!
//! Used by the daemon (owners, checks, the hook's log), the CLI (`exec`'s seccomp
//! supervisor, `daemon stop`) and the preload library. Every function is a read or
//! two of small `/proc` files, never panics, and answers `None`/`false`/empty when the
//! process is gone or the file unreadable. For this process, pass [`SELF`] where a
//! function takes one (`/proc/self` is this process even where its pid is another
//! namespace's).

use std::ffi::OsString;
use std::fmt::Display;
use std::io::Read;

/// This process, in `/proc`.
pub const SELF: &str = "self";

/// A process as the daemon records it: its pid and its start time, together one
/// process for the life of the system (a reused pid has another start time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcId {
    pub pid: u32,
    /// Clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start: u64,
}

impl ProcId {
    /// `pid` as it runs now, if it runs.
    pub fn of(pid: u32) -> Option<ProcId> {
        start_time(pid).map(|start| ProcId { pid, start })
    }

    /// Whether this very process still runs (not another one under its pid).
    pub fn alive(&self) -> bool {
        alive(self.pid, self.start)
    }
}

/// The fields of a `stat` line after the command name (which may hold spaces and
/// parentheses: they start after the last `)`): `state` is field 0, `ppid` 1,
/// `starttime` 19.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat.get(stat.rfind(')')? + 2..)?.split(' ').nth(n)
}

/// Reads `/proc/<pid>/stat` with one `read()` into a stack buffer (this runs for every
/// allocation the daemon makes) and hands its text to `f`.
fn with_stat<T>(pid: u32, f: impl FnOnce(&str) -> Option<T>) -> Option<T> {
    let mut buf = [0u8; 1024];
    let n = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?.read(&mut buf).ok()?;
    f(std::str::from_utf8(buf.get(..n)?).ok()?)
}

/// The process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22),
/// which tells a live process from a reused pid.
pub fn start_time(pid: u32) -> Option<u64> {
    with_stat(pid, |s| stat_field(s, 19)?.parse().ok())
}

/// `pid`'s command name and start time, from one read of `/proc/<pid>/stat` (the name is
/// the one [`comm`] reads, between the line's first `(` and its last `)`).
pub fn comm_and_start(pid: u32) -> Option<(String, u64)> {
    with_stat(pid, |s| {
        let name = s.get(s.find('(')? + 1..s.rfind(')')?)?;
        Some((name.trim_end().to_string(), stat_field(s, 19)?.parse().ok()?))
    })
}

/// True if `pid` runs and is the process that started at `start` (0: unknown, any).
pub fn alive(pid: u32, start: u64) -> bool {
    match start_time(pid) {
        Some(s) => start == 0 || s == start,
        None => false,
    }
}

/// The parent of `pid`.
pub fn parent(pid: u32) -> Option<u32> {
    with_stat(pid, |s| stat_field(s, 1)?.parse().ok())
}

/// Whether `ancestor` is `pid`'s parent, grandparent, … (at most 64 generations).
pub fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        match parent(p) {
            Some(q) if q == ancestor => return true,
            Some(q) if q > 1 => p = q,
            _ => return false,
        }
    }
    false
}

/// `pid`'s children, from each of its threads' `children` list (`/proc/<pid>/task/*/children`).
pub fn children(pid: impl Display) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|list| list.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// Every process whose parent is `pid`, by a scan of all of `/proc` (whichever of
/// `pid`'s threads the kernel made the parent, orphans reparented to a subreaper too).
pub fn children_by_scan(pid: u32) -> Vec<u32> {
    all_pids().into_iter().filter(|p| parent(*p) == Some(pid)).collect()
}

/// `pid`'s raw environment as it was started (`KEY=value` entries, NUL-separated). Read
/// into room for a usual environment at once: `/proc` says no size, and `fs::read` would
/// start at 32 bytes and double (eight reads for 2 kB).
fn environ_raw(pid: u32) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(format!("/proc/{pid}/environ")).ok()?;
    let mut env = Vec::with_capacity(8192);
    f.read_to_end(&mut env).ok()?;
    Some(env)
}

/// Whether `pid`'s environment (as it was started) holds `key=value`.
pub fn env_is(pid: u32, key: &str, value: &str) -> bool {
    let want = format!("{key}={value}");
    environ_raw(pid).is_some_and(|e| e.split(|b| *b == 0).any(|kv| kv == want.as_bytes()))
}

/// Whether `pid`'s environment (as it was started) sets `key`, to anything.
pub fn env_has(pid: u32, key: &str) -> bool {
    environ_raw(pid)
        .is_some_and(|e| e.split(|b| *b == 0).any(|kv| kv.strip_prefix(key.as_bytes()).is_some_and(|r| r.first() == Some(&b'='))))
}

/// `pid`'s environment as it was started, as pairs.
pub fn environ(pid: u32) -> Vec<(String, OsString)> {
    use std::os::unix::ffi::OsStrExt;
    environ_raw(pid)
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let eq = kv.iter().position(|b| *b == b'=')?;
            Some((String::from_utf8_lossy(&kv[..eq]).into_owned(), std::ffi::OsStr::from_bytes(&kv[eq + 1..]).to_owned()))
        })
        .collect()
}

/// `pid`'s working directory (at most 1000 characters, as Styxy takes a project path).
pub fn cwd(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok().map(|d| d.to_string_lossy().chars().take(1000).collect())
}

/// The inodes of `pid`'s sockets (its `/proc/<pid>/fd/*` links that read `socket:[N]`).
pub fn socket_inodes(pid: impl Display) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    fds.flatten()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.path()).ok()?;
            link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The TCP ports `pid` listens on: its socket inodes found listening in its own network
/// namespace's `/proc/<pid>/net/tcp` and `tcp6`.
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes = socket_inodes(pid);
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let listening = f.get(3) == Some(&"0A") && f.get(9).and_then(|i| i.parse().ok()).is_some_and(|i: u64| inodes.contains(&i));
            let port = f.get(1).and_then(|a| a.rsplit(':').next()).and_then(|h| u16::from_str_radix(h, 16).ok());
            if let Some(p) = port.filter(|p| listening && !ports.contains(p)) {
                ports.push(p);
            }
        }
    }
    ports
}

/// The processes in `/proc` (every pid this process may see).
pub fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// `pid`'s network namespace: the inode of `/proc/<pid>/ns/net`.
pub fn netns(pid: impl Display) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net")).ok().map(|m| m.ino())
}

/// `pid`'s command name (`/proc/<pid>/comm`, at most 15 bytes).
pub fn comm(pid: impl Display) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim_end().to_string())
}

/// The value of one `Name:` line of `/proc/<pid>/status`, trimmed (`status_field(pid,
/// "Tgid")`, `"CapEff"`, `"Seccomp_filters"`).
pub fn status_field(pid: impl Display, name: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(|v| v.trim().to_string())
}

/// Whether a TCP socket listens on `port` in this network namespace (`/proc/net/tcp` and
/// `tcp6`, `st` 0A). Read only on an error path.
pub fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).unwrap_or_default().lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1).is_some_and(|local| local.ends_with(&want)) && f.get(3) == Some(&"0A")
        })
    })
}

/// `pid`'s command line, its arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    (!args.is_empty()).then(|| args.join(" "))
}

/// The owners (uids) of the TCP sockets listening where a connection to `addr` would
/// go: `addr` itself or the wildcard of its family (and `[::]` for IPv4, dual-stack),
/// from this network namespace's `/proc/net/tcp` and `tcp6` (`local_address`, `st` 0A
/// = LISTEN, `uid`). Empty when nothing listens there. The daemon's fallback where the
/// kernel's socket diagnostics cannot be asked (`portcheck::listener_uids`): each read
/// walks every bucket of the kernel's connection table, ~1 ms on a machine with 24 GiB.
pub fn tcp_listener_uids(addr: std::net::SocketAddr) -> Vec<u32> {
    // the kernel hands these tables out a page per read and resumes by position: a line
    // can be skipped when sockets come and go in between (a busy machine's TIME_WAITs), so
    // "nothing listens" is read again before it is believed
    (0..3).map(|_| listener_uids_once(addr)).find(|uids| !uids.is_empty()).unwrap_or_default()
}

fn listener_uids_once(addr: std::net::SocketAddr) -> Vec<u32> {
    let mut uids = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(table) = std::fs::read_to_string(file) else { continue };
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(&"0A"), Some(uid)) = (f.get(1), f.get(3), f.get(7)) else { continue };
            if listens_for(local, addr) {
                uids.extend(uid.parse::<u32>().ok());
            }
        }
    }
    uids
}

/// Whether a `/proc/net/tcp*` `local_address` (`0100007F:2694`: the address's bytes as
/// the kernel's 32-bit words in hex, the port in hex) accepts connections to `addr`.
fn listens_for(local: &str, addr: std::net::SocketAddr) -> bool {
    use std::net::IpAddr;
    let Some((ip_hex, port_hex)) = local.split_once(':') else { return false };
    if u16::from_str_radix(port_hex, 16).ok() != Some(addr.port()) {
        return false;
    }
    let words: Option<Vec<u32>> = (0..ip_hex.len() / 8).map(|i| u32::from_str_radix(&ip_hex[i * 8..i * 8 + 8], 16).ok()).collect();
    let bytes: Vec<u8> = words.unwrap_or_default().iter().flat_map(|w| w.to_ne_bytes()).collect();
    let listener: Option<IpAddr> = match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    };
    match (listener, addr.ip()) {
        (Some(l), ip) if l == ip || l.is_unspecified() && l.is_ipv4() == ip.is_ipv4() => true,
        (Some(IpAddr::V6(l)), IpAddr::V4(v4)) => l.is_unspecified() || l.to_ipv4_mapped() == Some(v4),
        _ => false,
    }
}

/// The process a thread belongs to (its thread-group id).
pub fn tgid(tid: u32) -> Option<u32> {
    status_field(tid, "Tgid")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_as_proc_sees_it() {
        let me = std::process::id();
        let id = ProcId::of(me).unwrap();
        assert!(id.alive());
        assert!(alive(me, 0));
        assert!(!alive(me, id.start + 1), "another start time: a reused pid");
        assert!(!alive(u32::MAX - 1, 0));
        assert!(ProcId::of(u32::MAX - 1).is_none());
        assert_eq!(tgid(me), Some(me));
        assert!(status_field(me, "CapEff").is_some_and(|v| u64::from_str_radix(&v, 16).is_ok()));
        assert_eq!(status_field(me, "Cap"), None, "a whole name, not a prefix");
        let pp = parent(me).unwrap();
        assert!(descends_from(me, pp));
        assert!(!descends_from(pp, me));
        assert_eq!(cwd(me).map(std::path::PathBuf::from), std::env::current_dir().ok());
        assert!(comm(me).is_some_and(|c| !c.is_empty() && c.len() <= 15));
        assert_eq!(comm_and_start(me), comm(me).zip(start_time(me)));
        assert!(netns(me).is_some() && netns(me) == netns(SELF));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&l))).unwrap();
        assert!(socket_inodes(me).contains(&std::os::unix::fs::MetadataExt::ino(&ino)));
        assert!(listening_ports(me).contains(&l.local_addr().unwrap().port()));
        assert!(all_pids().contains(&me));
        assert!(env_has(me, "PATH") || std::env::var_os("PATH").is_none());
        assert!(!env_has(me, "PAT"));
        let path = environ(me).into_iter().find(|(k, _)| k == "PATH").map(|(_, v)| v);
        assert_eq!(path, std::env::var_os("PATH"));
        if let Some(p) = std::env::var("PATH").ok().filter(|p| !p.is_empty()) {
            assert!(env_is(me, "PATH", &p));
        }
    }

    #[test]
    fn a_child_is_listed_and_its_identity_ends_with_it() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let pid = child.id();
        let id = ProcId::of(pid).unwrap();
        assert!(children(std::process::id()).contains(&pid));
        assert!(children_by_scan(std::process::id()).contains(&pid));
        assert_eq!(parent(pid), Some(std::process::id()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!id.alive());
    }

    #[test]
    fn a_name_with_parentheses_and_spaces_is_read_whole_from_stat() {
        let dir = std::env::temp_dir().join(format!("styxy-procinfo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("a) (b c ");
        std::fs::copy("/bin/sleep", &exe).unwrap();
        let mut child = std::process::Command::new(&exe).arg("5").spawn().unwrap();
        let got = comm_and_start(child.id());
        let want = comm(child.id()).zip(start_time(child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(got.as_ref().map(|(c, _)| c.as_str()), Some("a) (b c"));
        assert_eq!(got, want);
    }

    #[test]
    fn a_listening_socket_is_found_with_its_owner() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        assert_eq!(tcp_listener_uids(addr), vec![me]);
        drop(l);
        assert!(tcp_listener_uids(addr).is_empty());
        assert!(listens_for("0100007F:2694", "127.0.0.1:9876".parse().unwrap()));
        assert!(listens_for("00000000:2694", "127.0.0.1:9876".parse().unwrap()));
        assert!(!listens_for("0200007F:2694", "127.0.0.1:9876".parse().unwrap()));
        assert!(listens_for("00000000000000000000000000000000:2694", "127.0.0.1:9876".parse().unwrap()));
        assert!(!listens_for("0100007F:2695", "127.0.0.1:9876".parse().unwrap()));
    }

    #[test]
    fn stat_fields_start_after_the_last_parenthesis() {
        let line = "42 (a) b (c) d) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 123456 1 2";
        assert_eq!(stat_field(line, 0), Some("S"));
        assert_eq!(stat_field(line, 1), Some("7"));
        assert_eq!(stat_field(line, 19), Some("123456"));
        assert_eq!(stat_field("no parenthesis", 0), None);
    }
}
