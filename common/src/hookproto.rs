//! The shim ↔ daemon exchange for a coordinated bind (docs/ARCHITECTURE.md "Hook ↔
//! daemon protocol"): fixed-layout messages over a `SOCK_SEQPACKET` Unix socket beside
//! the daemon's HTTP socket, so the always-loaded `no_std` shim can ask without loading
//! the hooks' logic. `no_std`: the shim includes this file; the daemon uses it through
//! the client crate — one layout for both ends.
//!
//! One connection carries one bind: the shim sends an [`Ask`] (`KEEP`: may this process
//! have this port?), the daemon answers an [`Answer`]: `GRANTED` (this very port),
//! `MOVED` (another port, when the ask says it [`MAY_MOVE`]) or `DECLINED`; the shim
//! binds and sends an [`Ask`] of kind `DONE` with the result, which the daemon logs (and,
//! on a failure, withdraws the grant; the shim asks again). A port bound as asked first
//! that turned out taken is asked about the same way ([`TAKEN`]). What the shim does
//! alone (observe mode, a single-instance type's `EADDRINUSE`, a port the kernel chose at
//! `listen`) it tells in a [`NOTE`]; what it did while the daemon could not be asked it
//! appends to the daemon's spool ([`SPOOL`], [`spooled`]), which the daemon logs when it
//! runs again. The daemon writes every event.

/// File name of the socket in the daemon's runtime directory.
pub const SOCKET: &str = "hook.sock";
/// File name of the daemon's mailbox beside [`SOCKET`]: a `SOCK_DGRAM` socket its hook
/// thread reads at least every `mapview::BEAT_EVERY_MS` (every 5 ms while busy), never waiting on
/// it, so that a `NOTE` left there wakes nobody. Each datagram is one `NOTE` as on
/// [`SOCKET`]; the sender is known from its credentials (`SO_PASSCRED`).
/// (Named so that it lists after `daemon.sock` in ext4's hash order on this project's
/// images: a script that takes the first socket in the directory finds the API's.) The
/// shim and the daemon both name it by this constant.
pub const MAILBOX: &str = "mail.sock";
/// File name of the spool in the daemon's runtime directory: what the shim did while the
/// daemon could not be asked, [`spool_record`]s the daemon logs when it runs again.
pub const SPOOL: &str = "hook.spool";
/// The spool's size past which the shim appends nothing more (a daemon gone for good).
pub const SPOOL_MAX: u64 = 1 << 20;
/// "SPH3": the layout's version; another version is declined.
pub const MAGIC: u32 = 0x3348_5053;
/// The longest session id the shim sends (the daemon's limit is 100).
pub const SESSION_MAX: usize = 100;
pub const ASK_LEN: usize = 136;
/// The longest process name (`comm`, without its NUL) an ask carries.
pub const COMM_MAX: usize = 15;
pub const ANSWER_LEN: usize = 8;

/// May this process bind exactly this port (granted, as a bind in progress)?
pub const KEEP: u8 = 1;
/// The bind's result, after a `GRANTED` or `MOVED`; after its [`ASK_LEN`] bytes, the
/// variables of [`LOG_VARS`] the process has, each `KEY=VALUE` and a NUL: where the
/// daemon writes the bind's event (the process may be gone before `/proc` could tell).
pub const DONE: u8 = 2;
/// This process listens on a port an ancestor kept before a `fork`: it becomes an owner
/// of the port's allocation (the daemon confirms it; nothing is answered). One message,
/// then the shim closes the connection.
pub const CONFIRM: u8 = 3;
/// This process's connect to `port` was refused (another session's server, isolation):
/// after its [`ASK_LEN`] bytes, the [`LOG_VARS`] as in a `DONE`. The daemon writes the
/// event and answers `TOLD`, with the line to tell the person.
pub const REFUSED: u8 = 4;
/// What this process did alone, for the daemon to log (`Ask::note`: [`NOTE_OBSERVED`] …),
/// after its [`ASK_LEN`] bytes the [`LOG_VARS`] as in a `DONE`. Nothing is answered.
pub const NOTE: u8 = 5;
/// `Ask::note`: observe mode: bound as asked, and what would have been coordinated logged.
pub const NOTE_OBSERVED: u8 = 1;
/// `Ask::note`: a single-instance type's port was taken: the program gets `EADDRINUSE`.
pub const NOTE_SINGLE: u8 = 2;
/// `Ask::note`: a `listen()` of an unbound socket: the kernel chose `port`.
pub const NOTE_KERNEL_CHOSE: u8 = 3;
/// `Ask::note` (spooled): the daemon did not answer in time; bound as asked.
pub const NOTE_UNANSWERED: u8 = 4;
/// `Ask::note` (spooled): no daemon answered on `hook.sock`; bound as asked.
pub const NOTE_NO_COORDINATOR: u8 = 5;
/// `Ask::note`: the session's own port — the port map said this session holds `port` for
/// the one asked (`Ask::origin`), the answer a `KEEP` would get again — bound with no
/// round trip: the daemon makes the process an owner and logs the bind, kept or remapped.
pub const NOTE_STUCK: u8 = 6;
/// `Ask::note`: as [`NOTE_STUCK`], a port this process kept itself before (a dual-stack
/// twin): logged as bound again.
pub const NOTE_AGAIN: u8 = 7;
/// Why a bind could not ask, as its event and the one line on stderr say it (the shim and
/// `reason::AskError` word it from these): then where it looked, then [`PASS_THROUGH`].
pub const NO_COORDINATOR: &str = "no coordinator";
pub const TIMEOUT: &str = "coordinator timeout";
/// The other-user line: `OTHER_USER[0]`, the daemon's uid, `OTHER_USER[1]`, ours, `OTHER_USER[2]`.
pub const OTHER_USER: [&str; 3] = [
    "the session's daemon belongs to uid ",
    " and this process runs as uid ",
    ": run the command under `styxy-preload exec --seccomp` to coordinate it",
];
pub const PASS_THROUGH: &str = ": ports pass through uncoordinated";
/// The fix said after [`PASS_THROUGH`] when no daemon answers.
pub const START_IT: &str = "; start it with `styxy-preload daemon start`, or run the tool under `styxy-preload exec`";
/// The environment that names a process's event log (`eventlog::Log::of`).
pub const LOG_VARS: [&str; 4] = ["STYXY_PRELOAD_LOG", "STYXY_PRELOAD_LOG_MAX", "XDG_STATE_HOME", "HOME"];
/// The longest `DONE`: the ask and its variables.
pub const DONE_MAX: usize = ASK_LEN + 4096;

/// `Ask::flags`: the shim binds another port when this one is not this process's to have,
/// and tells the person (a remap).
pub const MAY_MOVE: u8 = 1;
/// `Ask::flags`, with [`MAY_MOVE`]: the port failed with `EADDRINUSE` when bound as asked
/// (an on-conflict port, `decide::Plan::TryFirst`): another port of its type, never this one.
pub const TAKEN: u8 = 2;
/// `Ask::flags`: the socket sets `SO_REUSEPORT` (it may share its port: one session's
/// workers do, two sessions' never), so a port outside every range is asked about first.
pub const SHARES_PORT: u8 = 4;
/// `Ask::flags`: the process is in fallback mode (a tool that moves on by itself): a port
/// it may not have as it is answers [`BUSY`], never another port. Such a `KEEP` carries
/// the [`LOG_VARS`] after its [`ASK_LEN`] bytes, as a `DONE`: the daemon logs the
/// `BUSY` itself.
pub const FALLBACK: u8 = 8;
/// `Ask::flags`: the process is in on-conflict mode (bound as asked first, every port).
pub const ON_CONFLICT_MODE: u8 = 16;
/// `Ask::flags`: a `STYXY_PRELOAD_PORTS` rule of the process's own covers the port: the
/// daemon decides with the rules of the process's environment.
pub const OWN_RULES: u8 = 32;
/// `Ask::flags`, on a `KEEP`, `NOTE`, `CONFIRM` or `REFUSED`: asked or told for another process — a
/// descendant of the asker, or a process of the ask's session — the seccomp supervisor's,
/// for the program it traces. That process's pid ([`FOR_LEN`] bytes, little-endian)
/// follows the ask's [`ASK_LEN`] bytes, before any variables; the daemon takes it for who
/// asks (in the mailbox too), and the `DONE` on the connection for its bind.
pub const FOR_CHILD: u8 = 64;
pub const FOR_LEN: usize = 4;

/// This very port.
pub const GRANTED: u8 = 1;
/// Not this process's to coordinate (another class, a refusal the daemon logged): the
/// bind goes as asked. After a refusal, the line to tell the person follows, as in a
/// `TOLD` ([`Answer::with_line`]).
pub const DECLINED: u8 = 2;
/// Another port (`Answer::port`): the one asked is another session's, or taken.
pub const MOVED: u8 = 3;
/// Not this process's to have as it is (fallback mode): the tool gets `EADDRINUSE` and
/// moves on by itself.
pub const BUSY: u8 = 5;
/// The answer to a `REFUSED`: after its [`ANSWER_LEN`] bytes, the line to tell the person
/// (UTF-8, at most [`TOLD_MAX`] bytes in all).
pub const TOLD: u8 = 4;
pub const TOLD_MAX: usize = 1024;

/// A request from the shim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ask<'a> {
    pub kind: u8,
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
    /// `DONE`: 0 when the bind succeeded, else its errno.
    pub errno: i32,
    /// `KEEP`: [`MAY_MOVE`], [`TAKEN`], [`SHARES_PORT`], [`FALLBACK`], [`ON_CONFLICT_MODE`].
    pub flags: u8,
    /// `KEEP` in fallback mode: the port the tool first wanted, before it moved on by
    /// itself (its session's connects to that port follow it); 0 for none.
    pub origin: u16,
    /// `STYXY_PRELOAD_SESSION`, empty for none.
    pub session: &'a [u8],
    /// `NOTE`: what the process did ([`NOTE_OBSERVED`] …); 0 otherwise.
    pub note: u8,
    /// `KEEP`, `NOTE`: the process's name (at most [`COMM_MAX`] bytes; empty when the
    /// shim does not know it: the daemon reads it from `/proc`).
    pub comm: &'a [u8],
}

/// The daemon's answer to a `KEEP`: the port to bind (`GRANTED`, `MOVED`), or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u8,
    pub port: u16,
    /// The session held this port already (a restart, a twin, a probe then the bind).
    pub existing: bool,
}

impl Ask<'_> {
    /// The message; `None` when the session id is too long for it.
    pub fn encode(&self) -> Option<[u8; ASK_LEN]> {
        let mut b = [0u8; ASK_LEN];
        if self.session.len() > SESSION_MAX {
            return None;
        }
        let comm = self.comm.get(..self.comm.len().min(COMM_MAX)).unwrap_or_default();
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.kind;
        b[5] = self.family;
        b[6..8].copy_from_slice(&self.port.to_le_bytes());
        b[8..12].copy_from_slice(&self.errno.to_le_bytes());
        b[12] = self.session.len() as u8;
        b[13] = self.flags;
        b[14..16].copy_from_slice(&self.origin.to_le_bytes());
        b[16..16 + self.session.len()].copy_from_slice(self.session);
        b[116] = self.note;
        b[117] = comm.len() as u8;
        b[118..118 + comm.len()].copy_from_slice(comm);
        Some(b)
    }

    /// A message of exactly [`ASK_LEN`] bytes in this layout, else `None`.
    pub fn decode(b: &[u8]) -> Option<Ask<'_>> {
        if b.len() != ASK_LEN || b[0..4] != MAGIC.to_le_bytes() {
            return None;
        }
        let (len, comm) = (usize::from(b[12]), usize::from(b[117]));
        if len > SESSION_MAX || comm > COMM_MAX || !matches!(b[4], KEEP | DONE | CONFIRM | REFUSED | NOTE) || !matches!(b[5], 4 | 6) {
            return None;
        }
        Some(Ask {
            kind: b[4],
            family: b[5],
            port: u16::from_le_bytes([b[6], b[7]]),
            errno: i32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: b[13],
            origin: u16::from_le_bytes([b[14], b[15]]),
            session: &b[16..16 + len],
            note: b[116],
            comm: &b[118..118 + comm],
        })
    }
}

/// The `KEY=VALUE` entries after a `DONE`'s ask ([`LOG_VARS`] only; anything else is
/// skipped).
pub fn done_vars(tail: &[u8]) -> impl Iterator<Item = (&'static str, &[u8])> + '_ {
    tail.split(|c| *c == 0).filter_map(|kv| {
        let eq = kv.iter().position(|c| *c == b'=')?;
        let key = LOG_VARS.iter().find(|k| k.as_bytes() == &kv[..eq])?;
        Some((*key, &kv[eq + 1..]))
    })
}

/// A `KEEP`'s tail after its [`ASK_LEN`] bytes: the pid it is asked for when its flags
/// say [`FOR_CHILD`] (`None` when the tail is too short for one), and the rest.
pub fn asked_for(flags: u8, tail: &[u8]) -> Option<(Option<u32>, &[u8])> {
    if flags & FOR_CHILD == 0 {
        return Some((None, tail));
    }
    let (pid, rest) = tail.split_at_checked(FOR_LEN)?;
    Some((Some(u32::from_le_bytes(<[u8; FOR_LEN]>::try_from(pid).ok()?)), rest))
}

/// The bytes of a spool record before its message: its length (`u16`), the pid, the
/// wall-clock time (ms since the epoch).
pub const SPOOL_HEAD: usize = 14;

/// Completes the spool record in `buf`, whose message (`msg_len` bytes: a `NOTE` and its
/// variables) is in place after [`SPOOL_HEAD`] bytes: the head written before it. The
/// record's length, 0 when it does not fit.
pub fn spool_record(pid: u32, ts_ms: u64, msg_len: usize, buf: &mut [u8]) -> usize {
    let n = SPOOL_HEAD + msg_len;
    let fits = n <= buf.len();
    let (Ok(len), Some(head)) = (u16::try_from(n), buf.get_mut(..SPOOL_HEAD).filter(|_| fits)) else { return 0 };
    head[0..2].copy_from_slice(&len.to_le_bytes());
    head[2..6].copy_from_slice(&pid.to_le_bytes());
    head[6..14].copy_from_slice(&ts_ms.to_le_bytes());
    n
}

/// The records of a spool: pid, time and message each; a torn or garbled tail ends them.
pub fn spooled(data: &[u8]) -> impl Iterator<Item = (u32, u64, &[u8])> + '_ {
    let mut rest = data;
    core::iter::from_fn(move || {
        let n = usize::from(u16::from_le_bytes([*rest.first()?, *rest.get(1)?]));
        let rec = rest.get(..n).filter(|_| n >= SPOOL_HEAD)?;
        rest = &rest[n..];
        let pid = u32::from_le_bytes([rec[2], rec[3], rec[4], rec[5]]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&rec[6..14]);
        Some((pid, u64::from_le_bytes(ts), &rec[SPOOL_HEAD..]))
    })
}

impl Answer {
    pub fn encode(&self) -> [u8; ANSWER_LEN] {
        let mut b = [0u8; ANSWER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.status;
        b[5] = u8::from(self.existing);
        b[6..8].copy_from_slice(&self.port.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Answer> {
        if b.len() != ANSWER_LEN || b[0..4] != MAGIC.to_le_bytes() || !matches!(b[4], GRANTED | DECLINED | MOVED | BUSY) {
            return None;
        }
        Some(Answer { status: b[4], existing: b[5] != 0, port: u16::from_le_bytes([b[6], b[7]]) })
    }

    /// A `TOLD` and the line after it (`port`: the refused one).
    pub fn told(port: u16, line: &[u8]) -> ([u8; ANSWER_LEN], &[u8]) {
        Answer { status: TOLD, port, existing: false }.with_line(line)
    }

    /// This answer and the line after it, cut to fit [`TOLD_MAX`].
    pub fn with_line(self, line: &[u8]) -> ([u8; ANSWER_LEN], &[u8]) {
        (self.encode(), &line[..line.len().min(TOLD_MAX - ANSWER_LEN)])
    }

    /// The line of a `TOLD` message; `None` for anything else.
    pub fn told_line(b: &[u8]) -> Option<&[u8]> {
        Answer::line_of(b, TOLD)
    }

    /// The line after an answer of `status` (`TOLD`, or a `DECLINED` that says why).
    pub fn line_of(b: &[u8], status: u8) -> Option<&[u8]> {
        (b.len() >= ANSWER_LEN && b.len() <= TOLD_MAX && b[0..4] == MAGIC.to_le_bytes() && b[4] == status).then(|| &b[ANSWER_LEN..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ask_survives_the_wire_and_garbage_does_not_pass() {
        let a = Ask { kind: KEEP, port: 3000, family: 6, errno: 0, flags: MAY_MOVE, origin: 2999, session: b"agent-1", note: 0, comm: b"" };
        let wire = a.encode().unwrap();
        assert_eq!(Ask::decode(&wire), Some(a));
        let (head, line) = Answer::told(3000, b"connect to port 3000 refused");
        assert_eq!(Answer::told_line(&[&head[..], line].concat()), Some(&b"connect to port 3000 refused"[..]));
        assert_eq!(Answer::told_line(&Answer { status: GRANTED, port: 1, existing: false }.encode()), None);
        for kind in [DONE, CONFIRM, REFUSED, NOTE] {
            let b = Ask { kind, flags: 0, note: kind, comm: b"python3", ..a };
            assert_eq!(Ask::decode(&b.encode().unwrap()), Some(b), "kind {kind}");
        }
        assert_eq!(Ask::decode(&wire[..ASK_LEN - 1]), None, "short");
        let mut bad = wire;
        bad[0] ^= 1;
        assert_eq!(Ask::decode(&bad), None, "another version");
        let mut bad = wire;
        bad[12] = 101;
        assert_eq!(Ask::decode(&bad), None, "session longer than allowed");
        let mut bad = wire;
        bad[4] = 9;
        assert_eq!(Ask::decode(&bad), None, "unknown kind");
        assert_eq!(Ask { session: &[b'x'; 101], ..a }.encode(), None);
        let long = Ask { comm: b"a-very-long-process-name", ..a }.encode().unwrap();
        assert_eq!(Ask::decode(&long).map(|a| a.comm), Some(&b"a-very-long-pro"[..]), "a name is cut as the kernel cuts it");
        let d = Ask { kind: DONE, errno: 98, ..a };
        assert_eq!(Ask::decode(&d.encode().unwrap()), Some(d));
    }

    #[test]
    fn a_keep_for_another_process_names_it_before_its_variables() {
        let tail = [&4242u32.to_le_bytes()[..], b"HOME=/h\0"].concat();
        assert_eq!(asked_for(FOR_CHILD | MAY_MOVE, &tail), Some((Some(4242), &b"HOME=/h\0"[..])));
        assert_eq!(asked_for(MAY_MOVE, &tail), Some((None, &tail[..])), "its own");
        assert_eq!(asked_for(FOR_CHILD, &[1, 2, 3]), None, "too short for a pid");
    }

    #[test]
    fn a_dones_variables_are_the_log_ones_only() {
        let tail = b"HOME=/home/a\0PATH=/bin\0STYXY_PRELOAD_LOG=/tmp/x=y\0junk\0\0XDG_STATE_HOME=\0";
        let got: Vec<_> = done_vars(tail).collect();
        assert_eq!(got, [("HOME", &b"/home/a"[..]), ("STYXY_PRELOAD_LOG", b"/tmp/x=y"), ("XDG_STATE_HOME", b"")]);
    }

    #[test]
    fn spool_records_survive_and_a_torn_tail_ends_them() {
        let mut spool = Vec::new();
        for (pid, msg) in [(7u32, &b"first"[..]), (8, b"second")] {
            let mut buf = [0u8; 64];
            buf[SPOOL_HEAD..SPOOL_HEAD + msg.len()].copy_from_slice(msg);
            let n = spool_record(pid, 1_700_000_000_000 + u64::from(pid), msg.len(), &mut buf);
            spool.extend_from_slice(&buf[..n]);
        }
        let whole: Vec<_> = spooled(&spool).collect();
        assert_eq!(whole, [(7, 1_700_000_000_007, &b"first"[..]), (8, 1_700_000_000_008, b"second")]);
        assert_eq!(spooled(&spool[..spool.len() - 1]).count(), 1, "a torn record is not read");
        assert_eq!(spooled(&[0, 0, 1]).count(), 0, "a garbled length ends it");
        assert_eq!(spool_record(1, 1, 100, &mut [0u8; 50]), 0, "too long for the buffer");
    }

    #[test]
    fn an_answer_survives_the_wire() {
        for status in [GRANTED, MOVED, DECLINED] {
            let a = Answer { status, port: 8061, existing: true };
            assert_eq!(Answer::decode(&a.encode()), Some(a));
        }
        assert_eq!(Answer::decode(&[0; ANSWER_LEN]), None);
    }
}
