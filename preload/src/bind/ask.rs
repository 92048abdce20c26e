//! The coordinator seam of `bind()`: [`Coordinator`] is asked for a port; [`Daemon`] asks
//! the local daemon over its Unix socket (`POST /allocate`). Tests put a fake in its place.

use styxy_preload_common::api::{AllocateReply, AllocateRequest};
use styxy_preload_common::http::{self, Endpoint, Timeouts};

use styxy_preload_common::reason::AskError;

/// Whoever grants ports to a bind.
pub trait Coordinator {
    /// `POST /allocate`: the grant, or why there is none.
    fn allocate(&mut self, req: &AllocateRequest) -> Result<AllocateReply, AskError>;
    /// How the event log names the way it was asked (`unix`).
    fn backend(&self) -> &'static str;
    /// Where it is, for a person (`unix:/run/user/1000/styxy-preload/daemon.sock`).
    fn name(&self) -> String;
}

/// The local daemon at an endpoint.
pub struct Daemon<'a>(pub &'a Endpoint);

impl Coordinator for Daemon<'_> {
    fn allocate(&mut self, req: &AllocateRequest) -> Result<AllocateReply, AskError> {
        let garbled = |e: &dyn std::fmt::Display| AskError::Garbled(e.to_string());
        let body = serde_json::to_vec(req).map_err(|e| garbled(&e))?;
        let res = http::call_waiting(self.0, "POST", "/allocate", Some(&body), Timeouts::HOOK).map_err(|e| match e {
            http::Error::Unreachable(_) => unreachable(self.0),
            http::Error::Timeout => AskError::Timeout,
            e => garbled(&e),
        })?;
        match res.status {
            200 => res.json::<AllocateReply>().map_err(|e| garbled(&e)),
            status => {
                let message = res.json::<AllocateReply>().ok().and_then(|r| r.error).unwrap_or_else(|| "non-JSON error page".into());
                Err(AskError::Refused { status, message })
            }
        }
    }

    fn backend(&self) -> &'static str {
        self.0.backend()
    }

    fn name(&self) -> String {
        self.0.to_string()
    }
}

/// Why the daemon does not answer: it is not there, or it is another user's (a server run
/// with runuser, su or sudo inside a session).
fn unreachable(ep: &Endpoint) -> AskError {
    use std::os::unix::fs::MetadataExt;
    let Endpoint::Unix(sock) = ep else { return AskError::NoCoordinator };
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    // the socket, or (when its directory is closed to us) the nearest directory we can see
    let owner = match std::fs::metadata(sock) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => sock.ancestors().skip(1).find_map(|d| std::fs::metadata(d).ok()),
        r => r.ok(),
    };
    match owner {
        Some(m) if m.uid() != me => AskError::OtherUser { owner: m.uid(), me },
        _ => AskError::NoCoordinator,
    }
}
