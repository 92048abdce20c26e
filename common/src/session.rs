//! Sessions: one agent, one terminal or one `exec` tree, named by
//! `STYXY_PRELOAD_SESSION` and sent to the coordinator as Styxy's `instance_id`.

use crate::api::valid_instance_id;

/// The session of this process, if any. A value outside Styxy's instance-id rules is
/// made to fit (other characters become `_`) rather than sent as is.
pub fn from_env() -> Option<String> {
    from_vars(&|k| std::env::var_os(k))
}

/// [`from_env`] for an environment given by `var`.
pub fn from_vars(var: crate::paths::Vars) -> Option<String> {
    let raw = var(crate::envvars::SESSION).filter(|s| !s.is_empty())?;
    Some(sanitize(&raw.to_string_lossy()))
}

pub fn sanitize(raw: &str) -> String {
    if valid_instance_id(raw) {
        return raw.to_string();
    }
    let s: String = raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(100).collect();
    if s.is_empty() {
        "_".to_string()
    } else {
        s
    }
}

/// A new session id: `s-<pid>-<time>`, unique on this machine.
pub fn new_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    format!("s-{}-{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

/// The 32-bit tag of a session in the shared port map (`mapview::tag`, which the shim
/// computes the same way).
pub fn tag(session: &str) -> u32 {
    crate::mapview::tag(session.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert_eq!(sanitize("agent-1_a"), "agent-1_a");
        assert_eq!(sanitize("my agent/1"), "my_agent_1");
        assert_eq!(sanitize(&"x".repeat(300)).len(), 100);
        assert!(valid_instance_id(&new_id()));
        assert_ne!(tag("a"), tag("b"));
        assert_ne!(tag(""), 0);
    }
}
