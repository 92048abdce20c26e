//! Styxy's own Claude Code PreToolUse hook (`universal-intercept.sh`, docs/STYXY.md
//! "The PreToolUse hook"): before a Bash command that looks like a server runs, it asks
//! Styxy for a port with `curl`, and the command then binds it under our library. That
//! reservation is the command's own: the grant of its requested port takes the hook's
//! lock instead of counting the port as another client's.

use styxy_preload_common::api::AllocationInfo;
use styxy_preload_common::procinfo;

use crate::state::Claim;

/// The hook's instance id when `~/.claude/styxy-instance-state` does not name one.
const DEFAULT_INSTANCE: &str = "claude-code-universal";

/// Whether Styxy's hook made `r` for the command asking in `claim`: asked with `curl`
/// under the hook's instance id, for the port the command asks for and the type our
/// policy gives it, from the command's project (its working directory, or the
/// `CLAUDE_PROJECT_DIR` Claude Code gives the hook), under the service name the hook
/// derives from the command.
pub fn reserved_for(r: &AllocationInfo, claim: &Claim, ty: &str) -> bool {
    // the cheap checks first: this runs for each held port a grant looks at
    let asked = claim.requested() == Some(r.port) && r.service_type == ty;
    if !asked || !r.user_agent.as_deref().is_some_and(|u| u.starts_with("curl/")) || r.instance_id.as_deref() != Some(&instance_id()) {
        return false;
    }
    let Some(pid) = claim.owner.as_ref().map(|o| o.pid) else { return false };
    let project = procinfo::environ(pid).into_iter().find(|(k, _)| k == "CLAUDE_PROJECT_DIR").and_then(|(_, v)| v.into_string().ok());
    let same_project = r.project_path.is_some() && (r.project_path == claim.req.project_path || r.project_path == project);
    same_project && procinfo::cmdline(pid).is_some_and(|cmd| service_name(ty, &cmd) == r.service_name)
}

/// The hook's instance id: the content of `~/.claude/styxy-instance-state`, else
/// `claude-code-universal`.
fn instance_id() -> String {
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_default();
    std::fs::read_to_string(home.join(".claude/styxy-instance-state"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_INSTANCE.into())
}

/// The hook's `generate_service_name`: the name it gives a command of type `ty`, from
/// words in the command line.
pub fn service_name(ty: &str, cmd: &str) -> String {
    let has = |w: &str| cmd.contains(w);
    let first = |pairs: &[(&[&str], &str)], other: &str| {
        pairs.iter().find(|(words, _)| words.iter().any(|w| has(w))).map_or(other, |(_, n)| n).to_string()
    };
    match ty {
        "dev" => first(
            &[
                (&["react"], "react-dev"),
                (&["next"], "nextjs-dev"),
                (&["vite"], "vite-dev"),
                (&["angular", "ng serve"], "angular-dev"),
                (&["vue"], "vue-dev"),
            ],
            "frontend-dev",
        ),
        "api" => first(
            &[
                (&["fastapi", "uvicorn"], "fastapi-server"),
                (&["django"], "django-server"),
                (&["flask"], "flask-server"),
                (&["express", "node"], "express-server"),
            ],
            "api-server",
        ),
        "test" => first(
            &[(&["cypress"], "cypress-e2e"), (&["playwright"], "playwright-e2e"), (&["jest"], "jest-tests"), (&["vitest"], "vitest-tests")],
            "test-runner",
        ),
        "storybook" => "component-dev".into(),
        other => format!("{other}-service"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_the_hook_gives_them() {
        assert_eq!(service_name("dev", "node /p/node_modules/.bin/vite --port 3000"), "vite-dev");
        assert_eq!(service_name("dev", "npx next dev"), "nextjs-dev");
        assert_eq!(service_name("api", "python3 -m http.server 8000"), "api-server");
        assert_eq!(service_name("api", "uvicorn app:app"), "fastapi-server");
        assert_eq!(service_name("storybook", "storybook dev"), "component-dev");
        assert_eq!(service_name("database", "postgres"), "database-service");
    }
}
