//! HTTP/1.1 to a coordinator, over a Unix socket (the built-in daemon) or TCP (Styxy),
//! with ureq and a connector of our own.
//!
//! [`call`]: one fresh connection per request, never kept (programs close fds they did
//! not open). [`Kept`]: the daemon's connections to its Styxy, kept between requests and
//! vetted when made. Our sockets are `CLOEXEC`, never on fd 0–2, and every wait is bounded
//! by a connect timeout and a total deadline.

use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, Transport};

/// Where a coordinator answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The built-in daemon: HTTP over a Unix socket.
    Unix(PathBuf),
    /// Styxy (or the built-in daemon's `--http`): HTTP over TCP, bearer token.
    Tcp { addr: SocketAddr, token: Option<String> },
}

impl Endpoint {
    /// Parses `unix:/path` or `http://host:port` (host an IP address or `localhost`).
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        if let Some(path) = url.strip_prefix("unix:") {
            let path = path.trim_start_matches("//");
            if !path.starts_with('/') {
                return Err(format!("'{url}': a unix: URL needs an absolute path, e.g. unix:/run/user/1000/styxy-preload/daemon.sock"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let rest =
            url.strip_prefix("http://").ok_or_else(|| format!("'{url}': expected unix:/path or http://host:port"))?.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("'{url}': the port is missing, e.g. http://127.0.0.1:9876"))?;
        let port: u16 = port.parse().map_err(|_| format!("'{url}': '{port}' is not a port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip: IpAddr = if host == "localhost" {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse().map_err(|_| format!("'{url}': '{host}' is not an IP address or localhost"))?
        };
        Ok(Endpoint::Tcp { addr: SocketAddr::new(ip, port), token: None })
    }

    /// `unix` or `http`, as the event log's `backend` field names it.
    pub fn backend(&self) -> &'static str {
        match self {
            Endpoint::Unix(_) => "unix",
            Endpoint::Tcp { .. } => "http",
        }
    }

    pub fn with_token(self, token: Option<String>) -> Endpoint {
        match self {
            Endpoint::Tcp { addr, .. } => Endpoint::Tcp { addr, token },
            e => e,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp { addr, .. } => write!(f, "http://{addr}"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub total: Duration,
    /// The largest response body accepted.
    pub max_body: u64,
}

impl Timeouts {
    /// For the hooks: a local daemon answers in well under a millisecond; a bind
    /// must return within 300 ms whatever the coordinator does (measured: ~260 ms at
    /// 250, too close), so the whole request gets 200.
    pub const HOOK: Timeouts = Timeouts { connect: Duration::from_millis(50), total: Duration::from_millis(200), max_body: 64 * 1024 };
    /// For the CLI: more patience, bigger answers (allocation lists).
    pub const CLI: Timeouts = Timeouts { connect: Duration::from_millis(500), total: Duration::from_secs(5), max_body: 8 * 1024 * 1024 };
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// `Retry-After` in seconds, on a 429.
    pub retry_after: Option<u64>,
}

impl Response {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(|e| Error::Protocol(format!("HTTP {}: not the expected JSON ({e})", self.status)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Nothing answers at the endpoint.
    Unreachable(String),
    Timeout,
    /// Something answered, but not HTTP/JSON we understand.
    Protocol(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unreachable(e) => write!(f, "coordinator unreachable: {e}"),
            Error::Timeout => write!(f, "coordinator timeout"),
            Error::Protocol(e) => write!(f, "bad answer from coordinator: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// One request: `method` `path` with an optional JSON body.
pub fn call(ep: &Endpoint, method: &str, path: &str, body: Option<&[u8]>, t: Timeouts) -> Result<Response, Error> {
    request(ep, DEFAULT_AGENT, method, path, body, t, Wait::new(ep, Duration::ZERO))
}

/// The `User-Agent` of every request but the daemon's to its upstream.
const DEFAULT_AGENT: &str = "styxy-preload";

/// [`call`] with this `User-Agent` (Styxy records it with every allocation).
pub fn call_as(ep: &Endpoint, agent: &str, method: &str, path: &str, body: Option<&[u8]>, t: Timeouts) -> Result<Response, Error> {
    request(ep, agent, method, path, body, t, Wait::new(ep, Duration::ZERO))
}

/// [`call`] from a hook to the local daemon: past `t`'s deadlines it goes on waiting while
/// the daemon beats (alive, however busy: [`crate::mapview::BEAT_STALE_MS`]), up to
/// [`crate::mapview::PATIENCE_MS`]; a stopped or hung daemon still fails at `t`'s deadline
/// or as soon as its beat is stale.
pub fn call_waiting(ep: &Endpoint, method: &str, path: &str, body: Option<&[u8]>, t: Timeouts) -> Result<Response, Error> {
    request(ep, DEFAULT_AGENT, method, path, body, t, Wait::new(ep, Duration::from_millis(crate::mapview::PATIENCE_MS)))
}

/// Checks a new connection before anything is sent on it; `Err` says why it is not used.
pub type Vet = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Requests to one coordinator over TCP on kept connections (the daemon to its Styxy): a
/// request costs no connect while a connection idle less than [`Kept::IDLE`] waits, and
/// each new connection is vetted ([`Vet`]) before anything is sent on it: what is sent on
/// a connection goes to the socket that accepted it.
pub struct Kept {
    agent: ureq::Agent,
}

impl Kept {
    /// How long an idle connection is used again: Node's http server (Styxy's) closes one
    /// idle 5 s, and a request sent as it closes would be lost.
    pub const IDLE: Duration = Duration::from_secs(2);

    pub fn new(ep: &Endpoint, user_agent: &str, connect: Duration, vet: Vet) -> Kept {
        let config = base_config(user_agent)
            .timeout_connect(Some(connect))
            .max_idle_connections(2)
            .max_idle_connections_per_host(2)
            .max_idle_age(Self::IDLE)
            .build();
        let t = Timeouts { connect, total: Duration::ZERO, max_body: 0 };
        let connector = SockConnector { ep: ep.clone(), t, wait: Wait::new(ep, Duration::ZERO), vet: Some(vet) };
        Kept { agent: ureq::Agent::with_parts(config, connector, NoResolver) }
    }

    /// One request (`ep` gives the token; the address is the one this was made for).
    pub fn call(&self, ep: &Endpoint, method: &str, path: &str, body: Option<&[u8]>, t: Timeouts) -> Result<Response, Error> {
        send(&self.agent, ep, method, path, body, t, true)
    }
}

/// What every request of ours is: no redirects, bounded heads and buffers, our name.
fn base_config(user_agent: &str) -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .max_response_header_size(16 * 1024)
        .input_buffer_size(16 * 1024)
        .output_buffer_size(16 * 1024)
        .user_agent(user_agent)
}

fn request(
    ep: &Endpoint,
    user_agent: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    t: Timeouts,
    wait: Wait,
) -> Result<Response, Error> {
    let config = base_config(user_agent).timeout_connect(Some(t.connect)).max_idle_connections(0).build();
    let total = t.total.max(wait.patience);
    let agent = ureq::Agent::with_parts(config, SockConnector { ep: ep.clone(), t, wait, vet: None }, NoResolver);
    send(&agent, ep, method, path, body, Timeouts { total, ..t }, false)
}

/// Sends one request on `agent` (`kept`: the connection may serve the next one).
fn send(
    agent: &ureq::Agent,
    ep: &Endpoint,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    t: Timeouts,
    kept: bool,
) -> Result<Response, Error> {
    let url = match ep {
        Endpoint::Unix(_) => format!("http://localhost{path}"),
        Endpoint::Tcp { addr, .. } => format!("http://{addr}{path}"),
    };
    let auth = match ep {
        Endpoint::Tcp { token: Some(tok), .. } => Some(format!("Bearer {tok}")),
        _ => None,
    };
    let result = match (method, body) {
        ("GET", _) => with_auth(agent.get(&url), &auth, kept, t.total).call(),
        ("DELETE", _) => with_auth(agent.delete(&url), &auth, kept, t.total).call(),
        ("POST", Some(b)) => with_auth(agent.post(&url), &auth, kept, t.total).header("Content-Type", "application/json").send(b),
        ("PUT", Some(b)) => with_auth(agent.put(&url), &auth, kept, t.total).header("Content-Type", "application/json").send(b),
        ("POST", None) => with_auth(agent.post(&url), &auth, kept, t.total).send_empty(),
        ("PUT", None) => with_auth(agent.put(&url), &auth, kept, t.total).send_empty(),
        _ => return Err(Error::Protocol(format!("unsupported method {method}"))),
    };
    let mut res = result.map_err(map_err)?;
    let status = res.status().as_u16();
    let retry_after = res.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    let body = res.body_mut().with_config().limit(t.max_body).read_to_vec().map_err(map_err)?;
    Ok(Response { status, body, retry_after })
}

/// Adds the request's deadline, the bearer token, and unless the connection is `kept`,
/// `Connection: close`: one request per connection, so the server closes at once instead of
/// waiting for another request.
fn with_auth<B>(req: ureq::RequestBuilder<B>, auth: &Option<String>, kept: bool, total: Duration) -> ureq::RequestBuilder<B> {
    let req = req.config().timeout_global(Some(total)).build();
    let req = if kept { req } else { req.header("Connection", "close") };
    match auth {
        Some(a) => req.header("Authorization", a),
        None => req,
    }
}

fn map_err(e: ureq::Error) -> Error {
    match e {
        ureq::Error::Timeout(_) => Error::Timeout,
        ureq::Error::Io(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => Error::Timeout,
        ureq::Error::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::NotFound
                    | io::ErrorKind::PermissionDenied
                    | io::ErrorKind::AddrNotAvailable
            ) =>
        {
            Error::Unreachable(e.to_string())
        }
        e => Error::Protocol(e.to_string()),
    }
}

/// The address comes from the endpoint, never from DNS.
#[derive(Debug)]
struct NoResolver;

impl Resolver for NoResolver {
    fn resolve(&self, _: &ureq::http::Uri, _: &ureq::config::Config, _: NextTimeout) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let mut addrs = self.empty();
        addrs.truncate(0);
        addrs.push(SocketAddr::from(([127, 0, 0, 1], 0)));
        Ok(addrs)
    }
}

/// How long a call goes on waiting past a deadline: while the local daemon beats in the
/// port map beside its socket (it is alive, however busy), up to `patience` in all.
#[derive(Debug, Clone)]
struct Wait {
    started: Instant,
    patience: Duration,
    /// The port map whose beat says the daemon lives; `None`: no waiting past a deadline.
    beat: Option<PathBuf>,
}

impl Wait {
    /// One wait before the beat is looked at again.
    const SLICE: Duration = Duration::from_millis(100);

    fn new(ep: &Endpoint, patience: Duration) -> Wait {
        let beat = match ep {
            Endpoint::Unix(sock) if !patience.is_zero() => Some(sock.with_file_name("ports.map")),
            _ => None,
        };
        Wait { started: Instant::now(), patience, beat }
    }

    /// Whether to wait once more, `deadline` after the call began: before it, or while
    /// the daemon beats and patience lasts.
    fn more(&self, deadline: Duration) -> bool {
        let waited = self.started.elapsed();
        waited < deadline || (waited < self.patience && self.beat.as_deref().is_some_and(crate::portmap::alive_at))
    }

    /// How long one wait of a socket call lasts: `timeout`, or a slice of it when patient.
    fn slice(&self, timeout: Duration) -> Duration {
        if self.beat.is_some() {
            timeout.min(Self::SLICE)
        } else {
            timeout
        }
    }
}

struct SockConnector {
    ep: Endpoint,
    t: Timeouts,
    wait: Wait,
    /// Checks each new connection ([`Kept`]).
    vet: Option<Vet>,
}

impl fmt::Debug for SockConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SockConnector").field("ep", &self.ep).field("vetted", &self.vet.is_some()).finish()
    }
}

impl Connector<()> for SockConnector {
    type Out = SockTransport;

    fn connect(&self, details: &ConnectionDetails, _: Option<()>) -> Result<Option<SockTransport>, ureq::Error> {
        let timeout = details.timeout.not_zero().map(|t| *t).unwrap_or(Duration::from_millis(50)).min(self.t.connect);
        let sock = connect_waiting(&self.ep, timeout, &self.wait)?;
        if let Some(vet) = &self.vet {
            vet().map_err(|why| ureq::Error::Io(io::Error::new(io::ErrorKind::PermissionDenied, why)))?;
        }
        let buffers = LazyBuffers::new(details.config.input_buffer_size(), details.config.output_buffer_size());
        // connect already set SO_SNDTIMEO on a Unix socket
        let write_timeout = matches!(self.ep, Endpoint::Unix(_)).then_some(self.wait.slice(timeout));
        Ok(Some(SockTransport {
            sock,
            buffers,
            read_timeout: None,
            write_timeout,
            pending: Vec::new(),
            total: self.t.total,
            wait: self.wait.clone(),
            kept: self.vet.is_some(),
        }))
    }
}

/// A connected stream socket, `CLOEXEC`, never on fd 0–2, connected within `timeout`
/// (a Unix socket whose backlog is full fails at once rather than blocking).
pub fn connect(ep: &Endpoint, timeout: Duration) -> io::Result<Socket> {
    connect_waiting(ep, timeout, &Wait::new(ep, Duration::ZERO))
}

fn connect_waiting(ep: &Endpoint, timeout: Duration, wait: &Wait) -> io::Result<Socket> {
    let (domain, addr) = match ep {
        Endpoint::Unix(p) => (Domain::UNIX, SockAddr::unix(p)?),
        Endpoint::Tcp { addr, .. } => (Domain::for_address(*addr), SockAddr::from(*addr)),
    };
    let sock = above_stdio(Socket::new(domain, Type::STREAM, None)?)?;
    match ep {
        Endpoint::Unix(p) => {
            // a Unix connect waits for room in a full backlog (a frozen daemon) for at most SO_SNDTIMEO
            sock.set_write_timeout(Some(wait.slice(timeout)))?;
            loop {
                match sock.connect(&addr) {
                    Ok(()) => break,
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) && wait.more(timeout) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(io::ErrorKind::TimedOut.into()),
                    Err(e) => return Err(e),
                }
            }
            same_user(&sock, p)?;
        }
        Endpoint::Tcp { .. } => {
            sock.connect_timeout(&addr, timeout)?;
            sock.set_nodelay(true)?;
        }
    }
    Ok(sock)
}

/// Refuses a daemon run by another user (`SO_PEERCRED`): a socket planted where ours
/// should be (a shared `/tmp` fallback) is never told anything, nor believed.
fn same_user(sock: &Socket, path: &std::path::Path) -> io::Result<()> {
    // SAFETY: ucred is plain integers, for which zero is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt into a ucred of the right size.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
    };
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    if rc != 0 || !crate::paths::is_own_uid(cred.uid) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the socket {} belongs to uid {}, not to this user (uid {me}): refused", path.display(), cred.uid),
        ));
    }
    Ok(())
}

/// Moves a socket that landed on fd 0–2 (a program started with stdio closed) to fd ≥ 3,
/// so that nothing the program writes to "stdout" ends up in our request.
fn above_stdio(sock: Socket) -> io::Result<Socket> {
    if sock.as_raw_fd() > 2 {
        return Ok(sock);
    }
    // SAFETY: plain fcntl on a valid fd; the new fd is owned by the returned Socket.
    let fd = unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by fcntl and is owned by nothing else.
    Ok(unsafe { Socket::from_raw_fd(fd) })
}

#[derive(Debug)]
struct SockTransport {
    sock: Socket,
    buffers: LazyBuffers,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    /// Output held back until the first read: the head and body of a request leave in
    /// one write, so the server wakes up once.
    pending: Vec<u8>,
    /// The answer's deadline (from the call's start), and how long to wait past it.
    total: Duration,
    wait: Wait,
    /// May serve another request ([`Kept`]).
    kept: bool,
}

impl SockTransport {
    fn flush(&mut self, timeout: &NextTimeout) -> Result<(), ureq::Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let sock = &self.sock;
        tighten(&mut self.write_timeout, timeout.not_zero().map(|t| *t), self.kept, |t| sock.set_write_timeout(t))
            .map_err(ureq::Error::Io)?;
        let r = send_all(sock, &self.pending).map_err(|e| io_err(e, timeout));
        self.pending.clear();
        r
    }
}

/// Writes all of `data` with `MSG_NOSIGNAL`: a peer that closed first is `EPIPE`, never a
/// SIGPIPE, which would end a program whose SIGPIPE is the default (most C programs, and
/// the CLI's printing commands).
fn send_all(sock: &Socket, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match sock.send_with_flags(data, libc::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sets a socket timeout only when it must shrink by more than a few milliseconds (ureq
/// hands us the remaining budget each time) or, on a kept connection (`grow`), grow by
/// as much (its next request has a budget of its own): one setsockopt per request in the
/// common case, and the deadline still holds within that slack.
fn tighten(
    cached: &mut Option<Duration>,
    want: Option<Duration>,
    grow: bool,
    set: impl FnOnce(Option<Duration>) -> io::Result<()>,
) -> io::Result<()> {
    const SLACK: Duration = Duration::from_millis(5);
    let stale = match (*cached, want) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(c), Some(w)) => w + SLACK < c || (grow && c + SLACK < w),
    };
    if stale {
        set(want)?;
        *cached = want;
    }
    Ok(())
}

fn io_err(e: io::Error, timeout: &NextTimeout) -> ureq::Error {
    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
        ureq::Error::Timeout(timeout.reason)
    } else {
        ureq::Error::Io(e)
    }
}

impl Transport for SockTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let out = &self.buffers.output()[..amount];
        self.pending.extend_from_slice(out);
        if self.pending.len() > 64 * 1024 {
            self.flush(&timeout.for_write())?;
        }
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.flush(&timeout.for_write())?;
        let timeout = timeout.for_read();
        let sock = &self.sock;
        let slice = timeout.not_zero().map(|t| self.wait.slice(*t));
        tighten(&mut self.read_timeout, slice, self.kept, |t| sock.set_read_timeout(t)).map_err(ureq::Error::Io)?;
        let n = loop {
            match (&self.sock).read(self.buffers.input_append_buf()) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) && self.wait.more(self.total) => continue,
                r => break r.map_err(|e| io_err(e, &timeout))?,
            }
        };
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    /// A kept connection serves the next request while the server has neither closed it
    /// nor said anything unasked (a peek that would block).
    fn is_open(&mut self) -> bool {
        let mut byte = [std::mem::MaybeUninit::uninit()];
        self.kept
            && matches!(self.sock.recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_urls() {
        assert_eq!(Endpoint::parse("unix:/run/x.sock").unwrap(), Endpoint::Unix("/run/x.sock".into()));
        assert_eq!(Endpoint::parse("unix:///run/x.sock").unwrap(), Endpoint::Unix("/run/x.sock".into()));
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:9876/").unwrap(),
            Endpoint::Tcp { addr: "127.0.0.1:9876".parse().unwrap(), token: None }
        );
        assert_eq!(
            Endpoint::parse("http://localhost:9877").unwrap(),
            Endpoint::Tcp { addr: "127.0.0.1:9877".parse().unwrap(), token: None }
        );
        assert_eq!(Endpoint::parse("http://[::1]:9877").unwrap(), Endpoint::Tcp { addr: "[::1]:9877".parse().unwrap(), token: None });
        for bad in ["unix:rel", "https://x:1", "http://127.0.0.1", "http://example.com:80", "http://1.2.3.4:99999"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unreachable_endpoints_fail_fast() {
        let dir = std::env::temp_dir().join(format!("styxy-http-test-{}", std::process::id()));
        let ep = Endpoint::Unix(dir.join("nothing.sock"));
        let t = std::time::Instant::now();
        assert!(matches!(call(&ep, "GET", "/status", None, Timeouts::HOOK), Err(Error::Unreachable(_))));
        // a TCP port nobody listens on: bind one, learn its number, close it
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let ep = Endpoint::Tcp { addr, token: None };
        assert!(matches!(call(&ep, "GET", "/status", None, Timeouts::HOOK), Err(Error::Unreachable(_))));
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
