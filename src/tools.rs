//! Environment variables well-known tools read their port from, for `exec --port auto`:
//! recognise the tool from the command line and hand it its ports before it starts.

/// (tool, [(variable, service type)]). The first tool named in the command wins.
pub const TOOLS: &[(&str, &[(&str, &str)])] = &[
    ("next", &[("PORT", "dev")]),
    ("react-scripts", &[("PORT", "dev")]),
    ("nuxt", &[("PORT", "dev")]),
    ("remix", &[("PORT", "dev")]),
    ("astro", &[("PORT", "dev")]),
    ("express", &[("PORT", "dev")]),
    ("rails", &[("PORT", "dev")]),
    ("puma", &[("PORT", "dev")]),
    ("gunicorn", &[("PORT", "api")]),
    ("uvicorn", &[("UVICORN_PORT", "api")]),
    ("flask", &[("FLASK_RUN_PORT", "functions")]),
    ("jupyter", &[("JUPYTER_PORT", "dev")]),
    ("jupyter-lab", &[("JUPYTER_PORT", "dev")]),
    ("storybook", &[("SBCONFIG_PORT", "storybook")]),
    ("selenium-server", &[("SELENIUM_PORT", "hub")]),
    ("cypress", &[("CYPRESS_PORT", "test")]),
    ("chromium", &[("CHROME_REMOTE_DEBUGGING_PORT", "test")]),
    ("google-chrome", &[("CHROME_REMOTE_DEBUGGING_PORT", "test")]),
];

/// The variables the first recognised tool of `cmd` reads; `PORT` for anything else
/// (the PaaS convention most servers follow).
pub fn variables(cmd: &[String]) -> &'static [(&'static str, &'static str)] {
    for arg in cmd {
        let base = arg.rsplit('/').next().unwrap_or(arg);
        if let Some((_, vars)) = TOOLS.iter().find(|(name, _)| *name == base) {
            return vars;
        }
    }
    &[("PORT", "dev")]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(cmd: &str) -> Vec<&'static str> {
        variables(&cmd.split(' ').map(str::to_string).collect::<Vec<_>>()).iter().map(|(n, _)| *n).collect()
    }

    #[test]
    fn recognises_tools_behind_runners() {
        assert_eq!(v("npx next dev"), ["PORT"]);
        assert_eq!(v("python3 -m uvicorn app:app"), ["UVICORN_PORT"]);
        assert_eq!(v("/usr/local/bin/flask run"), ["FLASK_RUN_PORT"]);
        assert_eq!(v("node server.js"), ["PORT"]);
        let known = styxy_preload_client::policy::Policy::default();
        for (_, vars) in TOOLS {
            for (_, ty) in *vars {
                assert!(known.known(ty), "{ty}");
            }
        }
    }
}
