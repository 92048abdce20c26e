//! The Styxy HTTP API as a port-allocating client sees it (`styxy-api.md` §4), plus the
//! few extra fields the built-in daemon understands and Styxy ignores.

use serde::{Deserialize, Serialize};

/// `POST /allocate`. Fields after `dry_run` are extras: Styxy ignores them, the
/// built-in daemon uses them for liveness and stickiness.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct AllocateRequest {
    pub service_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// Omitted rather than null or 0: Styxy answers 400 to both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preferred_port: Option<u16>,
    /// The session. Omitted for a process outside any session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_path: Option<String>,
    #[serde(skip_serializing_if = "is_false", default)]
    pub dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// Ports the client found taken at OS level; never grant them again.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub exclude: Vec<u16>,
    /// A bind in progress: the grant stands once the client confirms it (its `listen()`,
    /// or the port bound), and expires if the client gave up on it.
    #[serde(skip_serializing_if = "is_false", default)]
    pub bind: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Who holds a port, as the built-in daemon reports it with a remap.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Holder {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
}

/// Any answer to `POST /allocate`: success (`lock_id`), Styxy's singleton reuse
/// shape (`lockId`, `existing`, no `success`), or an error.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct AllocateReply {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(alias = "lockId", skip_serializing_if = "Option::is_none")]
    pub lock_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub existing: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Built-in daemon only: who holds the requested port when another was granted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<Holder>,
}

impl AllocateReply {
    /// The granted port and lock id, when the reply is a success (`success` or
    /// `existing` true, `styxy-api.md` §10).
    pub fn granted(&self) -> Option<(u16, Option<&str>)> {
        let ok = self.success == Some(true) || self.existing == Some(true);
        match (ok, self.port) {
            (true, Some(p)) if p != 0 => Some((p, self.lock_id.as_deref())),
            _ => None,
        }
    }
}

/// `{"success":false,"error":…}`, the error shape of every JSON error.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorReply {
    pub success: bool,
    pub error: String,
}

/// One entry of `GET /allocations` in Styxy's shape, plus the built-in daemon's extras.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct AllocationInfo {
    pub port: u16,
    #[serde(rename = "lockId", alias = "lock_id")]
    pub lock_id: String,
    #[serde(default)]
    pub service_type: String,
    #[serde(default)]
    pub service_name: String,
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub project_path: Option<String>,
    #[serde(default)]
    pub process_id: Option<u32>,
    #[serde(default)]
    pub allocated_at: Option<String>,
    // built-in extras
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_s: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct AllocationsReply {
    pub allocations: Vec<AllocationInfo>,
}

/// Styxy's character rules (`styxy-api.md` §4): service types `[A-Za-z0-9-]` ≤ 50,
/// instance ids `[A-Za-z0-9_-]` ≤ 100, service names `[A-Za-z0-9._-]` ≤ 100.
pub fn valid_service_type(s: &str) -> bool {
    valid_chars(s, 50, |c| c.is_ascii_alphanumeric() || c == '-')
}

pub fn valid_instance_id(s: &str) -> bool {
    valid_chars(s, 100, |c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub fn valid_service_name(s: &str) -> bool {
    valid_chars(s, 100, |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_chars(s: &str, max: usize, ok: impl Fn(char) -> bool) -> bool {
    !s.is_empty() && s.len() <= max && s.chars().all(ok)
}

/// Makes `raw` fit a service name: other characters become `-`, cut at 100.
pub fn service_name(comm: &str, requested: u16) -> String {
    let mut s: String =
        comm.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' }).take(90).collect();
    if s.is_empty() {
        s.push_str("process");
    }
    format!("{s}-{requested}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_shapes() {
        let ok: AllocateReply =
            serde_json::from_str(r#"{"success":true,"port":3000,"lock_id":"a","message":"Port 3000 allocated for dev service"}"#).unwrap();
        assert_eq!(ok.granted(), Some((3000, Some("a"))));
        let reuse: AllocateReply = serde_json::from_str(
            r#"{"port":11430,"lockId":"b","message":"m","existing":true,"existingInstanceId":"x","existingPid":1,"allocatedAt":1}"#,
        )
        .unwrap();
        assert_eq!(reuse.granted(), Some((11430, Some("b"))));
        let err: AllocateReply =
            serde_json::from_str(r#"{"success":false,"error":"No available ports in range 6006-6029 for service type storybook","context":{"allocated_ports":[6006]}}"#)
                .unwrap();
        assert_eq!(err.granted(), None);
        let dry: AllocateReply = serde_json::from_str(r#"{"success":true,"port":0}"#).unwrap();
        assert_eq!(dry.granted(), None);
        assert!(serde_json::from_str::<AllocateReply>(r#"{"success":true,"port":70000}"#).is_err());
    }

    #[test]
    fn request_omits_what_styxy_rejects() {
        let r = AllocateRequest { service_type: "dev".into(), ..Default::default() };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"service_type":"dev"}"#);
    }

    #[test]
    fn character_rules() {
        for (s, t, i, n) in [
            ("dev", true, true, true),
            ("a_b", false, true, true),
            ("a.b", false, false, true),
            ("../x", false, false, false),
            ("", false, false, false),
        ] {
            assert_eq!(valid_service_type(s), t, "{s}");
            assert_eq!(valid_instance_id(s), i, "{s}");
            assert_eq!(valid_service_name(s), n, "{s}");
        }
        assert!(!valid_instance_id(&"x".repeat(101)));
        assert_eq!(service_name("node /x", 3000), "node--x-3000");
        assert!(valid_service_name(&service_name(&"é".repeat(300), 1)));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A coordinator's answer, whatever its bytes, parses or fails; it never panics,
        /// and a grant is only ever a real port.
        #[test]
        fn any_answer_is_handled(body in prop::collection::vec(any::<u8>(), 0..256), port in any::<i64>(), ok in any::<bool>()) {
            if let Ok(r) = serde_json::from_slice::<AllocateReply>(&body) {
                let _ = r.granted();
            }
            let text = format!(r#"{{"success":{ok},"port":{port},"lock_id":"x"}}"#);
            if let Ok(r) = serde_json::from_str::<AllocateReply>(&text) {
                prop_assert!(r.granted().is_none_or(|(p, _)| p != 0 && i64::from(p) == port));
            }
        }

        #[test]
        fn rules_and_urls_never_panic(s in "[ -~]{0,40}") {
            let _ = crate::policy::Policy::default().add_rules(&s);
            let _ = crate::http::Endpoint::parse(&s);
        }
    }
}
