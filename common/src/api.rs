//! The Styxy HTTP API as a port-allocating client sees it (docs/STYXY.md "`POST /allocate`"), plus the
//! few extra fields the built-in daemon understands and Styxy ignores. Clients
//! serialise these types, the built-in daemon parses them (as leniently as Styxy does:
//! ports as numbers or numeric strings, nulls for absent values) and answers with them.

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// `POST /allocate`. Fields after `dry_run` are extras: Styxy ignores them, the
/// built-in daemon uses them for liveness and stickiness. Parsing checks types and port
/// ranges only; the daemon checks the rest (characters, lengths, who may name a pid).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct AllocateRequest {
    /// Required: empty when the client sent none.
    #[serde(default, deserialize_with = "null_as_default")]
    pub service_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// Omitted rather than null or 0: Styxy answers 400 to both (and so does the daemon).
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "preferred_port")]
    pub preferred_port: Option<u16>,
    /// The session. Omitted for a process outside any session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_path: Option<String>,
    #[serde(skip_serializing_if = "is_false", default, deserialize_with = "null_as_default")]
    pub dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "requested_port")]
    pub requested_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// Ports the client found taken at OS level; never grant them again.
    #[serde(skip_serializing_if = "Vec::is_empty", default, deserialize_with = "exclude")]
    pub exclude: Vec<u16>,
    /// A bind in progress: the grant stands once the client confirms it (its `listen()`,
    /// or the port bound), and expires if the client gave up on it. Anything but `true`
    /// is false.
    #[serde(skip_serializing_if = "is_false", default, deserialize_with = "only_true")]
    pub bind: bool,
}

impl AllocateRequest {
    /// A request for `port` of type `ty`, as the port a tool asked for (preferred and
    /// requested); the optional fields by struct update:
    /// `AllocateRequest { pid: Some(pid), ..AllocateRequest::for_port("dev", 3000) }`.
    pub fn for_port(ty: &str, port: u16) -> AllocateRequest {
        AllocateRequest { service_type: ty.to_string(), preferred_port: Some(port), requested_port: Some(port), ..Default::default() }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `null` as the type's default (an empty string, false).
fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A port as Styxy takes it: an integer or a numeric string, 1–65535.
pub fn port_of(v: &Value) -> Option<u16> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    n.filter(|n| (1..=65535).contains(n)).map(|n| n as u16)
}

fn port_error<E: serde::de::Error>(field: &str) -> E {
    E::custom(format!("{field} must be an integer between 1 and 65535"))
}

/// Present, `preferred_port` must be a port: `null` is refused, as by Styxy.
fn preferred_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    port_of(&Value::deserialize(d)?).map(Some).ok_or_else(|| port_error("preferred_port"))
}

fn requested_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => port_of(&v).map(Some).ok_or_else(|| port_error("requested_port")),
    }
}

fn exclude<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(vec![]),
        Value::Array(a) => a.iter().map(|v| port_of(v).ok_or_else(|| port_error("exclude[]"))).collect(),
        _ => Err(D::Error::custom("exclude must be an array of ports")),
    }
}

fn only_true<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Value::deserialize(d)? == Value::Bool(true))
}

/// A value that does not have the expected shape is taken as absent (for what a client
/// shows but never relies on).
fn or_none<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
    Ok(serde_json::from_value(Value::deserialize(d)?).ok())
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

impl Holder {
    /// How a remap's reason names the holder: ` by vite (pid 12, session a)`, or nothing
    /// when it is not known.
    pub fn describe(&self) -> String {
        match (&self.session, self.pid, &self.comm) {
            (Some(s), Some(pid), Some(c)) => format!(" by {c} (pid {pid}, session {s})"),
            (None, Some(pid), Some(c)) => format!(" by {c} (pid {pid})"),
            (Some(s), _, _) => format!(" by session {s}"),
            _ => String::new(),
        }
    }
}

/// Any answer to `POST /allocate`: success (`lock_id`), a dry run (`dry_run`, with
/// the type and name asked for), Styxy's singleton reuse shape (`lockId`, `existing`,
/// no `success`), or an error (`error`, and for an exhausted range its `context`).
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
    #[serde(skip_serializing_if = "is_false", default, deserialize_with = "only_true")]
    pub dry_run: bool,
    /// A dry run's service type and name.
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "or_none")]
    pub service_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "or_none")]
    pub service_name: Option<String>,
    /// An exhausted range's details (Styxy sends other shapes too: those read as none).
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "or_none")]
    pub context: Option<ExhaustedContext>,
}

/// The `context` of "No available ports in range a-b for service type t".
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct ExhaustedContext {
    pub allocated_ports: Vec<u16>,
    pub port_range: [u16; 2],
    pub service_type: String,
}

impl AllocateReply {
    /// The granted port and lock id, when the reply is a success (`success` or
    /// `existing` true, docs/STYXY.md "Field rules and built-in types").
    pub fn port_and_lock(&self) -> Option<(u16, Option<&str>)> {
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

/// `POST /flush`'s answer (the built-in daemon's own): what it still owes the event log
/// after its wait — `pending` events, and `unread` when the mailbox's notes of before the
/// call were not read in time.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct FlushReply {
    pub success: bool,
    #[serde(default)]
    pub pending: u64,
    #[serde(default)]
    pub unread: bool,
}

impl FlushReply {
    /// Whether the daemon that answered `body` still owes events: a reader that must see
    /// every event so far asks again. Anything else (an error, an old daemon) owes none.
    pub fn owes(body: &[u8]) -> bool {
        serde_json::from_slice::<FlushReply>(body).is_ok_and(|r| r.pending > 0 || r.unread)
    }
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
    /// The built-in daemon's: the allocation's standing in its upstream Styxy
    /// (`{"state":"mirrored",…}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<serde_json::Value>,
    /// Styxy's: the `User-Agent` of the client that asked (`curl/…` for Styxy's own hook).
    #[serde(default, rename = "userAgent", skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct AllocationsReply {
    pub allocations: Vec<AllocationInfo>,
}

/// Styxy's character rules (docs/STYXY.md "Field rules and built-in types"): service types `[A-Za-z0-9-]` ≤ 50,
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
        assert_eq!(ok.port_and_lock(), Some((3000, Some("a"))));
        let reuse: AllocateReply = serde_json::from_str(
            r#"{"port":11430,"lockId":"b","message":"m","existing":true,"existingInstanceId":"x","existingPid":1,"allocatedAt":1}"#,
        )
        .unwrap();
        assert_eq!(reuse.port_and_lock(), Some((11430, Some("b"))));
        let err: AllocateReply =
            serde_json::from_str(r#"{"success":false,"error":"No available ports in range 6006-6029 for service type storybook","context":{"allocated_ports":[6006]}}"#)
                .unwrap();
        assert_eq!(err.port_and_lock(), None);
        let dry: AllocateReply = serde_json::from_str(r#"{"success":true,"port":0}"#).unwrap();
        assert_eq!(dry.port_and_lock(), None);
        assert!(serde_json::from_str::<AllocateReply>(r#"{"success":true,"port":70000}"#).is_err());
    }

    #[test]
    fn request_omits_what_styxy_rejects() {
        let r = AllocateRequest { service_type: "dev".into(), ..Default::default() };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"service_type":"dev"}"#);
    }

    #[test]
    fn requests_parse_as_styxy_takes_them() {
        let parse = |s: &str| serde_json::from_str::<AllocateRequest>(s).map_err(|e| e.to_string());
        let r = parse(r#"{"service_type":"dev","preferred_port":"3000","requested_port":null,"exclude":[3001,"3002"],"dry_run":null,"bind":"yes","x":1}"#).unwrap();
        assert_eq!((r.preferred_port, r.requested_port, r.exclude, r.dry_run, r.bind), (Some(3000), None, vec![3001, 3002], false, false));
        assert_eq!(parse(r#"{"service_type":null}"#).unwrap().service_type, "", "required: the daemon says so");
        for (body, why) in [
            (r#"{"service_type":"dev","preferred_port":null}"#, "preferred_port must be"),
            (r#"{"service_type":"dev","preferred_port":0}"#, "preferred_port must be"),
            (r#"{"service_type":"dev","requested_port":70000}"#, "requested_port must be"),
            (r#"{"service_type":"dev","exclude":[1,"x"]}"#, "exclude[] must be"),
            (r#"{"service_type":"dev","exclude":3}"#, "exclude must be"),
            (r#"{"service_type":"dev","dry_run":"yes"}"#, "boolean"),
            (r#"{"service_type":5}"#, "string"),
            (r#"{"service_type":"dev","pid":-1}"#, "u32"),
        ] {
            assert!(parse(body).is_err_and(|e| e.contains(why)), "{body}: {:?}", parse(body));
        }
        // what a client sends, the daemon reads back
        let full = AllocateRequest {
            service_type: "dev".into(),
            preferred_port: Some(3000),
            requested_port: Some(3000),
            exclude: vec![3000],
            bind: true,
            pid: Some(7),
            ..Default::default()
        };
        assert_eq!(parse(&serde_json::to_string(&full).unwrap()).unwrap(), full);
    }

    #[test]
    fn replies_serialise_in_styxy_shapes() {
        let ok = AllocateReply {
            success: Some(true),
            port: Some(3000),
            lock_id: Some("a".into()),
            message: Some("m".into()),
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&ok).unwrap(), r#"{"success":true,"port":3000,"lock_id":"a","message":"m"}"#);
        let full = AllocateReply {
            success: Some(false),
            error: Some("No available ports".into()),
            context: Some(ExhaustedContext { allocated_ports: vec![6006], port_range: [6006, 6029], service_type: "storybook".into() }),
            ..Default::default()
        };
        let text = serde_json::to_string(&full).unwrap();
        assert!(text.contains(r#""context":{"allocated_ports":[6006],"port_range":[6006,6029],"service_type":"storybook"}"#), "{text}");
        assert_eq!(serde_json::from_str::<AllocateReply>(&text).unwrap(), full);
        let other: AllocateReply = serde_json::from_str(r#"{"success":false,"error":"e","context":{"category":"x"}}"#).unwrap();
        assert_eq!((other.error.as_deref(), other.context), (Some("e"), None));
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
                let _ = r.port_and_lock();
            }
            let text = format!(r#"{{"success":{ok},"port":{port},"lock_id":"x"}}"#);
            if let Ok(r) = serde_json::from_str::<AllocateReply>(&text) {
                prop_assert!(r.port_and_lock().is_none_or(|(p, _)| p != 0 && i64::from(p) == port));
            }
        }

        #[test]
        fn rules_and_urls_never_panic(s in "[ -~]{0,40}") {
            let _ = crate::policy::Policy::default().add_rules(&s);
            let _ = crate::http::Endpoint::parse(&s);
        }
    }
}
