//! Well-known tools for `exec --port auto`: the environment variable each reads its port
//! from, and the port it asks for by default. `exec` allocates that port in the session
//! (or the session's existing mapping of it, or another of its type) before the tool
//! starts, so the tool binds it directly and prints the URL it really serves.

/// (tool, [(variable, default port)]). The first tool named in the command wins.
pub const TOOLS: &[(&str, &[(&str, u16)])] = &[
    ("next", &[("PORT", 3000)]),
    ("react-scripts", &[("PORT", 3000)]),
    ("nuxt", &[("PORT", 3000)]),
    ("remix", &[("PORT", 3000)]),
    ("astro", &[("PORT", 4321)]),
    ("express", &[("PORT", 3000)]),
    ("rails", &[("PORT", 3000)]),
    ("puma", &[("PORT", 3000)]),
    ("gunicorn", &[("PORT", 8000)]),
    ("uvicorn", &[("UVICORN_PORT", 8000)]),
    ("flask", &[("FLASK_RUN_PORT", 5000)]),
    ("jupyter", &[("JUPYTER_PORT", 8888)]),
    ("jupyter-lab", &[("JUPYTER_PORT", 8888)]),
    ("jupyter-notebook", &[("JUPYTER_PORT", 8888)]),
    ("storybook", &[("SBCONFIG_PORT", 6006)]),
    ("selenium-server", &[("SELENIUM_PORT", 4444)]),
    ("chromium", &[("CHROME_REMOTE_DEBUGGING_PORT", 9222)]),
    ("google-chrome", &[("CHROME_REMOTE_DEBUGGING_PORT", 9222)]),
    // PostgreSQL's server and clients all read PGPORT: the session's cluster, its socket
    // name (.s.PGSQL.<port>) and `psql` without -h agree
    ("postgres", &[("PGPORT", 5432)]),
    ("pg_ctl", &[("PGPORT", 5432)]),
    ("pg_ctlcluster", &[("PGPORT", 5432)]),
    ("psql", &[("PGPORT", 5432)]),
];

/// Tools that move to the next port by themselves when theirs is taken (and then print the
/// one they got): `exec` lets them (fallback mode) instead of moving their first bind
/// silently, so the URL they print is the one they serve.
pub const FALLS_BACK: &[&str] = &["jupyter", "jupyter-lab", "jupyter-notebook", "vite", "http-server", "webpack-dev-server", "webpack"];

/// Whether `cmd` runs a tool of [`FALLS_BACK`].
pub fn falls_back(cmd: &[String]) -> bool {
    cmd.iter().any(|arg| FALLS_BACK.contains(&arg.rsplit('/').next().unwrap_or(arg)))
}

/// The variables the first recognised tool of `cmd` reads, with its default ports;
/// `PORT` and 3000 for anything else (the PaaS convention most servers follow).
pub fn variables(cmd: &[String]) -> &'static [(&'static str, u16)] {
    for arg in cmd {
        let base = arg.rsplit('/').next().unwrap_or(arg);
        if let Some((_, vars)) = TOOLS.iter().find(|(name, _)| *name == base) {
            return vars;
        }
    }
    &[("PORT", 3000)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(cmd: &str) -> Vec<(&'static str, u16)> {
        variables(&cmd.split(' ').map(str::to_string).collect::<Vec<_>>()).to_vec()
    }

    #[test]
    fn recognises_tools_behind_runners() {
        assert_eq!(v("npx next dev"), [("PORT", 3000)]);
        assert_eq!(v("python3 -m uvicorn app:app"), [("UVICORN_PORT", 8000)]);
        assert_eq!(v("/usr/local/bin/flask run"), [("FLASK_RUN_PORT", 5000)]);
        assert_eq!(v("jupyter lab"), [("JUPYTER_PORT", 8888)]);
        assert_eq!(v("node server.js"), [("PORT", 3000)]);
        // every default is a coordinated port
        let policy = styxy_preload_client::policy::Policy::default();
        for (_, vars) in TOOLS {
            for (_, port) in *vars {
                assert!(matches!(policy.decide(*port), styxy_preload_client::policy::Decision::Coordinated(_)), "{port}");
            }
        }
    }
}
