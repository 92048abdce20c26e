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
/// silently, so the URL they print is the one they serve. Each with the arguments that
/// turn its fallback off (`--strictPort`; an explicit port for tools that look for a free
/// one only when none was named): then it fails on a taken port, so it is moved instead.
pub const FALLS_BACK: &[(&str, Strict)] = &[
    ("jupyter", Strict::Flags(&["--port-retries=0", "--ServerApp.port_retries=0", "--NotebookApp.port_retries=0"])),
    ("jupyter-lab", Strict::Flags(&["--port-retries=0", "--ServerApp.port_retries=0"])),
    ("jupyter-notebook", Strict::Flags(&["--port-retries=0", "--NotebookApp.port_retries=0"])),
    ("jupyter-server", Strict::Flags(&["--port-retries=0", "--ServerApp.port_retries=0"])),
    ("jupyter_server", Strict::Flags(&["--port-retries=0", "--ServerApp.port_retries=0"])),
    ("vite", Strict::Flags(&["--strictPort", "--strict-port", "--strictPort=true"])),
    ("http-server", Strict::NamedPort(&["-p", "--port"])),
    // hugo server: another port when 1313 is taken, unless --port named one
    ("hugo", Strict::NamedPort(&["-p", "--port"])),
    ("webpack-dev-server", Strict::NamedPort(&["--port"])),
    ("webpack", Strict::NamedPort(&["--port"])),
];

/// What makes a tool of [`FALLS_BACK`] keep the port it was given.
#[derive(Debug, Clone, Copy)]
pub enum Strict {
    /// Any of these arguments.
    Flags(&'static [&'static str]),
    /// One of these options with a port number (`-p 8080`, `--port=8080`; not `auto`, not 0).
    NamedPort(&'static [&'static str]),
}

impl Strict {
    fn holds(&self, args: &[String]) -> bool {
        match self {
            Strict::Flags(flags) => args.iter().any(|a| flags.contains(&a.as_str())),
            Strict::NamedPort(opts) => args.iter().enumerate().any(|(i, a)| {
                let value = match a.split_once('=') {
                    Some((o, v)) if opts.contains(&o) => Some(v),
                    _ if opts.contains(&a.as_str()) => args.get(i + 1).map(String::as_str),
                    _ => None,
                };
                value.and_then(|v| v.parse::<u16>().ok()).is_some_and(|p| p != 0)
            }),
        }
    }
}

/// Whether `cmd` runs a tool of [`FALLS_BACK`] that will fall back (nothing in its
/// arguments turns that off).
pub fn falls_back(cmd: &[String]) -> bool {
    let base = |arg: &String| arg.rsplit('/').next().unwrap_or(arg).to_string();
    match cmd.iter().enumerate().find_map(|(i, a)| FALLS_BACK.iter().find(|(t, _)| *t == base(a)).map(|(_, s)| (i, s))) {
        Some((i, strict)) => !strict.holds(&cmd[i + 1..]),
        None => false,
    }
}

/// Node packages that find a free port by binding it and closing it, then hand that port
/// to the program: a probe moved silently would make them answer a port another session
/// holds (`get-port(3000)` → 3000 while the server then serves on 3001).
pub const PORT_FINDERS: &[&str] = &["get-port", "detect-port", "portfinder"];

/// Programs that run a Node project's code.
const NODE_RUNNERS: &[&str] = &["node", "nodejs", "npx", "npm", "pnpm", "yarn"];

/// Whether `cmd` runs a Node program whose own code finds its port with a
/// [`PORT_FINDERS`] package: the script `node` runs (`node server.mjs`), the script a
/// package.json `scripts` entry runs (`npm run dev`, `pnpm dev`, `yarn start`), or the
/// executable of an installed tool (`npx tool`: `node_modules/.bin/tool`) imports or
/// requires one. Such a program falls back by itself when its probe fails, and then
/// really gets the port it reports. What its project merely depends on does not count: a
/// fixed-port server in a project that lists get-port is moved, never made to fail.
pub fn finds_ports_itself(cmd: &[String], cwd: &Path) -> bool {
    program_files(cmd, cwd, 2).iter().any(|f| imports_port_finder(f))
}

/// The files of code `cmd` runs first, following a package.json script `depth` times.
fn program_files(cmd: &[String], cwd: &Path, depth: u32) -> Vec<PathBuf> {
    let Some(program) = cmd.first().map(|p| p.rsplit('/').next().unwrap_or(p)) else {
        return Vec::new();
    };
    if !NODE_RUNNERS.contains(&program) {
        return Vec::new();
    }
    let words: Vec<&String> = cmd[1..].iter().filter(|a| !a.starts_with('-')).collect();
    match program {
        "node" | "nodejs" => words.first().map(|f| cwd.join(f)).into_iter().collect(),
        "npx" => words.first().and_then(|tool| installed_bin(cwd, tool)).into_iter().collect(),
        _ if depth == 0 => Vec::new(),
        _ => {
            // npm run dev, npm start, pnpm dev, yarn start
            let name = words.iter().find(|w| !["run", "run-script"].contains(&w.as_str())).map(|w| w.as_str()).unwrap_or("start");
            let Some(script) = package_script(cwd, name) else { return Vec::new() };
            let argv: Vec<String> = script.split_whitespace().map(str::to_string).collect();
            let runs_node = argv.first().is_some_and(|p| NODE_RUNNERS.contains(&p.as_str()));
            match runs_node {
                true => program_files(&argv, cwd, depth - 1),
                // a tool of the project's own `node_modules/.bin` (`"dev": "vite"`)
                false => argv.first().and_then(|tool| installed_bin(cwd, tool)).into_iter().collect(),
            }
        }
    }
}

/// `node_modules/.bin/<tool>` of the nearest project above `cwd`, resolved to its file.
fn installed_bin(cwd: &Path, tool: &str) -> Option<PathBuf> {
    let tool = tool.split('@').find(|s| !s.is_empty())?; // npx tool@1.2
    cwd.ancestors().map(|d| d.join("node_modules/.bin").join(tool)).find(|p| p.is_file())?.canonicalize().ok()
}

/// The `scripts` entry `name` of the nearest `package.json` above `cwd`.
fn package_script(cwd: &Path, name: &str) -> Option<String> {
    let pkg = cwd.ancestors().map(|d| d.join("package.json")).find(|p| p.is_file())?;
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(pkg).ok()?).ok()?;
    v.get("scripts")?.get(name)?.as_str().map(str::to_string)
}

/// Whether the file of code at `path` (its first 256 KiB) imports or requires a
/// [`PORT_FINDERS`] package: `'get-port'` or `"get-port"` as a module name.
fn imports_port_finder(path: &Path) -> bool {
    let mut buf = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, 256 * 1024), &mut buf));
    if read.is_err() {
        return false;
    }
    let code = String::from_utf8_lossy(&buf);
    PORT_FINDERS.iter().any(|f| ["'", "\"", "`"].iter().any(|q| code.contains(&format!("{q}{f}{q}")) || code.contains(&format!("{q}{f}/"))))
}

/// A tool that takes its port as an argument: `exec` hands it the session's port there
/// (`--port auto`, or a port its arguments name), so it binds it and prints it.
#[derive(Debug)]
pub struct PortArg {
    pub tool: &'static str,
    /// The subcommand that serves (`hugo server`), if the tool has subcommands.
    serves: &'static [&'static str],
    /// The options naming the port, the first one used to add it.
    options: &'static [&'static str],
    /// The value is `host:port` (mkdocs `-a`); added as `127.0.0.1:port`.
    host_port: bool,
    pub default: u16,
}

pub const PORT_ARGS: &[PortArg] = &[
    PortArg { tool: "hugo", serves: &["server", "serve"], options: &["--port", "-p"], host_port: false, default: 1313 },
    PortArg { tool: "mkdocs", serves: &["serve"], options: &["--dev-addr", "-a"], host_port: true, default: 8000 },
    PortArg { tool: "http-server", serves: &[], options: &["--port", "-p"], host_port: false, default: 8080 },
    PortArg { tool: "jupyter", serves: &[], options: &["--port", "--ServerApp.port"], host_port: false, default: 8888 },
    PortArg { tool: "jupyter-lab", serves: &[], options: &["--port", "--ServerApp.port"], host_port: false, default: 8888 },
    PortArg { tool: "jupyter-notebook", serves: &[], options: &["--port", "--NotebookApp.port"], host_port: false, default: 8888 },
    PortArg { tool: "jupyter-server", serves: &[], options: &["--port", "--ServerApp.port"], host_port: false, default: 8888 },
];

/// Where a [`PORT_ARGS`] tool in a command takes its port.
#[derive(Debug)]
pub struct ArgPort {
    pub spec: &'static PortArg,
    /// The argument holding the port (`--port`'s value, `--port=N`, `host:N`) and the port.
    named: Option<(usize, u16)>,
}

/// The [`PORT_ARGS`] tool `cmd` runs as a server, with the port its arguments name.
pub fn arg_port(cmd: &[String]) -> Option<ArgPort> {
    let base = |a: &String| a.rsplit('/').next().unwrap_or(a).to_string();
    let (at, spec) = cmd.iter().enumerate().find_map(|(i, a)| PORT_ARGS.iter().find(|t| t.tool == base(a)).map(|t| (i, t)))?;
    let rest = &cmd[at + 1..];
    if !spec.serves.is_empty() && !rest.iter().any(|a| spec.serves.contains(&a.as_str())) {
        return None;
    }
    let port_of = |v: &str| {
        let p = if spec.host_port { v.rsplit(':').next()? } else { v };
        p.parse::<u16>().ok().filter(|p| *p != 0)
    };
    let named = rest.iter().enumerate().find_map(|(i, a)| {
        let value = match a.split_once('=') {
            Some((o, v)) if spec.options.contains(&o) => Some((at + 1 + i, v)),
            _ if spec.options.contains(&a.as_str()) => rest.get(i + 1).map(|v| (at + 2 + i, v.as_str())),
            _ => None,
        }?;
        Some((value.0, port_of(value.1)?))
    });
    Some(ArgPort { spec, named })
}

impl ArgPort {
    /// The port the arguments name.
    pub fn asked(&self) -> Option<u16> {
        self.named.map(|(_, p)| p)
    }

    /// Makes `cmd` name `port`: in place of the port it named, or as a new option.
    pub fn set(&self, cmd: &mut Vec<String>, port: u16) {
        match self.named {
            Some((i, old)) => {
                let arg = &cmd[i];
                let at = arg.rfind(&old.to_string()).unwrap_or(arg.len());
                cmd[i] = format!("{}{port}", &arg[..at]);
            }
            None => {
                cmd.push(self.spec.options[0].to_string());
                cmd.push(if self.spec.host_port { format!("127.0.0.1:{port}") } else { port.to_string() });
            }
        }
    }
}

/// The variables the first recognised tool of `cmd` reads, with its default ports;
/// `PORT` and 3000 for anything else (the PaaS convention most servers follow), nothing
/// for a tool that takes its port as an argument only ([`PORT_ARGS`]).
pub fn variables(cmd: &[String]) -> &'static [(&'static str, u16)] {
    if arg_port(cmd).is_some_and(|a| !a.spec.tool.starts_with("jupyter")) {
        return &[];
    }
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
    fn a_node_program_whose_code_uses_a_port_finder_falls_back_by_itself() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let app = root.join("app");
        write(&app.join("package.json"), r#"{"name":"app","scripts":{"dev":"node server.mjs","fixed":"node fixed.js","tool":"finder"}}"#);
        write(&app.join("server.mjs"), "import getPort from 'get-port';\nconst port = await getPort({port: 3000});\n");
        write(&app.join("fixed.js"), "require('http').createServer().listen(3000);\n");
        write(&app.join("node_modules/finder/cli.js"), "const portfinder = require(\"portfinder\");\n");
        std::fs::create_dir_all(app.join("node_modules/.bin")).unwrap();
        std::os::unix::fs::symlink("../finder/cli.js", app.join("node_modules/.bin/finder")).unwrap();
        for cmd in
            ["node server.mjs", "/usr/bin/node --watch server.mjs", "npm run dev", "pnpm dev", "yarn dev", "npx finder", "npm run tool"]
        {
            assert!(finds_ports_itself(&args(cmd), &app), "{cmd}");
        }
        assert!(finds_ports_itself(&args("node app/server.mjs"), root), "a script named from elsewhere");
        // the same project's fixed-port server: what it depends on does not count
        for cmd in ["node fixed.js", "npm run fixed", "npm start", "npx missing", "python3 -m http.server"] {
            assert!(!finds_ports_itself(&args(cmd), &app), "{cmd}");
        }
        assert!(!finds_ports_itself(&[], root));
        // a name in a comment or a string is not an import
        write(&app.join("talk.js"), "// we could use get-port here\nconsole.log('get-port is nice')\n");
        assert!(!finds_ports_itself(&args("node talk.js"), &app));
    }

    #[test]
    fn a_tool_told_to_keep_its_port_does_not_fall_back() {
        for cmd in [
            "npx vite",
            "npx vite preview",
            "jupyter lab --port 8888",
            "npx http-server site",
            "npx webpack serve",
            "npx http-server -p auto",
        ] {
            assert!(falls_back(&args(cmd)), "{cmd}");
        }
        for cmd in [
            "npx vite preview --strictPort",
            "npx vite --strict-port",
            "npx webpack serve --port 8080",
            "npx webpack-dev-server --port=8080",
            "npx http-server site -p 8080",
            "jupyter lab --port-retries=0",
            "python3 -m http.server",
        ] {
            assert!(!falls_back(&args(cmd)), "{cmd}");
        }
    }

    #[test]
    fn tools_taking_their_port_as_an_argument_are_handed_it_there() {
        let set = |cmd: &str, port| {
            let mut c = args(cmd);
            let a = arg_port(&c).unwrap_or_else(|| panic!("{cmd}"));
            a.set(&mut c, port);
            (a.asked(), c.join(" "))
        };
        assert_eq!(set("hugo server --port 1313", 4100), (Some(1313), "hugo server --port 4100".into()));
        assert_eq!(set("hugo server -p=1313 -D", 4100), (Some(1313), "hugo server -p=4100 -D".into()));
        assert_eq!(set("hugo server", 4100), (None, "hugo server --port 4100".into()));
        assert_eq!(set("mkdocs serve -a 127.0.0.1:8000", 8001), (Some(8000), "mkdocs serve -a 127.0.0.1:8001".into()));
        assert_eq!(set("python3 -m mkdocs serve", 8001), (None, "python3 -m mkdocs serve --dev-addr 127.0.0.1:8001".into()));
        assert_eq!(set("npx http-server site -p 8080", 8081), (Some(8080), "npx http-server site -p 8081".into()));
        assert_eq!(set("jupyter server --port=8888", 3001), (Some(8888), "jupyter server --port=3001".into()));
        // not serving, or not a tool of these
        for cmd in ["hugo", "hugo new site x", "mkdocs build", "python3 -m http.server 8000"] {
            assert!(arg_port(&args(cmd)).is_none(), "{cmd}");
        }
        assert_eq!(v("hugo server"), []);
        assert_eq!(v("jupyter lab"), [("JUPYTER_PORT", 8888)]);
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
