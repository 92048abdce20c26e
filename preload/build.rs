//! Builds the always-loaded interposer `libstyxy_preload.so` from `shim/` (the crate root
//! `shim/lib.rs` and its modules beside it) and puts it in the profile's output directory,
//! beside the CLI.
//!
//! It is a separate `rustc` call because the shim is `no_std` and needs
//! `-C panic=abort`, which Cargo only sets per profile, while the CLI (and the seccomp
//! supervisor in it) unwinds.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    // the shim's crate root, its modules, and the common files it includes (each named
    // once, by its `#[path = "…"]` in shim/lib.rs)
    println!("cargo:rerun-if-changed=shim");
    let root = std::fs::read_to_string("shim/lib.rs").expect("shim/lib.rs");
    for included in root.lines().filter_map(|l| l.trim().strip_prefix("#[path = \"")?.strip_suffix("\"]")) {
        println!("cargo:rerun-if-changed=shim/{included}");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET").expect("TARGET");
    let host = std::env::var("HOST").expect("HOST");
    let so = out.join("libstyxy_preload.so");
    let mut cmd = Command::new(rustc);
    cmd.args(["--crate-name", "styxy_preload", "--crate-type", "cdylib", "--edition", "2021"])
        // optimised for size: a hook's time is its system calls, and every process maps
        // and loads the library (48 kB at `s`, 60 kB at 3, the same hooks' timings)
        .args(["-C", "panic=abort", "-C", "opt-level=s", "-C", "debuginfo=0", "-C", "strip=symbols"])
        // (its unwind tables stay: a thread cancelled in libc's connect, a cancellation
        // point the connect hook calls, unwinds through the hook's frame; the shim's own
        // waits are system calls made directly, which no cancellation interrupts)
        // one unit: split in several, a copy of a `core` function no unit calls any more
        // can stay behind, and its panic path pulls in `rust_eh_personality`, a symbol
        // nothing defines (the library would not load)
        .args(["-C", "codegen-units=1"])
        // separate-code starts the relocated data on a page of its own: without it, the data
        // straddled two pages whenever the code's end fell late in a page, and every process
        // paid ~7 µs more at load (a second page to relocate and protect)
        .args(["-C", "link-arg=-Wl,-z,now,-z,relro,-z,separate-code"])
        .arg("-o")
        .arg(&so)
        .arg("shim/lib.rs");
    if target != host {
        cmd.args(["--target", &target]);
    }
    let status = cmd.status().expect("cannot run rustc for the shim");
    assert!(status.success(), "building the interposer (shim/lib.rs) failed");
    // OUT_DIR is <target-dir>/<profile>/build/<pkg>-<hash>/out
    let profile_dir = out.ancestors().nth(3).expect("profile directory");
    std::fs::copy(&so, profile_dir.join("libstyxy_preload.so")).expect("cannot copy libstyxy_preload.so");
}
