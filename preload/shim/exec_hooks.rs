//! Programs the library cannot reach — statically linked (no `PT_INTERP`: the loader, and
//! so `LD_PRELOAD`, never runs) or built by Go (its `net` package makes raw syscalls) —
//! started under the CLI's seccomp supervisor instead: docs/ARCHITECTURE.md "Programs the
//! library cannot reach".
//!
//! The exec family (`execve`, `execv`, `execvp`, `execvpe`, `posix_spawn`,
//! `posix_spawnp`: what shells, libuv, make, Python and Rust's `Command` call) looks at
//! the program when the environment it will get asks for it (`STYXY_PRELOAD_CLI` set,
//! the library preloaded and not disabled, no supervisor above already) and then runs
//! `$STYXY_PRELOAD_CLI supervise -- PATH ARGV…` in its place. The look is one `open`, one
//! `pread` of the first 4 KiB (the ELF header, the program headers and, in practice, the
//! notes), one `close`; no allocation, no lock, errno as the program left it. It is safe
//! between `vfork` and `execve`: syscalls only, on this thread's stack (an anonymous
//! mapping for a new argv of more than 64 entries).
//!
//! When running the CLI fails, the program runs as asked (uncoordinated).

use core::ffi::{c_char, c_int, c_void};

use crate::cstring::cstr;
use crate::elf::{program_headers, u16_at, u32_at, u64_at, MAX_PHDRS, PHDR, PT_INTERP, PT_LOAD, PT_NOTE};
use crate::libc_calls::{
    above_stdio, environ, errno, faccessat, getauxval, set_errno, AT_BASE, AT_EACCESS, AT_EXECFN, AT_FDCWD, AT_SECURE,
    MAP_PRIVATE_ANONYMOUS, O_CLOEXEC, O_NOCTTY, O_NONBLOCK, O_RDONLY, PROT_READ, PROT_WRITE, PR_GET_SECCOMP, SECCOMP_MODE_FILTER, X_OK,
};
use crate::slot::Slot;
use crate::sys::{close, mmap, munmap, open, prctl, pread};
use crate::{missing, NO, YES};

pub(crate) type Argv = *const *const c_char;
type ExecveFn = unsafe extern "C" fn(*const c_char, Argv, Argv) -> c_int;
type ExecvFn = unsafe extern "C" fn(*const c_char, Argv) -> c_int;
type SpawnFn = unsafe extern "C" fn(*mut c_int, *const c_char, *const c_void, *const c_void, Argv, Argv) -> c_int;

// SAFETY: libc's `int execve(const char *, char *const [], char *const [])`.
static REAL_EXECVE: Slot<ExecveFn> = unsafe { Slot::new(c"execve") };
// SAFETY: libc's `int execv(const char *, char *const [])`.
static REAL_EXECV: Slot<ExecvFn> = unsafe { Slot::new(c"execv") };
// SAFETY: libc's `int execvp(const char *, char *const [])`.
static REAL_EXECVP: Slot<ExecvFn> = unsafe { Slot::new(c"execvp") };
// SAFETY: libc's `int execvpe(const char *, char *const [], char *const [])`.
static REAL_EXECVPE: Slot<ExecveFn> = unsafe { Slot::new(c"execvpe") };
// SAFETY: libc's `int posix_spawn(pid_t *, const char *, const posix_spawn_file_actions_t *,
// const posix_spawnattr_t *, char *const [], char *const [])`.
static REAL_SPAWN: Slot<SpawnFn> = unsafe { Slot::new(c"posix_spawn") };
// SAFETY: libc's `posix_spawnp`, of the same signature as `posix_spawn`.
static REAL_SPAWNP: Slot<SpawnFn> = unsafe { Slot::new(c"posix_spawnp") };

/// The longest path the shim builds from `PATH` (Linux's `PATH_MAX`).
const PATH_MAX: usize = 4096;

/// `execve` as the program calls it: [`supervised`], else libc's.
///
/// # Safety
/// The program's call: C strings and NULL-terminated arrays of them.
#[no_mangle]
pub unsafe extern "C" fn execve(path: *const c_char, argv: Argv, envp: Argv) -> c_int {
    let Some(real) = REAL_EXECVE.next() else {
        return missing();
    };
    // SAFETY: the program's call (this function's contract).
    unsafe {
        supervised(path, argv, envp);
        real(path, argv, envp)
    }
}

/// `execv`: `execve` with this process's environment.
///
/// # Safety
/// As [`execve`].
#[no_mangle]
pub unsafe extern "C" fn execv(path: *const c_char, argv: Argv) -> c_int {
    let Some(real) = REAL_EXECV.next() else {
        return missing();
    };
    // SAFETY: the program's call; `environ` is its environment.
    unsafe {
        supervised(path, argv, environ);
        real(path, argv)
    }
}

/// `execvp`: the program found on `PATH` as libc finds it.
///
/// # Safety
/// As [`execve`].
#[no_mangle]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: Argv) -> c_int {
    let Some(real) = REAL_EXECVP.next() else {
        return missing();
    };
    // SAFETY: the program's call; `environ` is its environment.
    unsafe {
        on_path(file, argv, environ);
        real(file, argv)
    }
}

/// `execvpe`: `execvp` with the environment given.
///
/// # Safety
/// As [`execve`].
#[no_mangle]
pub unsafe extern "C" fn execvpe(file: *const c_char, argv: Argv, envp: Argv) -> c_int {
    let Some(real) = REAL_EXECVPE.next() else {
        return missing();
    };
    // SAFETY: the program's call (this function's contract).
    unsafe {
        on_path(file, argv, envp);
        real(file, argv, envp)
    }
}

/// `posix_spawn`: the supervisor spawned in the program's place, else libc's.
///
/// # Safety
/// The program's call, as `posix_spawn(3)` takes it.
#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut c_int,
    path: *const c_char,
    actions: *const c_void,
    attr: *const c_void,
    argv: Argv,
    envp: Argv,
) -> c_int {
    let Some(real) = REAL_SPAWN.next() else {
        return crate::libc_calls::ENOSYS;
    };
    // SAFETY: the program's call (this function's contract).
    unsafe {
        if let Some(rc) = spawn_supervised(real, pid, path, actions, attr, argv, envp) {
            return rc;
        }
        real(pid, path, actions, attr, argv, envp)
    }
}

/// `posix_spawnp`: as `posix_spawn`, the program found on `PATH`.
///
/// # Safety
/// As [`posix_spawn`].
#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut c_int,
    file: *const c_char,
    actions: *const c_void,
    attr: *const c_void,
    argv: Argv,
    envp: Argv,
) -> c_int {
    let Some(real) = REAL_SPAWNP.next() else {
        return crate::libc_calls::ENOSYS;
    };
    let mut buf = [0u8; PATH_MAX];
    // SAFETY: the program's call (this function's contract); `buf` outlives the spawn.
    unsafe {
        let path = found(file, &mut buf);
        if let (Some(path), Some(spawn)) = (path, REAL_SPAWN.next()) {
            if let Some(rc) = spawn_supervised(spawn, pid, path, actions, attr, argv, envp) {
                return rc;
            }
        }
        real(pid, file, actions, attr, argv, envp)
    }
}

/// `execvp`'s program: when it is one to supervise, the supervisor runs in its place
/// (returns only when that fails).
///
/// # Safety
/// As [`execve`].
unsafe fn on_path(file: *const c_char, argv: Argv, envp: Argv) {
    let mut buf = [0u8; PATH_MAX];
    // SAFETY: the program's call (this function's contract); `buf` outlives the exec.
    unsafe {
        if let Some(path) = found(file, &mut buf) {
            supervised(path, argv, envp);
        }
    }
}

/// When `path` is a program to supervise with `envp`, execs the supervisor in its place:
/// returns only when that fails, with errno as it was.
///
/// # Safety
/// As [`execve`].
unsafe fn supervised(path: *const c_char, argv: Argv, envp: Argv) {
    let saved = errno();
    // SAFETY: the program's call (this function's contract).
    if let Some(cli) = unsafe { supervisor_for(path, envp) } {
        if let Some(real) = REAL_EXECVE.next() {
            // SAFETY: as above; the new argv lives until the exec (or its failure).
            unsafe { with_argv(cli, path, argv, |new| real(cli, new, envp)) };
        }
    }
    set_errno(saved);
}

/// The spawn's result when the supervisor was spawned in place of `path`, `None` otherwise.
///
/// # Safety
/// As [`posix_spawn`], with `spawn` libc's `posix_spawn`.
#[allow(clippy::too_many_arguments)]
unsafe fn spawn_supervised(
    spawn: SpawnFn,
    pid: *mut c_int,
    path: *const c_char,
    actions: *const c_void,
    attr: *const c_void,
    argv: Argv,
    envp: Argv,
) -> Option<c_int> {
    let saved = errno();
    // SAFETY: the program's call (this function's contract).
    let cli = unsafe { supervisor_for(path, envp) }?;
    // SAFETY: as above; the new argv lives until the spawn returns.
    let rc = unsafe { with_argv(cli, path, argv, |new| spawn(pid, cli, actions, attr, new, envp)) };
    set_errno(saved);
    rc.filter(|rc| *rc == 0)
}

/// The CLI to run `path` under: when `envp` asks for coordination and `path` is a program
/// the library cannot reach.
///
/// # Safety
/// `path` is a C string, `envp` null or a NULL-terminated array of C strings.
unsafe fn supervisor_for(path: *const c_char, envp: Argv) -> Option<*const c_char> {
    // SAFETY: this function's contract.
    let wants = unsafe { Wanted::of(envp) };
    // a process whose own library is off (the CLI itself: `exec`, `supervise`) starts
    // its programs as they are
    let cli = wants.cli.filter(|_| wants.preloaded && !wants.disabled && crate::settings::enabled())?;
    // SAFETY: both C strings (this function's contract, and an entry of `envp`).
    let (p, c) = unsafe { (cstr(path)?, cstr(cli)?) };
    if p == c || !unreachable(path) {
        return None;
    }
    // a supervisor above answers this tree already (its variable alone could be a leftover)
    // SAFETY: prctl asking about this process.
    if wants.supervised && unsafe { prctl(PR_GET_SECCOMP, 0) } == SECCOMP_MODE_FILTER {
        return None;
    }
    // SAFETY: `path` is a C string.
    (unsafe { faccessat(AT_FDCWD, path, X_OK, AT_EACCESS) } == 0).then_some(cli)
}

/// What an environment asks of a program's start.
struct Wanted {
    /// `STYXY_PRELOAD_CLI`'s value (a C string inside the environment), when set.
    cli: Option<*const c_char>,
    /// `LD_PRELOAD` names this library.
    preloaded: bool,
    /// `STYXY_PRELOAD_DISABLE` is on.
    disabled: bool,
    /// `STYXY_PRELOAD_SUPERVISED` is set.
    supervised: bool,
}

impl Wanted {
    /// # Safety
    /// `envp` is null or a NULL-terminated array of C strings.
    unsafe fn of(envp: Argv) -> Wanted {
        let mut w = Wanted { cli: None, preloaded: false, disabled: false, supervised: false };
        let mut i = 0;
        loop {
            // SAFETY: within the NULL-terminated array (this function's contract).
            let entry = if envp.is_null() { core::ptr::null() } else { unsafe { *envp.add(i) } };
            // SAFETY: a C string of the array, or null.
            let Some(e) = (unsafe { cstr(entry) }) else {
                return w;
            };
            i += 1;
            if let Some(v) = e.strip_prefix(b"STYXY_PRELOAD_") {
                if let Some(cli) = v.strip_prefix(b"CLI=").filter(|c| !c.is_empty()) {
                    // SAFETY: the value's first byte, inside `entry` ("STYXY_PRELOAD_CLI=" is 18 bytes).
                    w.cli = Some(unsafe { entry.add(e.len() - cli.len()) });
                } else if let Some(d) = v.strip_prefix(b"DISABLE=") {
                    w.disabled = !matches!(d, b"" | b"0");
                } else if v.starts_with(b"SUPERVISED=") {
                    w.supervised = true;
                }
            } else if let Some(v) = e.strip_prefix(b"LD_PRELOAD=") {
                w.preloaded = v.windows(LIB.len()).any(|n| n == LIB);
            }
        }
    }
}

/// The library's file name, as `LD_PRELOAD` names it.
const LIB: &[u8] = b"libstyxy_preload.so";

/// `file` found on `PATH` as `execvp` finds it (the first candidate that opens), in `buf`;
/// `file` itself when it has a `/`. `None` when nothing is found or it does not fit.
///
/// # Safety
/// `file` is a C string.
// `contains` would call core's precompiled memchr, whose unwind tables name a personality
// routine this panic=abort library does not have (it would not load)
#[allow(clippy::manual_contains)]
unsafe fn found(file: *const c_char, buf: &mut [u8; PATH_MAX]) -> Option<*const c_char> {
    // SAFETY: a C string (this function's contract).
    let name = unsafe { cstr(file) }?;
    if name.is_empty() || name.iter().any(|c| *c == b'/') {
        return Some(file);
    }
    // SAFETY: getenv's answer, read here and not kept.
    let path = unsafe { crate::settings::env(c"PATH") }.unwrap_or(b"/bin:/usr/bin");
    for dir in path.split(|c| *c == b':') {
        let dir = if dir.is_empty() { b".".as_slice() } else { dir };
        let n = crate::cstring::put(buf, 0, dir);
        if n == 0 || crate::cstring::put(buf, n + 1, name) == 0 {
            continue;
        }
        if let Some(slash) = buf.get_mut(n) {
            *slash = b'/';
        }
        // SAFETY: a NUL-terminated path in `buf`.
        let fd = above_stdio(unsafe { open(buf.as_ptr().cast(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY) });
        if fd >= 0 {
            // SAFETY: our fd.
            unsafe { close(fd) };
            return Some(buf.as_ptr().cast());
        }
    }
    None
}

/// Pointers an argv on the stack holds; a longer one goes into an anonymous mapping.
const STACK_ARGV: usize = 64;

/// Calls `run` with `[cli, "supervise", "--", path, argv…, NULL]`: on the stack (a mapping
/// made in a `vfork` child would stay in its parent after the exec), or in an anonymous
/// mapping, unmapped after, when it is long; `None` when it cannot be built.
///
/// # Safety
/// `argv` is a NULL-terminated array of C strings (or null); `cli` and `path` C strings.
unsafe fn with_argv(cli: *const c_char, path: *const c_char, argv: Argv, run: impl FnOnce(Argv) -> c_int) -> Option<c_int> {
    let mut argc = 0;
    // SAFETY: within the NULL-terminated array (this function's contract).
    while !argv.is_null() && !unsafe { *argv.add(argc) }.is_null() {
        argc += 1;
    }
    let head: [*const c_char; 4] = [cli, c"supervise".as_ptr(), c"--".as_ptr(), path];
    let n = head.len() + argc.max(1) + 1;
    let mut stack = [core::ptr::null::<c_char>(); STACK_ARGV];
    let size = n * core::mem::size_of::<*const c_char>();
    let new = if n <= STACK_ARGV {
        stack.as_mut_ptr()
    } else {
        // SAFETY: a fresh private anonymous mapping, ours alone.
        let map = unsafe { mmap(core::ptr::null_mut(), size, PROT_READ | PROT_WRITE, MAP_PRIVATE_ANONYMOUS, -1, 0) };
        if map as isize == -1 {
            return None;
        }
        map.cast::<*const c_char>()
    };
    // SAFETY: `n` pointers fit at `new`; argv's entries are read within its array.
    unsafe {
        for (i, p) in head.iter().enumerate() {
            *new.add(i) = *p;
        }
        // a program started without any argv still gets its path as argv[0]
        *new.add(head.len()) = path;
        for i in 0..argc {
            *new.add(head.len() + i) = *argv.add(i);
        }
        *new.add(n - 1) = core::ptr::null();
    }
    let rc = run(new.cast_const());
    if n > STACK_ARGV {
        // SAFETY: our mapping, no longer used.
        unsafe { munmap(new.cast(), size) };
    }
    Some(rc)
}

/// The ELF header, the program headers and (in practice) the notes: what one `pread` takes.
const HEAD: usize = 4096;

/// Whether the file at `path` is a program `LD_PRELOAD` does not reach: a 64-bit
/// little-endian ELF executable without `PT_INTERP`, or with Go's build-id note. Never
/// blocks (`O_NONBLOCK`: a FIFO planted there opens at once and reads nothing).
fn unreachable(path: *const c_char) -> bool {
    // SAFETY: `path` is a C string (the caller's contract).
    let fd = above_stdio(unsafe { open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY) });
    if fd < 0 {
        return false;
    }
    let mut head = [0u8; HEAD];
    // SAFETY: reads at most HEAD bytes into `head`.
    let n = unsafe { pread(fd, head.as_mut_ptr().cast(), HEAD, 0) };
    let mut more = |off: u64, buf: &mut [u8]| -> usize {
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let got = unsafe { pread(fd, buf.as_mut_ptr().cast(), buf.len(), off as i64) };
        usize::try_from(got).unwrap_or(0)
    };
    let verdict = usize::try_from(n).ok().and_then(|n| head.get(..n)).is_some_and(|h| classify(h, &mut more) == YES);
    // SAFETY: our fd.
    unsafe { close(fd) };
    verdict
}

/// `YES` for a program to supervise, from the file's first bytes `head`; `more` reads
/// what lies further (program headers or notes beyond `head`).
pub(crate) fn classify(head: &[u8], more: &mut dyn FnMut(u64, &mut [u8]) -> usize) -> u8 {
    if head.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) || !matches!(u16_at(head, 16), Some(2 | 3)) {
        return NO; // not a 64-bit little-endian executable (ET_EXEC, ET_DYN)
    }
    let (Some(phoff), Some(PHDR), Some(phnum)) = (u64_at(head, 32), u16_at(head, 54), u16_at(head, 56)) else {
        return NO;
    };
    let size = phnum.min(MAX_PHDRS) * PHDR;
    let mut far = [0u8; MAX_PHDRS * PHDR];
    let Some(table) = bytes(head, &mut far, phoff, size, more) else {
        return NO;
    };
    let (mut interp, mut go) = (false, false);
    for ph in table.chunks_exact(PHDR) {
        match u32_at(ph, 0) {
            Some(PT_INTERP) => interp = true,
            Some(PT_NOTE) => go = go || go_note(head, ph, more),
            _ => {}
        }
    }
    if go || !interp {
        YES
    } else {
        NO
    }
}

/// The file's `len` bytes at `off`: inside `head`, else read into `far`.
fn bytes<'a>(head: &'a [u8], far: &'a mut [u8], off: u64, len: usize, more: &mut dyn FnMut(u64, &mut [u8]) -> usize) -> Option<&'a [u8]> {
    if let Some(b) = head.get(off as usize..).and_then(|b| b.get(..len)) {
        return Some(b);
    }
    let buf = far.get_mut(..len)?;
    (more(off, buf) == len).then_some(&*buf)
}

/// Whether the notes a `PT_NOTE` header `ph` points at hold Go's build id (name "Go",
/// type 4), from the file.
fn go_note(head: &[u8], ph: &[u8], more: &mut dyn FnMut(u64, &mut [u8]) -> usize) -> bool {
    let (Some(off), Some(len)) = (u64_at(ph, 8), u64_at(ph, 32)) else {
        return false;
    };
    let len = (len as usize).min(512);
    let mut far = [0u8; 512];
    bytes(head, &mut far, off, len, more).is_some_and(has_go_id)
}

/// Whether `notes` (the contents of a `PT_NOTE` segment) hold Go's build id.
fn has_go_id(notes: &[u8]) -> bool {
    let mut at = 0;
    while let (Some(namesz), Some(descsz), Some(kind)) = (u32_at(notes, at), u32_at(notes, at + 4), u32_at(notes, at + 8)) {
        let name = notes.get(at + 12..at + 12 + namesz as usize);
        if kind == 4 && name == Some(b"Go\0\0".as_slice()) {
            return true;
        }
        at += 12 + (namesz as usize).next_multiple_of(4) + (descsz as usize).next_multiple_of(4);
    }
    false
}

/// At load, the one thing the library does before a call: a dynamically linked Go program
/// (it loads the library, but its `net` package never calls it) started by a process the
/// library is not in — the shell that ran `eval "$(styxy-preload env)"` — runs itself
/// again under the supervisor, when its environment asks for coordination. The look is
/// in memory (the program's own headers and notes, from the auxiliary vector): no
/// syscall for any other program.
///
/// # Safety
/// Called by the loader with the program's `argc`, `argv` and `envp`.
unsafe extern "C" fn at_load(_argc: c_int, argv: Argv, envp: Argv) {
    if !go_in_memory() {
        return;
    }
    // SAFETY: getauxval reads the auxiliary vector; AT_EXECFN is the path the program was
    // started with, a C string the kernel put on the stack.
    let path = unsafe { getauxval(AT_EXECFN) } as *const c_char;
    // started as `ld.so PROGRAM` (no interpreter base), or in secure mode: left alone
    // SAFETY: as above.
    if path.is_null() || unsafe { getauxval(AT_BASE) == 0 || getauxval(AT_SECURE) != 0 } {
        return;
    }
    // a supervisor started this program (even one whose filter was then refused): it runs
    // as it is, never handed back to `supervise` again
    // SAFETY: the loader's `envp` (this function's contract).
    if unsafe { Wanted::of(envp) }.supervised {
        return;
    }
    // SAFETY: the loader's arguments (this function's contract), `path` a C string.
    unsafe { supervised(path, argv, envp) };
}

#[used]
#[link_section = ".init_array"]
static AT_LOAD: unsafe extern "C" fn(c_int, Argv, Argv) = at_load;

/// Whether this process's program carries Go's build-id note, read from its program
/// headers in memory (only notes inside a loaded segment are read).
fn go_in_memory() -> bool {
    let Some((table, bias)) = program_headers() else {
        return false;
    };
    let field = |ph: &[u8], o: usize| u64_at(ph, o).unwrap_or(0);
    let loaded = |from: u64, len: u64| {
        table.chunks_exact(PHDR).any(|ph| {
            u32_at(ph, 0) == Some(PT_LOAD)
                && field(ph, 16) <= from
                && from.saturating_add(len) <= field(ph, 16).saturating_add(field(ph, 32))
        })
    };
    table.chunks_exact(PHDR).filter(|ph| u32_at(ph, 0) == Some(PT_NOTE)).any(|ph| {
        let (vaddr, len) = (field(ph, 16), field(ph, 32).min(512));
        // SAFETY: inside a loaded segment of the program (checked), `len` bytes.
        loaded(vaddr, len) && has_go_id(unsafe { core::slice::from_raw_parts(bias.wrapping_add(vaddr) as *const u8, len as usize) })
    })
}
