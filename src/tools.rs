//! Well-known tools for `exec --port auto`: the environment variable each reads its port
//! from, and the port it asks for by default. `exec` allocates that port in the session
//! (or the session's existing mapping of it, or another of its type) before the tool
//! starts, so the tool binds it directly and prints the URL it really serves.

use std::path::{Path, PathBuf};

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
pub const FALLS_BACK: &[&str] = &[
    "jupyter",
    "jupyter-lab",
    "jupyter-notebook",
    "jupyter-server",
    "jupyter_server",
    "vite",
    "http-server",
    "webpack-dev-server",
    "webpack",
];

/// Whether `cmd` runs a tool of [`FALLS_BACK`].
pub fn falls_back(cmd: &[String]) -> bool {
    cmd.iter().any(|arg| FALLS_BACK.contains(&arg.rsplit('/').next().unwrap_or(arg)))
}

/// Node packages that find a free port by binding it and closing it, then hand that port
/// to the program: a probe moved silently would make them answer a port another session
/// holds (`get-port(3000)` → 3000 while the server then serves on 3001).
pub const PORT_FINDERS: &[&str] = &["get-port", "detect-port", "portfinder"];

/// Programs that run a Node project's code.
const NODE_RUNNERS: &[&str] = &["node", "nodejs", "npx", "npm", "pnpm", "yarn"];

/// Whether `cmd` runs a Node program (`node x.js`, `npx tool`, `npm run dev`) whose
/// project uses a [`PORT_FINDERS`] package: the nearest `package.json` above `cwd`, or
/// above the directory of a file named in `cmd` (the script), lists one in its
/// `dependencies` or `devDependencies`. Such a program falls back by itself when its
/// probe fails, and then really gets the port it reports.
pub fn finds_ports_itself(cmd: &[String], cwd: &Path) -> bool {
    let Some(program) = cmd.first() else {
        return false;
    };
    if !NODE_RUNNERS.contains(&program.rsplit('/').next().unwrap_or(program)) {
        return false;
    }
    let scripts = cmd[1..].iter().filter(|a| !a.starts_with('-')).map(|a| cwd.join(a)).filter(|p| p.is_file());
    let starts = std::iter::once(cwd.to_path_buf()).chain(scripts.filter_map(|p| p.parent().map(Path::to_path_buf)));
    starts.filter_map(|dir| nearest_package_json(&dir)).any(|pkg| uses_port_finder(&pkg))
}

/// The `package.json` in `dir` or the nearest directory above it.
fn nearest_package_json(dir: &Path) -> Option<PathBuf> {
    dir.ancestors().map(|d| d.join("package.json")).find(|p| p.is_file())
}

fn uses_port_finder(package_json: &Path) -> bool {
    let Some(pkg) = std::fs::read(package_json).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()) else {
        return false;
    };
    ["dependencies", "devDependencies"]
        .iter()
        .filter_map(|k| pkg.get(k)?.as_object())
        .any(|deps| PORT_FINDERS.iter().any(|f| deps.contains_key(*f)))
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

    fn args(cmd: &str) -> Vec<String> {
        cmd.split(' ').map(str::to_string).collect()
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_node_project_using_a_port_finder_falls_back_by_itself() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        // a project with get-port, run from a folder below it
        write(&root.join("app/package.json"), r#"{"name":"app","dependencies":{"express":"4","get-port":"7.2.0"}}"#);
        write(&root.join("app/server.mjs"), "");
        std::fs::create_dir_all(root.join("app/src/deep")).unwrap();
        for cmd in ["node server.mjs", "npx vite-node x", "npm run dev", "/usr/bin/node --watch server.mjs", "pnpm dev", "yarn start"] {
            assert!(finds_ports_itself(&args(cmd), &root.join("app")), "{cmd}");
        }
        assert!(finds_ports_itself(&args("node server.mjs"), &root.join("app/src/deep")), "the nearest package.json above cwd");
        // a script in a project of its own, run from elsewhere: its folder counts
        assert!(finds_ports_itself(&args("node app/server.mjs"), root));
        let abs = root.join("app/server.mjs").display().to_string();
        assert!(finds_ports_itself(&["node".to_string(), abs], Path::new("/")));
        // devDependencies too, and each finder
        for (i, f) in PORT_FINDERS.iter().enumerate() {
            let dir = root.join(format!("dev{i}"));
            write(&dir.join("package.json"), &format!(r#"{{"devDependencies":{{"{f}":"*"}}}}"#));
            assert!(finds_ports_itself(&args("npm run dev"), &dir), "{f}");
        }
    }

    #[test]
    fn other_projects_and_programs_do_not() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        write(&root.join("package.json"), r#"{"dependencies":{"get-port":"7"}}"#);
        // the nearest package.json decides, not one further up
        write(&root.join("next-app/package.json"), r#"{"dependencies":{"next":"15"},"scripts":{"get-port":"x"}}"#);
        assert!(!finds_ports_itself(&args("npx next dev"), &root.join("next-app")));
        // a name elsewhere in the file is not a dependency
        write(&root.join("other/package.json"), r#"{"description":"no get-port here","peerDependencies":{"portfinder":"1"}}"#);
        assert!(!finds_ports_itself(&args("node x.js"), &root.join("other")));
        // not JSON, and no package.json at all
        write(&root.join("broken/package.json"), "{ not json");
        assert!(!finds_ports_itself(&args("node x.js"), &root.join("broken")));
        assert!(!finds_ports_itself(&args("node x.js"), Path::new("/proc/self")));
        // not a Node program, though its project uses get-port
        assert!(!finds_ports_itself(&args("python3 -m http.server"), root));
        assert!(!finds_ports_itself(&[], root));
    }

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
        let policy = styxy_preload_common::policy::Policy::default();
        for (_, vars) in TOOLS {
            for (_, port) in *vars {
                assert!(matches!(policy.decide(*port), styxy_preload_common::policy::Decision::Coordinated(_)), "{port}");
            }
        }
    }
}
