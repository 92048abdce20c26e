//! Which ports are coordinated, and as which service type: a pure function of the
//! port (README "Which ports are coordinated"), over Styxy's 17 built-in service types.

use serde_json::Value;

use crate::decide::Class;
use crate::envvars;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceType {
    pub name: String,
    pub range: (u16, u16),
    pub preferred: Vec<u16>,
    /// Styxy's `instance_behavior: "single"`: never remapped.
    pub single: bool,
}

/// What the hooks do with a bind of a given port. Borrows the policy's type names: no
/// allocation on the hooks' path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Pass through, never ask. The reason names the rule.
    Untouched(&'static str),
    /// Always ask the coordinator for this type; remap on conflict.
    Coordinated(&'a str),
    /// Bind as is; ask for a port of this fallback type only after `EADDRINUSE`.
    OnConflict(&'a str),
    /// A single-instance type: never remapped, a second instance fails as usual.
    Single(&'a str),
}

impl Class {
    /// The class of a policy's decision.
    pub fn of(d: &Decision) -> Class {
        match d {
            Decision::Untouched(_) => Class::Untouched,
            Decision::Coordinated(_) => Class::Coordinated,
            Decision::OnConflict(_) => Class::OnConflict,
            Decision::Single(_) => Class::Single,
        }
    }
}

impl<'a> Decision<'a> {
    pub fn service_type(&self) -> Option<&'a str> {
        match self {
            Decision::Untouched(_) => None,
            Decision::Coordinated(t) | Decision::OnConflict(t) | Decision::Single(t) => Some(t),
        }
    }
}

/// The most ports a coordinator's own service type (one Styxy does not build in) may span.
pub const MAX_USER_TYPE_PORTS: usize = 1000;

/// One entry of a coordinator's `service_types`, as it reads.
fn config_type(name: &str, v: &Value) -> Option<ServiceType> {
    let range = v.get("range").or_else(|| v.get("port_range")).and_then(Value::as_array);
    let port = |x: &Value| x.as_u64().and_then(|p| u16::try_from(p).ok());
    let ports: Option<Vec<u16>> = range.and_then(|r| r.iter().map(port).collect());
    let &[lo, hi] = ports.as_deref()? else { return None };
    let preferred = v.get("preferred_ports").and_then(Value::as_array).map(|a| a.iter().filter_map(port).collect()).unwrap_or_default();
    let single = v.get("instance_behavior").and_then(Value::as_str) == Some("single");
    Some(ServiceType { name: name.to_string(), range: (lo, hi), preferred, single })
}

/// The fallback type for ports outside every range (on-conflict remaps).
pub const FALLBACK_TYPE: &str = "dev";

/// Ports debuggers attach to by number: Node inspector, JDWP, debugpy.
pub const DEBUGGER_PORTS: [u16; 3] = [9229, 5005, 5678];

/// The service type of [`DEBUGGER_PORTS`]: a type of our own (Styxy has none). Its
/// allocations are never sent to Styxy, which would invent a range for an unknown name
/// and keep it for good.
pub const DEBUG_TYPE: &str = "debug";

/// Whether `ty` is a type of our own, unknown to Styxy ([`DEBUG_TYPE`]).
pub fn local_type(ty: &str) -> bool {
    ty == DEBUG_TYPE
}

/// Types of our own, added to whichever types the coordinator has: `debug`, whose range
/// (between Styxy's `database` and `storybook`) takes a second debugger's port.
pub fn local_types() -> Vec<ServiceType> {
    vec![ServiceType { name: DEBUG_TYPE.into(), range: (5680, 5699), preferred: vec![], single: false }]
}

/// Styxy's own listener and the ports its client probes.
pub const STYXY_PORTS: (u16, u16) = (9876, 9880);

/// Default ports of well-known tools outside every range, and the type they belong to.
pub const TOOL_DEFAULTS: [(u16, &str); 11] = [
    (5173, "dev"),  // Vite
    (5174, "dev"),  // Vite, second instance
    (4173, "dev"),  // vite preview
    (4200, "ui"),   // Angular
    (4321, "dev"),  // Astro
    (8888, "dev"),  // Jupyter
    (8080, "api"),  // everything
    (9222, "test"), // Chrome DevTools
    (6006, "storybook"),
    (1313, "docs"),      // Hugo
    (5000, "functions"), // Flask
];

/// Default ports of well-known tools inside the ranges: Next, Express, CRA and Rails
/// (3000), Jekyll and Phoenix (4000), Flask (5000), Storybook (6006), Django, uvicorn and
/// mkdocs (8000), DevTools (9222).
pub const RANGE_DEFAULTS: [u16; 6] = [3000, 4000, 5000, 6006, 8000, 9222];

/// A port some well-known tool asks for by default: a remap avoids it while other ports
/// of the type are free, so the next tool that wants it is not moved too.
pub fn tool_default(port: u16) -> bool {
    RANGE_DEFAULTS.contains(&port) || TOOL_DEFAULTS.iter().any(|(p, _)| *p == port) || DEBUGGER_PORTS.contains(&port)
}

fn t(name: &str, lo: u16, hi: u16, p0: u16) -> ServiceType {
    ServiceType { name: name.to_string(), range: (lo, hi), preferred: (p0..p0 + 4).collect(), single: name == "ai" }
}

/// Styxy's built-in service types (docs/STYXY.md "Field rules and built-in types"): name,
/// range, first preferred port.
const BUILTIN: [(&str, u16, u16, u16); 17] = [
    ("dev", 3000, 3099, 3000),
    ("monitoring", 3100, 3199, 3100),
    ("ui", 4000, 4099, 4000),
    ("docs", 4100, 4199, 4100),
    ("hub", 4400, 4499, 4400),
    ("functions", 5000, 5099, 5001),
    ("database", 5430, 5499, 5430),
    ("storybook", 6006, 6029, 6006),
    ("infrastructure", 6370, 6399, 6370),
    ("api", 8000, 8099, 8000),
    ("proxy", 8100, 8199, 8100),
    ("build", 8200, 8299, 8200),
    ("messaging", 9050, 9098, 9050),
    ("auth", 9099, 9199, 9099),
    ("test", 9200, 9299, 9200),
    ("coordination", 9870, 9899, 9870),
    ("ai", 11400, 11499, 11430),
];

/// Styxy's built-in service types.
pub fn builtin_types() -> Vec<ServiceType> {
    BUILTIN.iter().map(|(name, lo, hi, p0)| t(name, *lo, *hi, *p0)).collect()
}

/// Whether `ty` is one of Styxy's built-in types as it comes (not a user's own range).
fn builtin(ty: &ServiceType) -> bool {
    BUILTIN.iter().any(|(name, lo, hi, _)| ty.name == *name && ty.range == (*lo, *hi))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub lo: u16,
    pub hi: u16,
    /// `None`: leave these ports alone.
    pub service_type: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub types: Vec<ServiceType>,
    pub rules: Vec<Rule>,
    /// Ports of the coordinator in use (its TCP listener): never touched.
    pub coordinator_ports: Vec<u16>,
    /// The first port of the kernel's ephemeral range.
    pub ephemeral_low: u16,
}

impl Default for Policy {
    fn default() -> Self {
        let mut types: Vec<ServiceType> = builtin_types().into_iter().chain(local_types()).collect();
        types.sort_by_key(|t| t.range.0);
        Policy { types, rules: vec![], coordinator_ports: vec![], ephemeral_low: 32768 }
    }
}

impl Policy {
    pub fn decide(&self, port: u16) -> Decision<'_> {
        if port == 0 {
            return Decision::Untouched("port 0");
        }
        if (STYXY_PORTS.0..=STYXY_PORTS.1).contains(&port) || self.coordinator_ports.contains(&port) {
            return Decision::Untouched("coordinator port");
        }
        if let Some(r) = self.rules.iter().find(|r| (r.lo..=r.hi).contains(&port)) {
            return match &r.service_type {
                None => Decision::Untouched(envvars::PORTS),
                Some(ty) => self.typed(ty),
            };
        }
        if port < 1024 {
            return Decision::Untouched("privileged port");
        }
        if port >= self.ephemeral_low {
            return Decision::Untouched("ephemeral range");
        }
        if DEBUGGER_PORTS.contains(&port) && self.known(DEBUG_TYPE) {
            return self.typed(DEBUG_TYPE);
        }
        let range = self.types.iter().find(|t| (t.range.0..=t.range.1).contains(&port));
        let tool = TOOL_DEFAULTS.iter().find(|(p, ty)| *p == port && self.known(ty)).map(|(_, ty)| *ty);
        match (range, tool) {
            // a tool's default is its tool's type, also inside a built-in range of another
            // (vite preview's 4173 is a dev server, not docs); a user's own range wins
            (Some(r), Some(ty)) if builtin(r) => return self.typed(ty),
            (Some(r), _) => return self.typed(&r.name),
            (None, Some(ty)) => return self.typed(ty),
            (None, None) => {}
        }
        Decision::OnConflict(FALLBACK_TYPE)
    }

    fn typed<'a>(&'a self, ty: &'a str) -> Decision<'a> {
        match self.types.iter().find(|t| t.name == ty) {
            Some(t) if t.single => Decision::Single(ty),
            _ => Decision::Coordinated(ty),
        }
    }

    pub fn known(&self, ty: &str) -> bool {
        self.types.iter().any(|t| t.name == ty)
    }

    pub fn service_type(&self, name: &str) -> Option<&ServiceType> {
        self.types.iter().find(|t| t.name == name)
    }

    /// Adds `STYXY_PRELOAD_PORTS` rules: `port=type` or `from-to=type`, separated by
    /// commas or spaces; type `off` leaves the ports alone. Types must be known: an
    /// unknown name would make Styxy invent a range and keep it for good.
    pub fn add_rules(&mut self, spec: &str) -> Result<(), String> {
        for item in spec.split(|c: char| c == ',' || c.is_whitespace()).filter(|s| !s.is_empty()) {
            let (ports, ty) = item.split_once('=').ok_or_else(|| format!("'{item}': expected PORT=TYPE or FROM-TO=TYPE"))?;
            let parse = |s: &str| {
                s.trim().parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("'{item}': '{s}' is not a port (1-65535)"))
            };
            let (lo, hi) = match ports.split_once('-') {
                Some((a, b)) => (parse(a)?, parse(b)?),
                None => (parse(ports)?, parse(ports)?),
            };
            if lo > hi {
                return Err(format!("'{item}': {lo} is above {hi}"));
            }
            let service_type = match ty.trim() {
                "off" | "none" => None,
                t if self.known(t) => Some(t.to_string()),
                t => {
                    let names: Vec<&str> = self.types.iter().map(|t| t.name.as_str()).collect();
                    return Err(format!("'{item}': unknown service type '{t}' (known: {}, or off)", names.join(", ")));
                }
            };
            self.rules.push(Rule { lo, hi, service_type });
        }
        Ok(())
    }

    /// Takes the coordinator's service types (`GET /config`: `range` or `port_range`,
    /// `preferred_ports`, `instance_behavior`) in place of the current ones. A coordinator
    /// may narrow a built-in type but never widen it, and a type of its own (a user's,
    /// from Styxy's `config.json`) is taken only above 1023, at most
    /// [`MAX_USER_TYPE_PORTS`] ports, and clear of every other type: no answer makes
    /// arbitrary ports coordinated. Returns whether any type was taken.
    pub fn apply_config(&mut self, config: &Value) -> bool {
        let Some(map) = config.get("service_types").and_then(Value::as_object) else {
            return false;
        };
        let builtin = builtin_types();
        let mut types: Vec<ServiceType> = Vec::new();
        for (name, v) in map {
            let Some(mut t) = config_type(name, v) else { continue };
            match builtin.iter().find(|b| b.name == *name) {
                Some(b) => t.range = (t.range.0.max(b.range.0), t.range.1.min(b.range.1)),
                None if t.range.0 < 1024 || usize::from(t.range.1 - t.range.0) >= MAX_USER_TYPE_PORTS => continue,
                None => {}
            }
            let overlaps = |o: &ServiceType| t.range.0 <= o.range.1 && o.range.0 <= t.range.1;
            if t.range.0 > t.range.1 || types.iter().chain(builtin.iter().filter(|b| b.name != t.name)).any(overlaps) {
                continue;
            }
            t.preferred.retain(|p| (t.range.0..=t.range.1).contains(p));
            types.push(t);
        }
        if types.is_empty() {
            return false;
        }
        for local in local_types() {
            let overlaps = |t: &ServiceType| t.range.0 <= local.range.1 && local.range.0 <= t.range.1;
            if !types.iter().any(|t| t.name == local.name || overlaps(t)) {
                types.push(local);
            }
        }
        types.sort_by_key(|t| t.range.0);
        self.types = types;
        true
    }

    /// The policy of this process's environment: the coordinator's types
    /// (`STYXY_PRELOAD_TYPES`, its `GET /config` as `exec` hands it down),
    /// `STYXY_PRELOAD_PORTS` rules (bad entries are reported in the error and otherwise
    /// ignored), the kernel's ephemeral range and the coordinator's TCP port.
    pub fn from_env() -> (Policy, Option<String>) {
        Policy::from_vars(&|k| std::env::var_os(k))
    }

    /// [`Policy::from_env`] for an environment given by `var` (the one `exec` hands down).
    pub fn from_vars(var: crate::paths::Vars) -> (Policy, Option<String>) {
        let var = |k: &str| var(k).and_then(|v| v.into_string().ok());
        let mut p = Policy::default();
        if let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") {
            if let Some(lo) = range.split_whitespace().next().and_then(|s| s.parse().ok()) {
                p.ephemeral_low = lo;
            }
        }
        if let Some(port) = var(envvars::DAEMON_PORT).and_then(|s| s.parse().ok()) {
            p.coordinator_ports.push(port);
        }
        // the coordinator's own types (its GET /config), as `exec` hands them down
        if let Some(cfg) = var(envvars::TYPES).and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
            p.apply_config(&cfg);
        }
        let mut err = None;
        if let Some(spec) = var(envvars::PORTS) {
            if let Err(e) = p.add_rules(&spec) {
                err = Some(e);
            }
        }
        (p, err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let p = Policy::default();
        let c = |t: &'static str| Decision::Coordinated(t);
        let table = [
            (0, Decision::Untouched("port 0")),
            (80, Decision::Untouched("privileged port")),
            (1023, Decision::Untouched("privileged port")),
            (3000, c("dev")),
            (3099, c("dev")),
            (3100, c("monitoring")),
            (5173, c("dev")),
            (4173, c("dev")), // vite preview, inside docs' range
            (4174, c("docs")),
            (4200, c("ui")),
            (4321, c("dev")),
            (8888, c("dev")),
            (8000, c("api")),
            (8080, c("api")),
            (9222, c("test")),
            (9250, c("test")),
            (4444, c("hub")), // Selenium hub
            (6006, c("storybook")),
            (1313, c("docs")),
            (5000, c("functions")),
            (9229, c("debug")),
            (5005, c("debug")),
            (5678, c("debug")),
            (5690, c("debug")),
            (9876, Decision::Untouched("coordinator port")),
            (9880, Decision::Untouched("coordinator port")),
            (11434, Decision::Single("ai")),
            (12345, Decision::OnConflict("dev")),
            (32767, Decision::OnConflict("dev")),
            (32768, Decision::Untouched("ephemeral range")),
            (60000, Decision::Untouched("ephemeral range")),
        ];
        for (port, want) in table {
            assert_eq!(p.decide(port), want, "port {port}");
        }
    }

    #[test]
    fn every_builtin_type_is_known_and_ranges_do_not_overlap() {
        let types: Vec<ServiceType> = builtin_types().into_iter().chain(local_types()).collect();
        assert_eq!(builtin_types().len(), 17);
        let mut types = types;
        types.sort_by_key(|t| t.range.0);
        for w in types.windows(2) {
            assert!(w[0].range.1 < w[1].range.0, "{:?} overlaps {:?}", w[0], w[1]);
        }
        let p = Policy::default();
        for (port, ty) in TOOL_DEFAULTS {
            assert!(p.known(ty), "{port} maps to unknown type {ty}");
        }
    }

    #[test]
    fn the_shims_reading_of_rules_is_the_policys() {
        use crate::decide::rule_class;
        let specs =
            ["7000-7099=ui,12345=api,3000=off", " 80 = dev ", "3000=dev,3000=off", "5000=ui,bad,6000=dev", "9-8=dev,6000=dev", "0=dev"];
        for spec in specs {
            let mut p = Policy::default();
            let _ = p.add_rules(spec);
            for port in [80, 3000, 5000, 6000, 7000, 7050, 7099, 7100, 12345] {
                let covered = p.rules.iter().find(|r| (r.lo..=r.hi).contains(&port));
                let want = covered.map(|r| if r.service_type.is_some() { Class::Coordinated } else { Class::Untouched });
                assert_eq!(rule_class(spec.as_bytes(), port), want, "{spec:?} port {port}");
            }
        }
    }

    #[test]
    fn rules_override_and_reject_unknown_types() {
        let mut p = Policy::default();
        p.add_rules("12345=api, 7000-7099=ui 3000=off").unwrap();
        assert_eq!(p.decide(12345), Decision::Coordinated("api"));
        assert_eq!(p.decide(7050), Decision::Coordinated("ui"));
        assert_eq!(p.decide(3000), Decision::Untouched("STYXY_PRELOAD_PORTS"));
        for bad in ["1=Dev", "x=dev", "0=dev", "9-1=dev", "3000", "70000=dev"] {
            assert!(Policy::default().add_rules(bad).is_err(), "{bad}");
        }
        let e = Policy::default().add_rules("1234=vite").unwrap_err();
        assert!(e.contains("unknown service type 'vite'") && e.contains("dev"), "{e}");
    }

    #[test]
    fn coordinator_config_replaces_types() {
        let mut p = Policy::default();
        let cfg = serde_json::json!({"service_types": {
            "dev": {"preferred_ports": [3000], "range": [3000, 3009], "instance_behavior": "multi"},
            "ml": {"preferred_ports": [7000], "port_range": [7000, 7010], "instance_behavior": "single"},
            "broken": {"range": [1]}
        }});
        assert!(p.apply_config(&cfg));
        assert_eq!(p.types.len(), 3, "the coordinator's two, and debug");
        assert_eq!(p.decide(9229), Decision::Coordinated("debug"));
        assert_eq!(p.decide(3005), Decision::Coordinated("dev"));
        assert_eq!(p.decide(3050), Decision::OnConflict("dev"));
        assert_eq!(p.decide(7005), Decision::Single("ml"));
        assert!(!p.apply_config(&serde_json::json!({"error": "x"})));
        assert_eq!(p.types.len(), 3);
    }

    #[test]
    fn a_coordinator_cannot_widen_a_type_or_coordinate_arbitrary_ports() {
        let mut p = Policy::default();
        let cfg = serde_json::json!({"service_types": {
            "dev": {"preferred_ports": [2000, 3000], "range": [2000, 3500]},
            "everything": {"preferred_ports": [1024], "range": [1024, 32767]},
            "low": {"preferred_ports": [80], "range": [80, 90]},
            "inside-api": {"preferred_ports": [8050], "range": [8050, 8060]},
            "ml": {"preferred_ports": [12700], "range": [12700, 12799]}
        }});
        assert!(p.apply_config(&cfg));
        let names: Vec<&str> = p.types.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["dev", "debug", "ml"], "a type over 1000 ports, under 1024 or over another type's is refused (debug is ours)");
        assert_eq!(p.types[0].range, (3000, 3099), "dev is not widened");
        assert_eq!(p.types[0].preferred, [3000]);
        assert_eq!(p.decide(5432), Decision::OnConflict("dev"), "not coordinated: bound as asked");
    }
}
