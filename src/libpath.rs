//! Finding `libstyxy_preload.so`: next to this executable, then `$STYXY_PRELOAD_LIB`,
//! then the install locations.

use std::path::{Path, PathBuf};

pub const LIB: &str = "libstyxy_preload.so";

fn candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        c.push(dir.join(LIB));
        c.push(dir.join("../lib/styxy-preload").join(LIB));
    }
    if let Some(p) = std::env::var_os(styxy_preload_common::envvars::LIB).filter(|p| !p.is_empty()) {
        c.push(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("HOME") {
        c.push(PathBuf::from(home).join(".local/lib/styxy-preload").join(LIB));
    }
    c.push(PathBuf::from("/usr/local/lib/styxy-preload").join(LIB));
    c
}

/// The library's absolute path; or what is wrong and how to fix it.
pub fn find() -> Result<PathBuf, String> {
    let tried = candidates();
    for p in &tried {
        if p.is_file() {
            return Ok(p.canonicalize().unwrap_or_else(|_| p.clone()));
        }
    }
    let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(format!(
        "{LIB} not found (looked in: {}). Build it with `cargo build --release --workspace`, or set STYXY_PRELOAD_LIB=/path/to/{LIB}",
        list.join(", ")
    ))
}

/// `LD_PRELOAD` with `lib` first, keeping what the environment already preloads
/// (without an older copy of ours).
pub fn preload_value(lib: &Path) -> String {
    let old = std::env::var("LD_PRELOAD").unwrap_or_default();
    let rest = old.split([':', ' ']).filter(|p| !p.is_empty() && !p.ends_with(LIB));
    std::iter::once(lib.to_string_lossy().as_ref()).chain(rest).collect::<Vec<_>>().join(":")
}

/// This program's absolute path, for `envvars::CLI`.
pub fn cli() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.canonicalize().unwrap_or(exe).to_str()?.to_string())
}
