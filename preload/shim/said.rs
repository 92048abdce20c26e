//! What the daemon is told besides a bind — a confirmation, a refused connect, what this
//! process did alone ([`note`]) — and, when it cannot be asked, the spool (which it logs
//! when it runs again) and the one line on stderr.

use core::sync::atomic::Ordering;

use crate::cstring::decimal;
use crate::daemon::{hook_socket_brief, mailed, sent_and_answered, tell, u32_at, Heard, HOOK_ANSWER_MS};
use crate::hookproto;
use crate::keep::{done_message, family_byte, kept_by, kept_key, session, NO_ASK};
use crate::libc_calls::{
    above_stdio, errno, monotonic_ms, realtime_ms, set_errno, MSG_DONTWAIT, O_APPEND, O_CLOEXEC, O_CREAT, O_NOCTTY, O_NOFOLLOW, O_NONBLOCK,
    O_WRONLY, PR_GET_NAME, STATX_MODE_UID_SIZE, STATX_NLINK, S_IFMT, S_IFREG,
};
use crate::maps::{own_uid, runtime_file, RUNTIME_PATH_MAX};
use crate::sys::{close, getpid, gettid, getuid, open, prctl, recv, statx, write};
use crate::tell::notice;

/// Tells the daemon this process listens on `port`, which an ancestor kept before a
/// `fork` (`hookproto::CONFIRM`): it becomes an owner of the allocation, which then
/// outlives the parent. One message, no answer awaited; errno as it was.
pub(crate) fn confirm(port: u16) {
    let saved = errno();
    // SAFETY: copied into the message here.
    let session = unsafe { session() };
    if let Some(m) = (hookproto::Ask { kind: hookproto::CONFIRM, port, session, ..NO_ASK }).encode() {
        let _ = tell(&m);
    }
    set_errno(saved);
}

/// The daemon could not be asked about `ask`'s bind, which goes as asked: said once a
/// process on stderr, and logged through the spool when no daemon answers (a stopped one,
/// none at all). Another user's daemon is only said: its spool is not ours.
pub(crate) fn unasked(heard: Heard, ask: &hookproto::Ask) {
    let why: &[u8] = match heard {
        Heard::Silent => hookproto::TIMEOUT.as_bytes(),
        Heard::Absent => hookproto::NO_COORDINATOR.as_bytes(),
        Heard::Foreign(owner) => return warn_other_user(owner),
        Heard::Closed => return warn_closed(),
        _ => return,
    };
    let note = if matches!(heard, Heard::Silent) { hookproto::NOTE_UNANSWERED } else { hookproto::NOTE_NO_COORDINATOR };
    spool(&hookproto::Ask { kind: hookproto::NOTE, note, ..*ask });
    if first_warning() {
        let mut path = [0u8; RUNTIME_PATH_MAX];
        let (through, fix) = (hookproto::PASS_THROUGH.as_bytes(), hookproto::START_IT.as_bytes());
        notice(&[why, b" (unix:", hook_sock(&mut path), b")", through, fix]);
    }
}

/// The daemon closed the ask unanswered (a daemon of another version, still running after
/// an upgrade): said once, with how to start this version's.
fn warn_closed() {
    if first_warning() {
        let mut path = [0u8; RUNTIME_PATH_MAX];
        let path = hook_sock(&mut path);
        let fix =
            b" closed the ask unanswered (a daemon of another version? `styxy-preload daemon stop`, and the next command starts this one)";
        notice(&[b"the daemon at unix:", path, fix, hookproto::PASS_THROUGH.as_bytes()]);
    }
}

/// The path of `hook.sock` (written into `buf`), as a line names it.
fn hook_sock(buf: &mut [u8; RUNTIME_PATH_MAX]) -> &[u8] {
    let n = runtime_file(buf, hookproto::SOCKET);
    buf.get(..n).unwrap_or(&[])
}

/// The pid of this process once it said the daemon could not be asked (one line a process).
static WARNED: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// This process has not said yet that the daemon could not be asked (and now has).
pub(crate) fn first_warning() -> bool {
    let me = getpid() as u32;
    WARNED.swap(me, Ordering::Relaxed) != me
}

/// The daemon is uid `owner`'s (a server run with runuser, su or sudo in a session): said
/// once, with how to coordinate it all the same.
fn warn_other_user(owner: u32) {
    if !first_warning() {
        return;
    }
    let (mut o, mut m) = ([0u8; 12], [0u8; 12]);
    let (on, mn) = (decimal(&mut o, 0, owner), decimal(&mut m, 0, getuid()));
    let [a, b, c] = hookproto::OTHER_USER;
    let (o, m) = (o.get(..on).unwrap_or(&[]), m.get(..mn).unwrap_or(&[]));
    notice(&[a.as_bytes(), o, b.as_bytes(), m, c.as_bytes(), hookproto::PASS_THROUGH.as_bytes()]);
}

/// Tells the daemon what this process did alone (`note`, [`hookproto::NOTE`]) for `port`
/// (`flags`: [`hookproto::OWN_RULES`] when a rule of its own covers it): one message, no
/// answer awaited, spooled when the daemon cannot be asked; errno as it was.
pub(crate) fn note(note: u8, port: u16, family: u16, flags: u8) {
    // SAFETY: copied into the message here.
    let session = unsafe { session() };
    let mut comm = [0u8; 17];
    let ask = hookproto::Ask { kind: hookproto::NOTE, port, family: family_byte(family), flags, session, note, ..NO_ASK };
    told(&hookproto::Ask { comm: own_comm(&mut comm), ..ask }, false);
}

/// Tells the daemon that `keep`'s bind (`ask`) landed on the session's own port `got`
/// with no round trip ([`hookproto::NOTE_STUCK`]; [`hookproto::NOTE_AGAIN`] when this
/// process kept it itself before): as [`note`].
pub(crate) fn stuck(keep: &hookproto::Ask, got: u16) {
    let note = if kept_by(got).0 { hookproto::NOTE_AGAIN } else { hookproto::NOTE_STUCK };
    told(&hookproto::Ask { kind: hookproto::NOTE, note, port: got, origin: keep.port, ..*keep }, true);
}

/// Sends the `NOTE` `ask` with this process's log variables — first to the daemon's
/// mailbox when `mail` (a bind the port map answered: the note's delay is the bind's) —
/// no answer awaited, spooled when the daemon cannot be asked; errno as it was. Its
/// message's buffer lives in this frame alone (a thread may have 16 kB of stack).
#[inline(never)]
fn told(ask: &hookproto::Ask, mail: bool) {
    let saved = errno();
    let mut msg = [0u8; hookproto::DONE_MAX];
    let n = done_message(ask, &mut msg);
    let told = msg.get(..n).filter(|m| !m.is_empty()).map(|m| if mail && mailed(m) { Ok(()) } else { tell(m) });
    if let Some(Err(Heard::Absent | Heard::Silent)) = told {
        spool(ask);
    }
    set_errno(saved);
}

/// This process's name, in `buf`: its main thread's (`PR_GET_NAME`); empty on another
/// thread, whose own name that would be (the daemon then reads the process's in `/proc`).
pub(crate) fn own_comm(buf: &mut [u8; 17]) -> &[u8] {
    if gettid() == getpid() {
        thread_comm(buf)
    } else {
        &[]
    }
}

/// The calling thread's name (`PR_GET_NAME`), in `buf`.
pub(crate) fn thread_comm(buf: &mut [u8; 17]) -> &[u8] {
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into `buf`.
    unsafe { prctl(PR_GET_NAME, buf.as_mut_ptr() as usize) };
    buf.split(|c| *c == 0).next().unwrap_or(&[])
}

/// Appends `ask` (a `NOTE`), with this process's name, pid, the time and its log
/// variables, to the daemon's spool ([`hookproto::SPOOL`]), which the daemon logs when
/// it runs again: only a regular file of ours, below [`hookproto::SPOOL_MAX`], in one
/// `write` that never waits. Nothing when the daemon's directory is not there.
#[inline(never)]
fn spool(ask: &hookproto::Ask) {
    let mut comm = [0u8; 17];
    // the spool is read when the process may be gone: a thread's name rather than none
    let ask = hookproto::Ask { comm: if ask.comm.is_empty() { thread_comm(&mut comm) } else { ask.comm }, ..*ask };
    // the record built in place: its head, then the message
    let mut rec = [0u8; hookproto::SPOOL_HEAD + hookproto::DONE_MAX];
    let n = rec.get_mut(hookproto::SPOOL_HEAD..).map_or(0, |msg| done_message(&ask, msg));
    let n = if n == 0 { 0 } else { hookproto::spool_record(getpid() as u32, realtime_ms(), n, &mut rec) };
    let mut path = [0u8; RUNTIME_PATH_MAX];
    if n == 0 || runtime_file(&mut path, hookproto::SPOOL) == 0 {
        return;
    }
    let flags = O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK | O_CLOEXEC;
    // SAFETY: `path` is NUL-terminated (runtime_file); the fd is ours, closed below; the
    // file it creates is 0600.
    let fd = above_stdio(unsafe { open(path.as_ptr().cast(), flags) });
    if fd < 0 {
        return;
    }
    let mut st = [0u8; 256];
    // SAFETY: statx of our own fd (AT_EMPTY_PATH) writes a `struct statx` (256 bytes) into `st`.
    let fits = unsafe { statx(fd, c"".as_ptr(), crate::libc_calls::AT_EMPTY_PATH, STATX_MODE_UID_SIZE | STATX_NLINK, st.as_mut_ptr()) }
        == 0
        && spool_fits(&st);
    if fits {
        // SAFETY: `n` bytes of `rec`, to our own fd.
        unsafe { write(fd, rec.as_ptr().cast(), n) };
    }
    // SAFETY: our own fd, opened above.
    unsafe { close(fd) };
}

/// A `struct statx` of a regular file of ours, of one link (not another file of ours
/// linked there), below [`hookproto::SPOOL_MAX`].
fn spool_fits(st: &[u8; 256]) -> bool {
    let (nlink, uid, mode) = (u32_at(st, 16), u32_at(st, 20), u32_at(st, 28) as u16);
    let size = u64::from(u32_at(st, 40)) | u64::from(u32_at(st, 44)) << 32;
    mode & S_IFMT == S_IFREG && nlink == 1 && own_uid(uid) && size < hookproto::SPOOL_MAX
}

/// Connects refused in this process (pid and port, as [`KEPT`]): each is told to the daemon
/// once.
static REFUSED: [core::sync::atomic::AtomicU64; 8] = [const { core::sync::atomic::AtomicU64::new(0) }; 8];

/// The pid of this process once it told the person of a refusal (one line a process).
static TOLD: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// A connect of this process to loopback `port` was refused (another session's server):
/// the daemon is told, once per port — it writes the event and answers the line to tell,
/// which the person is told once per process. Waits at most [`HOOK_ANSWER_MS`]; errno as
/// it was. `false` when the daemon could not be asked at all (no daemon, a session id
/// too long for the message): the hooks' logic refuses it then, and says so.
pub(crate) fn refused(port: u16, family: u16) -> bool {
    let key = kept_key(port);
    if REFUSED.iter().any(|k| k.load(Ordering::Relaxed) == key) {
        return true;
    }
    let saved = errno();
    // SAFETY: copied into the message here.
    let session = unsafe { session() };
    let mut msg = [0u8; hookproto::DONE_MAX];
    // its name: the daemon writes the event once the answer is out, the client may be gone
    let mut comm = [0u8; 17];
    let comm = own_comm(&mut comm);
    let n =
        done_message(&hookproto::Ask { kind: hookproto::REFUSED, port, family: family_byte(family), session, comm, ..NO_ASK }, &mut msg);
    let started = monotonic_ms();
    let conn = match (msg.get(..n).filter(|m| !m.is_empty()), hook_socket_brief(started)) {
        (Some(msg), Ok(conn)) => Some((msg, conn)),
        (_, Ok(conn)) => {
            // SAFETY: our own connection, opened by `hook_socket`.
            unsafe { close(conn) };
            None
        }
        (_, Err(_)) => None,
    };
    let Some((msg, conn)) = conn else {
        set_errno(saved);
        return false;
    };
    let mut buf = [0u8; hookproto::TOLD_MAX];
    let got = sent_and_answered(conn, msg, started, HOOK_ANSWER_MS).ok().map(|()| {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        unsafe { recv(conn, buf.as_mut_ptr().cast(), buf.len(), MSG_DONTWAIT) }
    });
    // SAFETY: our own connection, opened by `hook_socket`.
    unsafe { close(conn) };
    let line = got.and_then(|n| usize::try_from(n).ok()).and_then(|n| buf.get(..n)).and_then(hookproto::Answer::told_line);
    if let Some(line) = line {
        let slot = REFUSED.iter().find(|k| k.load(Ordering::Relaxed) == 0).or(REFUSED.get(usize::from(port) % REFUSED.len()));
        if let Some(slot) = slot {
            slot.store(key, Ordering::Relaxed);
        }
        let me = getpid() as u32;
        if TOLD.swap(me, Ordering::Relaxed) != me {
            notice(&[line]);
        }
    }
    set_errno(saved);
    true
}
