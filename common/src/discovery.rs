//! Where the coordinators are: the local daemon (the only one the hooks and the CLI
//! ask) and the Styxy it fronts as its upstream (docs/ARCHITECTURE.md "One path").

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::envvars;
use crate::http::{self, Endpoint, Timeouts};
use crate::paths;

pub const STYXY_DEFAULT_PORT: u16 = 9876;

/// `GET /status` answers 200 (no auth, not rate-limited on Styxy).
pub fn answers(ep: &Endpoint, t: Timeouts) -> bool {
    matches!(http::call(ep, "GET", "/status", None, t), Ok(r) if r.status == 200)
}

/// Styxy's token: `STYXY_TOKEN`, else `~/.styxy/auth.token` (trimmed).
pub fn styxy_token() -> Option<String> {
    if let Ok(t) = std::env::var(envvars::TOKEN) {
        if !t.trim().is_empty() {
            return Some(t.trim().to_string());
        }
    }
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    read_token(&home.join(".styxy/auth.token"))
}

pub fn read_token(path: &std::path::Path) -> Option<String> {
    let t = String::from_utf8(crate::paths::read_regular(path, 4096).ok()?).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Where Styxy is expected: `STYXY_DAEMON_HOST:STYXY_DAEMON_PORT`, default 127.0.0.1:9876.
pub fn styxy_endpoint() -> Endpoint {
    let host = std::env::var(envvars::DAEMON_HOST).ok().filter(|h| !h.is_empty());
    let ip: IpAddr = match host.as_deref() {
        None | Some("localhost") => IpAddr::from([127, 0, 0, 1]),
        Some(h) => h.parse().unwrap_or(IpAddr::from([127, 0, 0, 1])),
    };
    let port = std::env::var(envvars::DAEMON_PORT).ok().and_then(|p| p.parse().ok()).unwrap_or(STYXY_DEFAULT_PORT);
    Endpoint::Tcp { addr: SocketAddr::new(ip, port), token: styxy_token() }
}

/// The local daemon's socket: the one `STYXY_URL` names when it is a `unix:` URL,
/// else the runtime directory's. `Err` for a malformed `STYXY_URL`.
pub fn local_socket() -> Result<PathBuf, String> {
    match env_url()? {
        Some(Endpoint::Unix(p)) => Ok(p),
        _ => Ok(paths::socket_path()),
    }
}

/// The Styxy the daemon fronts: `STYXY_URL` when it is an `http://` URL, else
/// `STYXY_DAEMON_HOST:STYXY_DAEMON_PORT` (default 127.0.0.1:9876); the token from
/// `STYXY_TOKEN` or `~/.styxy/auth.token`; and whether the user named it (`STYXY_URL`),
/// which trusts it whoever listens there. `Err` for a malformed `STYXY_URL`.
pub fn upstream() -> Result<(Endpoint, bool), String> {
    match env_url()? {
        Some(ep @ Endpoint::Tcp { .. }) => Ok((ep.with_token(styxy_token()), true)),
        _ => Ok((styxy_endpoint(), false)),
    }
}

/// `STYXY_URL`, parsed; `Ok(None)` when unset.
fn env_url() -> Result<Option<Endpoint>, String> {
    match std::env::var(envvars::URL).ok().filter(|u| !u.trim().is_empty()) {
        None => Ok(None),
        Some(url) => Endpoint::parse(url.trim()).map(Some).map_err(|e| format!("STYXY_URL={e}")),
    }
}
