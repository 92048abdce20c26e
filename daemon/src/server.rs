//! The HTTP API: Styxy's endpoints and JSON shapes over a Unix socket (peer uid
//! checked) and optionally TCP (bearer token). Bad input gets a 4xx JSON error; one
//! slow client never blocks the others (a task per connection, bounded reads).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use styxy_preload_common::api::{
    port_of, valid_instance_id, valid_service_name, valid_service_type, AllocateReply, AllocateRequest, ErrorReply, ExhaustedContext,
    FlushReply,
};
use styxy_preload_common::{policy, procinfo};

use crate::record::Refusal;
use crate::state::{AllocError, Claim, Grant, Owner, UNNAMED};
use crate::{now_ms, portcheck, Shared};

/// The largest request body accepted (Styxy: 10 kB).
pub const MAX_BODY: usize = 16 * 1024;
/// How much of an oversized body is read (and dropped) before answering 413.
const DRAIN_MAX: usize = 8 << 20;
const BODY_TIMEOUT: Duration = Duration::from_secs(2);

/// Who is on the other end of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// From `SO_PEERCRED` on the Unix socket; unknown over TCP.
    pub pid: Option<u32>,
    pub tcp: bool,
}

pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorReply { success: false, error: self.1 })).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/config", get(config))
        .route("/allocate", post(allocate))
        .route("/allocate/{lock_id}", delete(release))
        .route("/allocations", get(allocations))
        .route("/check/{port}", get(check))
        .route("/instance/register", post(instance_register))
        .route("/instance/{id}/heartbeat", put(heartbeat))
        .route("/instance/list", get(instance_list))
        .route("/register-instance", post(register_pid))
        .route("/suggest/{ty}", get(suggest))
        .route("/cleanup", post(cleanup))
        .route("/metrics", get(metrics))
        .route("/flush", post(flush))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(axum::middleware::from_fn_with_state(shared.clone(), guard))
        .with_state(shared)
}

/// Bearer-token check for TCP (`/status` is open, as on Styxy) and the idle clock.
async fn guard(AxState(sh): AxState<Arc<Shared>>, req: Request<Body>, next: axum::middleware::Next) -> Response {
    sh.last_activity.store(now_ms(), Ordering::Relaxed);
    let tcp = req.extensions().get::<Peer>().map(|p| p.tcp).unwrap_or(true);
    if tcp && req.uri().path() != "/status" {
        let h = req.headers();
        let given = h
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()));
        match (&sh.token, given) {
            (Some(t), Some(g)) if constant_time_eq(t.as_bytes(), g.trim().as_bytes()) => {}
            (_, None) => {
                return ApiError(StatusCode::UNAUTHORIZED, "Authentication required. Send Authorization: Bearer <token>".into())
                    .into_response()
            }
            _ => return ApiError(StatusCode::UNAUTHORIZED, "Invalid API key".into()).into_response(),
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the body, keeping at most `MAX_BODY` bytes. A bigger one is read to its end
/// (up to `DRAIN_MAX`) and discarded, so that the client, still sending, gets its 413
/// instead of a broken pipe.
async fn read_capped(mut body: Body) -> Result<Vec<u8>, ApiError> {
    use http_body_util::BodyExt;
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad(format!("unreadable request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total > DRAIN_MAX {
                break;
            }
            if total <= MAX_BODY {
                buf.extend_from_slice(&data);
            }
        }
    }
    if total > MAX_BODY {
        return Err(ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("request body over {MAX_BODY} bytes")));
    }
    Ok(buf)
}

/// Reads a JSON object body: 413 past `MAX_BODY`, 408 if it does not arrive in
/// time, 400 if it is not a JSON object.
async fn json_body(body: Body) -> Result<Map<String, Value>, ApiError> {
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, read_capped(body)).await {
        Err(_) => return Err(ApiError(StatusCode::REQUEST_TIMEOUT, "request body did not arrive in time".into())),
        Ok(r) => r?,
    };
    if bytes.is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad("request body must be a JSON object")),
        Err(e) => Err(ApiError::bad(format!("malformed JSON: {e}"))),
    }
}

fn port_value(v: &Value, field: &str) -> Result<u16, ApiError> {
    port_of(v).ok_or_else(|| ApiError::bad(format!("{field} must be an integer between 1 and 65535")))
}

fn pid_value(v: &Value) -> Result<u32, ApiError> {
    v.as_u64().and_then(|p| u32::try_from(p).ok()).and_then(valid_pid).ok_or_else(|| ApiError::bad("pid must be a positive integer"))
}

fn valid_pid(p: u32) -> Option<u32> {
    (p > 0 && p <= i32::MAX as u32).then_some(p)
}

fn opt_str<'a>(m: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad(format!("{field} must be a string"))),
    }
}

/// The allocate request's body, parsed into the clients' own type ([`AllocateRequest`]:
/// types and port ranges), checked against Styxy's rules and the daemon's own, and made
/// a [`Claim`] of its owner: the caller, or the pid it names when that may own it.
fn parse_allocate(m: Map<String, Value>, peer: Peer) -> Result<Claim, ApiError> {
    let mut r = AllocateRequest::deserialize(Value::Object(m)).map_err(|e| ApiError::bad(e.to_string()))?;
    if r.service_type.is_empty() {
        return Err(ApiError::bad("service_type is required"));
    }
    if !valid_service_type(&r.service_type) {
        return Err(ApiError::bad("service_type must be 1-50 characters of A-Z, a-z, 0-9 and -"));
    }
    if !valid_service_name(r.service_name.as_deref().unwrap_or(UNNAMED)) {
        return Err(ApiError::bad("service_name must be 1-100 characters of A-Z, a-z, 0-9, ., _ and -"));
    }
    if r.instance_id.as_deref().is_some_and(|s| !valid_instance_id(s)) {
        return Err(ApiError::bad("instance_id must be 1-100 characters of A-Z, a-z, 0-9, _ and -"));
    }
    if r.project_path.as_ref().is_some_and(|p| p.len() > 1000) {
        return Err(ApiError::bad("project_path must be at most 1000 characters"));
    }
    if r.exclude.len() > 256 {
        return Err(ApiError::bad("exclude must be an array of at most 256 ports"));
    }
    let pid = r.pid.map(|p| valid_pid(p).ok_or_else(|| ApiError::bad("pid must be a positive integer"))).transpose()?;
    r.comm = r.comm.map(|c| c.chars().take(64).collect::<String>());
    let mut claim = Claim::new(r, None);
    let owner_pid = match pid {
        Some(p) => Some(verified_pid(p, peer, claim.session())?),
        None => peer.pid,
    };
    if claim.req.comm.is_none() {
        claim.req.comm = owner_pid.and_then(procinfo::comm);
    }
    claim.owner = owner_pid.map(Owner::pid);
    Ok(claim)
}

/// An owner pid a client names must be its own, its parent's (`styxy-preload port`
/// allocates for the shell that asked), one of its descendants (the seccomp supervisor
/// for its tree), or a process of the session it allocates for: any other pid
/// (`pid: 1`) would keep a port forever.
fn verified_pid(pid: u32, peer: Peer, session: Option<&str>) -> Result<u32, ApiError> {
    if may_name(peer.pid, pid, session) {
        return Ok(pid);
    }
    Err(ApiError::bad(format!(
        "pid {pid} is neither the caller, its parent or child, nor a process of session {}",
        session.unwrap_or("(none)")
    )))
}

/// Whether process `peer` (`None`: a TCP client) may ask for `pid` ([`verified_pid`]'s
/// rule): [`may_name_below`], or its parent (`styxy-preload port` allocates for the
/// shell that asked).
pub(crate) fn may_name(peer: Option<u32>, pid: u32, session: Option<&str>) -> bool {
    peer.is_some_and(|p| procinfo::parent(p) == Some(pid)) || may_name_below(peer, pid, session)
}

/// Whether process `peer` may ask for `pid`: itself, one of its descendants, or a process
/// whose environment carries `session` (`hook.sock`'s rule for an ask made for another
/// process: the seccomp supervisor's, for the program it traces).
pub(crate) fn may_name_below(peer: Option<u32>, pid: u32, session: Option<&str>) -> bool {
    let own = || peer.is_some_and(|p| p == pid || procinfo::descends_from(pid, p));
    own() || session.is_some_and(|s| procinfo::env_is(pid, styxy_preload_common::envvars::SESSION, s))
}

async fn allocate(AxState(sh): AxState<Arc<Shared>>, Extension(peer): Extension<Peer>, body: Body) -> ApiResult {
    let m = json_body(body).await?;
    let req = parse_allocate(m, peer)?;
    match sh.grant(&req).await {
        Ok(g) => Ok(Json(grant_reply(&req, g)).into_response()),
        Err(Refusal::State(e)) => refused(&sh, e),
        // not on disk, so not made: nothing would remember it after a restart
        Err(Refusal::Unjournaled(why)) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, why)),
    }
}

/// The answer to a grant: Styxy's shapes, for a dry run or an allocation.
fn grant_reply(claim: &Claim, g: Grant) -> AllocateReply {
    if claim.req.dry_run {
        return AllocateReply {
            success: Some(true),
            port: Some(g.port),
            dry_run: true,
            message: Some(format!("Port {} is available", g.port)),
            service_type: Some(claim.req.service_type.clone()),
            service_name: Some(claim.service_name().to_string()),
            holder: g.holder,
            ..Default::default()
        };
    }
    AllocateReply {
        success: Some(true),
        port: Some(g.port),
        lock_id: Some(g.lock_id),
        existing: g.existing.then_some(true),
        message: Some(format!("Port {} allocated for {} service", g.port, claim.req.service_type)),
        holder: g.holder,
        ..Default::default()
    }
}

/// The answer to a refusal: a 400 saying why (Styxy's exhausted-range shape for one).
fn refused(sh: &Shared, e: AllocError) -> ApiResult {
    let message = refusal_message(sh, &e);
    match e {
        AllocError::Exhausted { ty, range, allocated } => {
            let reply = AllocateReply {
                success: Some(false),
                error: Some(message),
                context: Some(ExhaustedContext { allocated_ports: allocated, port_range: [range.0, range.1], service_type: ty }),
                ..Default::default()
            };
            Ok((StatusCode::BAD_REQUEST, Json(reply)).into_response())
        }
        _ => Err(ApiError::bad(message)),
    }
}

/// A refusal as the API words it: its status and message (a hooked bind's event says the
/// same, `hook.rs`).
pub(crate) fn refusal(sh: &Shared, r: &Refusal) -> (u16, String) {
    match r {
        Refusal::State(e) => (400, refusal_message(sh, e)),
        Refusal::Unjournaled(why) => (503, why.clone()),
    }
}

fn refusal_message(sh: &Shared, e: &AllocError) -> String {
    match e {
        AllocError::UnknownType(t) => {
            let st = sh.state.lock();
            let names: Vec<&str> = st.types().iter().map(|t| t.name.as_str()).collect();
            format!("unknown service type '{t}'; known types: {}", names.join(", "))
        }
        // only the shim's KEEP asks for exactly its port (hook.rs)
        AllocError::NotExactly => "the preferred port cannot be granted".to_string(),
        AllocError::NotOfType { port, ty } => {
            format!("port {port} is not a {ty} port: a privileged, ephemeral or reserved port, or another type's")
        }
        AllocError::Quota { who, limit } => format!("{who} hold {limit} ports, the most allowed: release some first"),
        AllocError::Exhausted { ty, range, .. } => format!("No available ports in range {}-{} for service type {ty}", range.0, range.1),
    }
}

fn valid_uuid_v4(s: &str) -> bool {
    uuid::Uuid::parse_str(s).map(|u| u.get_version_num() == 4 && s.len() == 36).unwrap_or(false)
}

async fn release(AxState(sh): AxState<Arc<Shared>>, Path(lock_id): Path<String>) -> ApiResult {
    if !valid_uuid_v4(&lock_id) {
        return Err(ApiError::bad("lock_id must be a valid UUID v4"));
    }
    match sh.release(&lock_id) {
        Some(a) => Ok(Json(json!({"success": true, "port": a.port, "message": format!("Port {} released", a.port)})).into_response()),
        None => Err(ApiError::bad(format!("Lock ID {lock_id} not found"))),
    }
}

async fn status(AxState(sh): AxState<Arc<Shared>>) -> Response {
    let allocations = sh.state.lock().len();
    Json(json!({
        "status": "running",
        "daemon": "styxy-preload",
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "netns": procinfo::netns(procinfo::SELF),
        "run_mode": crate::activation::run_mode().as_str(),
        "uptime": sh.started.elapsed().as_secs(),
        "allocations": allocations,
        "instances": sh.instances.lock().len(),
        "memory": {"rss_bytes": rss_bytes()},
        "upstream": crate::upstream::report(&sh),
    }))
    .into_response()
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    pages * 4096
}

async fn config(AxState(sh): AxState<Arc<Shared>>) -> Response {
    let st = sh.state.lock();
    // Styxy's shape: the types of our own (debug) are the daemon's business, never a
    // client's to pass on to Styxy
    let types: Map<String, Value> = st
        .types()
        .iter()
        .filter(|t| !policy::local_type(&t.name))
        .map(|t| {
            (
                t.name.clone(),
                json!({"preferred_ports": t.preferred, "range": [t.range.0, t.range.1], "description": format!("{} services", t.name),
                       "examples": [], "instance_behavior": if t.single { "single" } else { "multi" }}),
            )
        })
        .collect();
    Json(json!({"service_types": types, "compliance": {}})).into_response()
}

/// An allocation in Styxy's shape plus ours; `upstream`: its standing in Styxy, when the
/// daemon fronts one.
fn allocation_json(a: &crate::state::Allocation, now: u64, upstream: bool) -> Value {
    json!({
        "port": a.port,
        "lockId": a.lock_id,
        "service_type": a.service_type, "serviceType": a.service_type,
        "service_name": a.service_name, "serviceName": a.service_name,
        "instance_id": a.session, "instanceId": a.session,
        "project_path": a.project_path, "projectPath": a.project_path,
        "process_id": a.owners.first().map(|o| o.pid),
        "pids": a.owners.iter().map(|o| o.pid).collect::<Vec<_>>(),
        "allocated_at": humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(a.allocated_at_ms)).to_string(),
        "age_s": now.saturating_sub(a.allocated_at_ms) / 1000,
        "requested_port": a.requested_port,
        "comm": a.comm,
        "upstream": if upstream { serde_json::to_value(&a.upstream).unwrap_or(Value::Null) } else { Value::Null },
    })
}

async fn allocations(AxState(sh): AxState<Arc<Shared>>) -> Response {
    let now = now_ms();
    let st = sh.state.lock();
    let list: Vec<Value> = st.allocations().map(|a| allocation_json(a, now, sh.upstream.get().is_some())).collect();
    Json(json!({"allocations": list})).into_response()
}

async fn check(AxState(sh): AxState<Arc<Shared>>, Path(port): Path<String>) -> ApiResult {
    let port = port_value(&Value::String(port), "port")?;
    let st = sh.state.lock();
    let alloc = st.allocation(port).map(|a| allocation_json(a, now_ms(), sh.upstream.get().is_some()));
    let in_use = portcheck::port_in_use(port);
    Ok(Json(json!({
        "port": port,
        "available": alloc.is_none() && !in_use,
        "allocated_to": alloc,
        "system_usage": if in_use { json!({"in_use": true}) } else { Value::Null },
    }))
    .into_response())
}

async fn instance_register(AxState(sh): AxState<Arc<Shared>>, Extension(peer): Extension<Peer>, body: Body) -> ApiResult {
    let m = json_body(body).await?;
    let id = opt_str(&m, "instance_id")?.ok_or_else(|| ApiError::bad("instance_id is required"))?;
    if !valid_instance_id(id) {
        return Err(ApiError::bad("instance_id must be 1-100 characters of A-Z, a-z, 0-9, _ and -"));
    }
    // built-in extra: the pid of a process (an `env` shell, an `exec`) that anchors the
    // session: the daemon stays while it lives
    if let Some(v) = m.get("pid").filter(|v| !v.is_null()) {
        let pid = verified_pid(pid_value(v)?, peer, Some(id))?;
        let owner = Owner::of(pid).ok_or_else(|| ApiError::bad("pid is not a running process"))?;
        let mut anchors = sh.anchors.lock();
        if !anchors.contains(&owner) {
            anchors.push(owner);
        }
    }
    let now = now_ms();
    let entry = json!({"instance_id": id, "working_directory": m.get("working_directory"), "metadata": m.get("metadata"),
                       "registered_at": now, "last_heartbeat": now});
    sh.instances.lock().insert(id.to_string(), entry);
    Ok(Json(json!({"success": true, "instance_id": id, "message": format!("Instance {id} registered")})).into_response())
}

async fn heartbeat(AxState(sh): AxState<Arc<Shared>>, Path(id): Path<String>, body: Body) -> ApiResult {
    // read whatever the client sent, so that it gets the answer rather than a closed connection
    let _ = json_body(body).await;
    let now = now_ms();
    let mut inst = sh.instances.lock();
    match inst.get_mut(&id) {
        Some(e) => {
            e["last_heartbeat"] = json!(now);
            Ok(Json(json!({"success": true, "instance_id": id, "last_heartbeat": now})).into_response())
        }
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("Instance {id} not found"))),
    }
}

async fn instance_list(AxState(sh): AxState<Arc<Shared>>) -> Response {
    let list: Vec<Value> = sh.instances.lock().values().cloned().collect();
    Json(json!({"instances": list})).into_response()
}

/// `POST /register-instance`: Styxy's pid registration. The built-in daemon also
/// takes `port`: the pid (a `listen()`) becomes an owner of that port's allocation.
async fn register_pid(AxState(sh): AxState<Arc<Shared>>, Extension(peer): Extension<Peer>, body: Body) -> ApiResult {
    let m = json_body(body).await?;
    let session = opt_str(&m, "instance_id")?;
    let pid = match m.get("pid") {
        None | Some(Value::Null) => peer.pid,
        Some(v) => Some(verified_pid(pid_value(v)?, peer, session)?),
    };
    let id = match (session, pid) {
        (Some(i), _) => i.to_string(),
        (None, Some(p)) => format!("ldpreload-{p}"),
        (None, None) => return Err(ApiError::bad("instance_id or pid is required")),
    };
    let confirmed = match (m.get("port"), pid.and_then(Owner::of)) {
        (Some(p), Some(owner)) => {
            let port = port_value(p, "port")?;
            sh.confirm(port, owner)
        }
        _ => false,
    };
    Ok(Json(json!({"success": true, "instance_id": id, "confirmed": confirmed, "message": "registered"})).into_response())
}

async fn suggest(
    AxState(sh): AxState<Arc<Shared>>,
    Path(ty): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult {
    let count = q.get("count").and_then(|c| c.parse::<usize>().ok()).unwrap_or(5).clamp(1, 100);
    let mut st = sh.state.lock();
    let t = st.policy().service_type(&ty).cloned().ok_or_else(|| ApiError::bad(format!("unknown service type '{ty}'")))?;
    let ports = st.suggest(&t, count, now_ms());
    Ok(Json(json!({"service_type": ty, "suggestions": ports, "count": ports.len(), "message": "not reserved"})).into_response())
}

async fn cleanup(AxState(sh): AxState<Arc<Shared>>, body: Body) -> ApiResult {
    let m = json_body(body).await?;
    let force = m.get("force").and_then(Value::as_bool).unwrap_or(false);
    let cleaned = if force { sh.clear() } else { tokio::task::spawn_blocking(move || sh.sweep()).await.unwrap_or(0) };
    Ok(Json(json!({"success": true, "cleaned": cleaned, "message": format!("Cleaned {cleaned} allocations")})).into_response())
}

/// Waits (at most 250 ms) until every bind the shim was granted has been logged: a
/// reader of the event log (`log`, `stats`, `exec`'s summary) asks first, so a bind made
/// just before it is in the log it reads (docs/ARCHITECTURE.md "Hook ↔ daemon protocol").
/// The answer says what is still owed: `pending` events, and `unread` when the mailbox's
/// notes of before the call were not read in time (a reader that must see them asks again).
async fn flush(AxState(sh): AxState<Arc<Shared>>) -> Response {
    let wait = || std::time::Instant::now() + std::time::Duration::from_millis(250);
    // the notes left in the mailbox before now: read at the hook server's next turn
    let mut unread = false;
    if let Some(ring) = sh.hook_ring.get() {
        let (asked, until) = (sh.mail_asked.fetch_add(1, Ordering::AcqRel) + 1, wait());
        ring();
        while sh.mail_read.load(Ordering::Acquire) < asked && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        unread = sh.mail_read.load(Ordering::Acquire) < asked;
    }
    let until = wait();
    while sh.hook_pending.load(Ordering::Acquire) > 0 && std::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    Json(FlushReply { success: true, pending: sh.hook_pending.load(Ordering::Acquire) as u64, unread }).into_response()
}

async fn metrics(AxState(sh): AxState<Arc<Shared>>) -> Response {
    let text = {
        let st = sh.state.lock();
        sh.metrics.render(&st)
    };
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            "[ -~]{0,12}".prop_map(Value::String),
            (0u32..70000).prop_map(|n| json!(n)),
            (0u32..70000).prop_map(|n| Value::String(n.to_string())),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,16}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn request() -> impl Strategy<Value = Map<String, Value>> {
        let field = prop_oneof![
            Just("service_type"),
            Just("service_name"),
            Just("preferred_port"),
            Just("requested_port"),
            Just("instance_id"),
            Just("project_path"),
            Just("dry_run"),
            Just("pid"),
            Just("comm"),
            Just("exclude"),
        ];
        let known = prop_oneof![Just(json!("dev")), Just(json!("api")), Just(json!("ai")), json_value()];
        prop::collection::vec((field, known), 0..8).prop_map(|kv| kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Whatever the body, validation answers Ok or a 4xx, never panics, and what it
        /// accepts satisfies Styxy's rules.
        #[test]
        fn validation_never_panics(m in request()) {
            match parse_allocate(m, Peer { pid: None, tcp: false }) {
                Ok(r) => {
                    prop_assert!(valid_service_type(&r.req.service_type));
                    prop_assert!(r.req.preferred_port.is_none_or(|p| p != 0));
                    prop_assert!(r.session().is_none_or(valid_instance_id));
                }
                Err(ApiError(status, msg)) => {
                    prop_assert!(status.is_client_error());
                    prop_assert!(!msg.is_empty());
                }
            }
        }
    }
}
