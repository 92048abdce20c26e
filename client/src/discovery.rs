//! Finding the coordinator, in DESIGN.md's order: `STYXY_URL` → the built-in daemon's
//! socket if it answers → Styxy at `STYXY_DAEMON_HOST:STYXY_DAEMON_PORT` → none.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::http::{self, Endpoint, Timeouts};
use crate::paths;

pub const STYXY_DEFAULT_PORT: u16 = 9876;

#[derive(Debug, Clone)]
pub struct Found {
    pub endpoint: Endpoint,
    /// Why this one: shown by `status`.
    pub why: String,
}

/// `GET /status` answers 200 (no auth, not rate-limited on Styxy).
pub fn answers(ep: &Endpoint, t: Timeouts) -> bool {
    matches!(http::call(ep, "GET", "/status", None, t), Ok(r) if r.status == 200)
}

/// Styxy's token: `STYXY_TOKEN`, else `~/.styxy/auth.token` (trimmed).
pub fn styxy_token() -> Option<String> {
    if let Ok(t) = std::env::var("STYXY_TOKEN") {
        if !t.trim().is_empty() {
            return Some(t.trim().to_string());
        }
    }
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    read_token(&home.join(".styxy/auth.token"))
}

pub fn read_token(path: &std::path::Path) -> Option<String> {
    let t = std::fs::read_to_string(path).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Where Styxy is expected: `STYXY_DAEMON_HOST:STYXY_DAEMON_PORT`, default 127.0.0.1:9876.
pub fn styxy_endpoint() -> Endpoint {
    let host = std::env::var("STYXY_DAEMON_HOST").ok().filter(|h| !h.is_empty());
    let ip: IpAddr = match host.as_deref() {
        None | Some("localhost") => IpAddr::from([127, 0, 0, 1]),
        Some(h) => h.parse().unwrap_or(IpAddr::from([127, 0, 0, 1])),
    };
    let port = std::env::var("STYXY_DAEMON_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(STYXY_DEFAULT_PORT);
    Endpoint::Tcp { addr: SocketAddr::new(ip, port), token: styxy_token() }
}

/// `STYXY_URL`, parsed, with a token for TCP (`STYXY_TOKEN`, the built-in daemon's
/// token file, then Styxy's). `Ok(None)` when unset.
pub fn from_env_url() -> Result<Option<Endpoint>, String> {
    let Some(url) = std::env::var("STYXY_URL").ok().filter(|u| !u.trim().is_empty()) else {
        return Ok(None);
    };
    let ep = Endpoint::parse(url.trim()).map_err(|e| format!("STYXY_URL={e}"))?;
    Ok(Some(match ep {
        Endpoint::Tcp { addr, .. } => {
            let token = std::env::var("STYXY_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty())
                .map(|t| t.trim().to_string())
                .or_else(|| read_token(&paths::token_path()))
                .or_else(styxy_token);
            Endpoint::Tcp { addr, token }
        }
        e => e,
    }))
}

/// Resolves the coordinator. `Err` only for a malformed `STYXY_URL`.
pub fn discover(t: Timeouts) -> Result<Option<Found>, String> {
    if let Some(ep) = from_env_url()? {
        let why = "STYXY_URL is set".to_string();
        return Ok(Some(Found { endpoint: ep, why }));
    }
    let builtin = Endpoint::Unix(paths::socket_path());
    if answers(&builtin, t) {
        return Ok(Some(Found { endpoint: builtin, why: "the built-in daemon answers on its socket".into() }));
    }
    let styxy = styxy_endpoint();
    if answers(&styxy, t) {
        return Ok(Some(Found { endpoint: styxy.clone(), why: format!("Styxy answers at {styxy}") }));
    }
    Ok(None)
}
