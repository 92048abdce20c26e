//! The supervisor: answers the filtered calls of every process under `exec` with the
//! library's own decisions (`bind::decide`, `listen::decide`, `connect::route`),
//! carried out on a copy of the caller's socket taken with `pidfd_getfd` — so the
//! caller cannot change the address after the check. It runs on a thread of `exec`,
//! an ancestor of the whole tree (Yama's ptrace scope 1 allows no one else), until no
//! process uses the filter any more. When it cannot act on a call it lets the call
//! run as the program made it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use libc::{c_int, seccomp_notif, seccomp_notif_resp};
use styxy_preload_common::procinfo;
use styxy_preload_core::process::Process;
use styxy_preload_core::sys::errno;
use styxy_preload_core::{bind, connect, listen, sys, Addr, Caller, Route, Socket, Verdict};

use super::workers::Workers;

/// What the caller's syscall returns.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Run it as the program made it.
    Continue,
    Return(Result<(), c_int>),
}

/// Serves `listener` until the last process using the filter is gone.
pub fn run(listener: OwnedFd, p: &Process) {
    let listener = Arc::new(listener);
    let workers = Workers::new();
    let fd = listener.as_raw_fd();
    // Linux 6.6+: the caller and this thread wake each other on the same CPU (a round
    // trip costs about half); older kernels refuse the flag and nothing changes
    const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;
    // SAFETY: an ioctl on our listener with a flags value.
    unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP) };
    loop {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            break;
        }
        if pfd.revents & libc::POLLIN == 0 {
            break; // POLLHUP: no process uses the filter any more
        }
        // SAFETY: the kernel wants a zeroed struct of exactly this layout.
        let mut req: seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req) } != 0 {
            match errno() {
                // the caller was interrupted or killed before we took its call
                libc::ENOENT | libc::EINTR => continue,
                e => {
                    eprintln!("styxy-preload: the seccomp supervisor stops: {}", std::io::Error::from_raw_os_error(e));
                    break;
                }
            }
        }
        let answer = catch_unwind(AssertUnwindSafe(|| handle(&listener, &workers, &req, p))).unwrap_or(Some(Answer::Continue));
        if let Some(a) = answer {
            respond(fd, req.id, a);
        }
    }
}

/// A pidfd of `pid` (close-on-exec), or the errno.
pub(super) fn pidfd_open(pid: u32) -> Result<OwnedFd, c_int> {
    // SAFETY: plain syscall; the fd is ours on success.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as c_int;
    if raw < 0 {
        return Err(errno());
    }
    // SAFETY: a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A copy of the process's fd `fd` through its pidfd (close-on-exec), or the errno.
pub(super) fn pidfd_getfd(pidfd: RawFd, fd: c_int) -> Result<OwnedFd, c_int> {
    // SAFETY: plain syscall; the fd is ours on success (close-on-exec by the kernel).
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) } as c_int;
    if raw < 0 {
        return Err(errno());
    }
    // SAFETY: a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn respond(listener: RawFd, id: u64, a: Answer) {
    let mut resp = seccomp_notif_resp { id, val: 0, error: 0, flags: 0 };
    match a {
        Answer::Continue => resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        Answer::Return(Ok(())) => {}
        Answer::Return(Err(e)) => resp.error = -e,
    }
    // SAFETY: a valid response; ENOENT (the caller died meanwhile) needs nothing.
    unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_SEND, &resp) };
}

/// `None` when a thread answers later (a blocking connect).
fn handle(listener: &Arc<OwnedFd>, workers: &Workers, req: &seccomp_notif, p: &Process) -> Option<Answer> {
    let nr = i64::from(req.data.nr);
    let args = req.data.args;
    let mut sock = Remote {
        listener: listener.as_raw_fd(),
        id: req.id,
        tid: req.pid,
        fd: args[0] as c_int,
        call: Call::Listen(0),
        target: None,
        copy: None,
    };
    if nr == libc::SYS_listen {
        sock.call = Call::Listen(args[1] as c_int);
        let Ok(who) = sock.target().cloned() else {
            return Some(Answer::Continue);
        };
        return Some(answer(listen::decide(p, &who.caller(), &mut sock, &mut bind::Hook::new(p))));
    }
    // bind or connect: the address is read once, here. Once a decision is made on it,
    // the call is made on our copy of the socket with our copy of the address: another
    // thread of the caller may change its memory meanwhile, and the kernel must not read
    // it again (`CONTINUE` would). A socket that is not IPv4/IPv6 reaches no port,
    // whatever the address says: its calls continue.
    if !sock.inet() {
        return Some(Answer::Continue);
    }
    let raw = match Raw::read(req.pid, args[1], args[2]) {
        Ok(raw) => raw,
        Err(e) => return Some(Answer::Return(Err(e))),
    };
    let connecting = nr == libc::SYS_connect;
    let route = |a: &Addr| connect::route(p, a, &mut || sock.sock_type());
    match step(connecting, Addr::from_bytes(raw.bytes()), route, |a| bind::untouched(p, a)) {
        Step::Fail(e) => {
            if let (Some(orig), Ok(who)) = (Addr::from_bytes(raw.bytes()), sock.target().cloned()) {
                connect::refused(p, &who.caller(), &orig, &mut bind::Hook::new(p));
            }
            Some(Answer::Return(Err(e)))
        }
        Step::AsRead if connecting => sock.connect(listener, workers, raw),
        Step::AsRead => Some(sock.bind_as_read(&raw)),
        Step::ConnectTo(target) => sock.connect(listener, workers, Raw::of(&target)),
        Step::DecideBind(orig) => {
            sock.call = Call::Bind(orig);
            let Ok(who) = sock.target().cloned() else {
                return Some(Answer::Continue);
            };
            Some(match bind::decide(p, &who.caller(), &orig, &mut sock, &mut bind::Hook::new(p)) {
                Verdict::AsAsked => sock.bind_as_read(&raw),
                Verdict::Done(r) => Answer::Return(r),
            })
        }
    }
}

/// What the supervisor does with a bind or connect on an IPv4/IPv6 socket whose address
/// it read.
enum Step {
    /// The call fails with this errno (isolation refuses the connect).
    Fail(c_int),
    /// Made on our copies with the address as the caller passed it.
    AsRead,
    /// A connect made to this address instead (the session's remap of the port).
    ConnectTo(Addr),
    /// A bind the library decides (`bind::decide`).
    DecideBind(Addr),
}

/// The supervisor's decision for a bind or a connect (`connecting`) to `addr` (`None`: not
/// an address the decisions read, AF_UNSPEC or too short — the kernel says what it
/// says), given the library's decisions: `route` for a connect, `untouched` for a bind.
fn step(connecting: bool, addr: Option<Addr>, route: impl FnOnce(&Addr) -> Route, untouched: impl FnOnce(&Addr) -> bool) -> Step {
    let Some(orig) = addr else { return Step::AsRead };
    if connecting {
        return match route(&orig) {
            Route::AsAsked => Step::AsRead,
            Route::Refused => Step::Fail(libc::ECONNREFUSED),
            Route::To(target) => Step::ConnectTo(target),
        };
    }
    if untouched(&orig) {
        Step::AsRead
    } else {
        Step::DecideBind(orig)
    }
}

fn answer(v: Verdict) -> Answer {
    match v {
        Verdict::AsAsked => Answer::Continue,
        Verdict::Done(r) => Answer::Return(r),
    }
}

/// The answer to a bind made as the caller asked it on our copies: its result, but a
/// privileged port we may not bind (`EACCES`: the caller may hold the capability) goes
/// to the kernel as the program made it — that failed bind changed nothing.
fn as_read(result: Result<(), c_int>) -> Answer {
    match result {
        Err(libc::EACCES) => Answer::Continue,
        r => Answer::Return(r),
    }
}

/// A sockaddr as the caller passed it, copied out of its memory (or made here).
#[derive(Clone, Copy)]
struct Raw {
    buf: [u8; std::mem::size_of::<libc::sockaddr_storage>()],
    len: usize,
}

impl Raw {
    /// The caller's `len` bytes at `ptr`; the errno the kernel would give when they
    /// cannot be read.
    fn read(tid: u32, ptr: u64, len: u64) -> Result<Raw, c_int> {
        let mut raw = Raw { buf: [0; std::mem::size_of::<libc::sockaddr_storage>()], len: 0 };
        // as the kernel's move_addr_to_kernel
        let len = usize::try_from(len).ok().filter(|l| *l <= raw.buf.len()).ok_or(libc::EINVAL)?;
        raw.len = len;
        if len == 0 {
            return Ok(raw);
        }
        let local = libc::iovec { iov_base: raw.buf.as_mut_ptr().cast(), iov_len: len };
        let remote = libc::iovec { iov_base: ptr as *mut libc::c_void, iov_len: len };
        // SAFETY: one iovec each side; the kernel checks the remote range.
        let n = unsafe { libc::process_vm_readv(tid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n != len as isize {
            return Err(libc::EFAULT);
        }
        Ok(raw)
    }

    fn of(a: &Addr) -> Raw {
        let len = a.socklen() as usize;
        let mut raw = Raw { buf: [0; std::mem::size_of::<libc::sockaddr_storage>()], len };
        // SAFETY: an Addr holds `socklen()` initialised bytes at `ptr()`, at most a sockaddr_storage.
        raw.buf[..len].copy_from_slice(unsafe { std::slice::from_raw_parts(a.ptr().cast::<u8>(), len) });
        raw
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn ptr(&self) -> *const libc::sockaddr {
        if self.len == 0 {
            std::ptr::null()
        } else {
            self.buf.as_ptr().cast()
        }
    }
}

/// The calling process: who it is, and a pidfd to take its socket with.
#[derive(Clone)]
struct Target {
    pid: u32,
    comm: String,
    cwd: Option<String>,
    pidfd: Arc<OwnedFd>,
}

impl Target {
    fn caller(&self) -> Caller<'_> {
        Caller { pid: self.pid, comm: &self.comm, cwd: self.cwd.as_deref() }
    }
}

enum Call {
    Bind(Addr),
    Listen(c_int),
}

/// The caller's socket, seen through a copy in this process.
struct Remote {
    listener: RawFd,
    id: u64,
    /// The calling thread.
    tid: u32,
    /// The socket's number in the caller.
    fd: c_int,
    call: Call,
    target: Option<Result<Target, c_int>>,
    copy: Option<Result<OwnedFd, c_int>>,
}

impl Remote {
    /// Whether the caller still waits for this notification (so its pid and memory
    /// were still the caller's when we read them).
    fn valid(&self) -> bool {
        // SAFETY: ioctl with a pointer to the id.
        unsafe { libc::ioctl(self.listener, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &self.id) == 0 }
    }

    fn target(&mut self) -> Result<&Target, c_int> {
        if self.target.is_none() {
            let t = self.open_target();
            if let Err(e) = &t {
                self.give_up(*e);
            }
            self.target = Some(t);
        }
        self.target.as_ref().expect("set above").as_ref().map_err(|e| *e)
    }

    fn open_target(&self) -> Result<Target, c_int> {
        let pidfd_open = |pid: u32| pidfd_open(pid).map(Arc::new);
        // the calling thread is the process itself, unless it is another thread of it
        let (pid, pidfd) = match pidfd_open(self.tid) {
            Ok(fd) => (self.tid, fd),
            // EINVAL before Linux 6.9, ENOENT since: not a thread-group leader
            Err(libc::EINVAL | libc::ENOENT) => {
                let pid = procinfo::tgid(self.tid).ok_or(libc::ESRCH)?;
                (pid, pidfd_open(pid)?)
            }
            Err(e) => return Err(e),
        };
        if !self.valid() {
            return Err(libc::ESRCH); // the pid may have been reused
        }
        let comm = procinfo::comm(pid).unwrap_or_else(|| "?".into());
        let cwd = procinfo::cwd(pid);
        Ok(Target { pid, comm, cwd, pidfd })
    }

    fn copy(&mut self) -> Result<RawFd, c_int> {
        if self.copy.is_none() {
            let c = self.take_copy();
            if let Err(e) = &c {
                self.give_up(*e);
            }
            self.copy = Some(c);
        }
        self.copy.as_ref().expect("set above").as_ref().map(|f| f.as_raw_fd()).map_err(|e| *e)
    }

    fn take_copy(&mut self) -> Result<OwnedFd, c_int> {
        let pidfd = self.target()?.pidfd.as_raw_fd();
        pidfd_getfd(pidfd, self.fd)
    }

    /// Whether the socket is IPv4 or IPv6 (false when we cannot take a copy of it).
    fn inet(&mut self) -> bool {
        self.copy().ok().and_then(|fd| sys::sockopt(fd, libc::SO_DOMAIN)).is_some_and(|d| d == libc::AF_INET || d == libc::AF_INET6)
    }

    /// The bind as the caller asked it, made on our copies of its socket and address
    /// ([`as_read`] answers it).
    fn bind_as_read(&mut self, raw: &Raw) -> Answer {
        let Ok(fd) = self.copy() else {
            return Answer::Continue;
        };
        // SAFETY: our copy of the socket and of the address.
        let rc = unsafe { libc::bind(fd, raw.ptr(), raw.len as libc::socklen_t) };
        as_read(if rc == 0 { Ok(()) } else { Err(errno()) })
    }

    fn give_up(&mut self, e: c_int) {
        static WARNED: AtomicBool = AtomicBool::new(false);
        // ESRCH: the caller is gone; EBADF: its fd is not open, the kernel will say so
        if e != libc::ESRCH && e != libc::EBADF && !WARNED.swap(true, Ordering::Relaxed) {
            let err = std::io::Error::from_raw_os_error(e);
            eprintln!("styxy-preload: cannot reach the socket of thread {} ({err}): its calls run uncoordinated", self.tid);
        }
    }

    /// Connects the caller's socket to `to`: here when it does not block, else on a
    /// thread of its own that answers when the connect does.
    fn connect(&mut self, listener: &Arc<OwnedFd>, workers: &Workers, to: Raw) -> Option<Answer> {
        let Ok(fd) = self.copy() else {
            return Some(Answer::Continue);
        };
        // SAFETY: fcntl on our own copy.
        let blocking = unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_NONBLOCK == 0;
        let copy = self.copy.take().and_then(Result::ok).expect("copied above");
        let go = move || connect_fd(copy.as_raw_fd(), &to);
        if !blocking {
            return Some(Answer::Return(go()));
        }
        let (listener, id) = (listener.clone(), self.id);
        let job = Box::new(move || respond(listener.as_raw_fd(), id, Answer::Return(go())));
        match workers.run(job) {
            Ok(()) => None,
            // no thread to wait on it: here, then (the address must not be read again)
            Err(job) => {
                job();
                None
            }
        }
    }
}

fn connect_fd(fd: RawFd, to: &Raw) -> Result<(), c_int> {
    // SAFETY: our copy of the socket and our copy of the address.
    if unsafe { libc::connect(fd, to.ptr(), to.len as libc::socklen_t) } == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

impl Socket for Remote {
    fn reachable(&mut self) -> bool {
        self.copy().is_ok()
    }

    fn sock_type(&mut self) -> Option<c_int> {
        sys::sock_type(self.copy().ok()?)
    }

    fn shares_port(&mut self) -> bool {
        self.copy().is_ok_and(sys::shares_port)
    }

    fn local_addr(&mut self) -> Option<Addr> {
        sys::local_addr(self.copy().ok()?)
    }

    fn run(&mut self, addr: Option<&Addr>) -> Result<(), c_int> {
        let fd = self.copy()?;
        // SAFETY: our copy of the socket and of the address.
        let rc = unsafe {
            match &self.call {
                Call::Bind(orig) => {
                    let a = addr.unwrap_or(orig);
                    libc::bind(fd, a.ptr(), a.socklen())
                }
                Call::Listen(backlog) => libc::listen(fd, *backlog),
            }
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(errno())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step as a row of a table shows it: what, its errno, its port.
    type Shape = (&'static str, Option<c_int>, Option<u16>);

    fn shape(s: Step) -> Shape {
        match s {
            Step::Fail(e) => ("fail", Some(e), None),
            Step::AsRead => ("as read", None, None),
            Step::ConnectTo(a) => ("connect to", None, Some(a.port)),
            Step::DecideBind(a) => ("decide bind", None, Some(a.port)),
        }
    }

    const ASKED: u16 = 3000;

    #[test]
    fn each_bind_and_connect_goes_where_the_decisions_say() {
        let asked = Some(Addr::ipv4([127, 0, 0, 1], ASKED));
        let moved = Addr::ipv4([127, 0, 0, 1], 3007);
        let no_route = |_: &Addr| -> Route { panic!("a bind is never routed") };
        let no_test = |_: &Addr| -> bool { panic!("a connect is never a bind's question") };
        let rows: [(&str, Step, Shape); 7] = [
            ("connect, no inet address", step(true, None, no_route, no_test), ("as read", None, None)),
            ("bind, no inet address", step(false, None, no_route, no_test), ("as read", None, None)),
            ("connect as asked", step(true, asked, |_| Route::AsAsked, no_test), ("as read", None, None)),
            ("connect isolated", step(true, asked, |_| Route::Refused, no_test), ("fail", Some(libc::ECONNREFUSED), None)),
            ("connect remapped", step(true, asked, move |_| Route::To(moved), no_test), ("connect to", None, Some(3007))),
            ("bind untouched", step(false, asked, no_route, |a| a.port == ASKED), ("as read", None, None)),
            ("bind coordinated", step(false, asked, no_route, |_| false), ("decide bind", None, Some(ASKED))),
        ];
        for (case, got, want) in rows {
            assert_eq!(shape(got), want, "{case}");
        }
    }

    #[test]
    fn a_bind_as_read_answers_its_result_but_leaves_a_privileged_port_to_the_kernel() {
        let rows = [
            (Ok(()), Answer::Return(Ok(()))),
            (Err(libc::EADDRINUSE), Answer::Return(Err(libc::EADDRINUSE))),
            (Err(libc::EINVAL), Answer::Return(Err(libc::EINVAL))),
            (Err(libc::EACCES), Answer::Continue),
        ];
        for (result, want) in rows {
            assert_eq!(as_read(result), want, "{result:?}");
        }
    }

    #[test]
    fn a_verdict_is_the_calls_answer() {
        assert_eq!(answer(Verdict::AsAsked), Answer::Continue);
        assert_eq!(answer(Verdict::Done(Ok(()))), Answer::Return(Ok(())));
        assert_eq!(answer(Verdict::Done(Err(libc::EADDRINUSE))), Answer::Return(Err(libc::EADDRINUSE)));
    }
}
