//! The filter `exec` installs in its child just before `execve`: `bind`, `listen`
//! (and `connect`, for session virtualisation) go to a user-notification listener;
//! every other syscall runs untouched. The child hands the listener to `exec` over a
//! socketpair (`SCM_RIGHTS`), or the errno that stopped it — then runs the program
//! either way.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use libc::{c_int, sock_filter, sock_fprog};
use styxy_preload_common::UNSUPERVISED_BIND;

/// The `AUDIT_ARCH_*` of the programs we answer for; 0 where we have not built it.
#[cfg(target_arch = "x86_64")]
pub const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
pub const AUDIT_ARCH: u32 = 0xC000_00B7;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub const AUDIT_ARCH: u32 = 0;

/// The syscalls the supervisor answers.
pub fn trapped(connect: bool) -> Vec<i64> {
    let mut calls = vec![libc::SYS_bind, libc::SYS_listen];
    if connect {
        calls.push(libc::SYS_connect);
    }
    calls
}

/// The BPF program: another architecture (a 32-bit program), another syscall, or a
/// call tagged [`UNSUPERVISED_BIND`] in its 4th argument (the daemon's own test binds)
/// is allowed; one of `calls` is a user notification.
pub fn program(calls: &[i64]) -> Vec<sock_filter> {
    let op = |code: u32, k: u32, jt: u8, jf: u8| sock_filter { code: code as u16, jt, jf, k };
    let n = calls.len() as u8;
    let (ld, jeq, ret) =
        (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, libc::BPF_RET | libc::BPF_K);
    // struct seccomp_data: nr at 0, arch at 4, args[3] at 40 (low half) and 44
    let (tag_lo, tag_hi) = (UNSUPERVISED_BIND as u32, (UNSUPERVISED_BIND >> 32) as u32);
    let mut p = vec![
        op(ld, 4, 0, 0),
        op(jeq, AUDIT_ARCH, 0, n + 5), // → ALLOW
        op(ld, 40, 0, 0),
        op(jeq, tag_lo, 0, 2), // → ld nr
        op(ld, 44, 0, 0),
        op(jeq, tag_hi, n + 1, 0), // → ALLOW
        op(ld, 0, 0, 0),
    ];
    for (i, nr) in calls.iter().enumerate() {
        // jump over the remaining compares and the ALLOW to the USER_NOTIF
        p.push(op(jeq, *nr as u32, n - i as u8, 0));
    }
    p.push(op(ret, libc::SECCOMP_RET_ALLOW, 0, 0));
    p.push(op(ret, libc::SECCOMP_RET_USER_NOTIF, 0, 0));
    p
}

/// In the child, between `fork` and `execve` (async-signal-safe: syscalls only, no
/// allocation): `no_new_privs`, the filter, and the listener or the errno sent over
/// `sock`. An error only when even that message cannot be sent.
///
/// # Safety
/// Only in a `pre_exec` hook; `prog` outlives the call.
pub unsafe fn install(prog: &[sock_filter], sock: RawFd) -> io::Result<()> {
    // SAFETY: syscalls only, on the calling process (this function's contract: between
    // fork and execve); `fprog` points at `prog`, which outlives the call; errno is read
    // right after the call that set it.
    unsafe {
        let fprog = sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut sock_filter };
        let mut listener: c_int = -1;
        let mut err: c_int = 0;
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            err = *libc::__errno_location();
        } else {
            // once the supervisor holds a notification, only a fatal signal interrupts the
            // call (Linux 5.19): otherwise a signal would restart a bind we already made
            for flags in [
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            ] {
                listener = libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &fprog as *const sock_fprog) as c_int;
                err = if listener < 0 { *libc::__errno_location() } else { 0 };
                if err != libc::EINVAL {
                    break;
                }
            }
        }
        let sent = send(sock, err, (listener >= 0).then_some(listener));
        if listener >= 0 {
            libc::close(listener);
        }
        if sent {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// In the child, between `fork` and `execve`: SIGKILL when `parent` (its supervisor)
/// dies — at once if it already has. Syscalls only.
pub fn die_with(parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: prctl and getppid on the calling process.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

/// Control-message space for one fd, with the alignment `cmsghdr` needs.
#[repr(C, align(8))]
struct Cmsg([u8; 32]);

/// Sends `err` and, when there is one, the listener `fd` over `sock`.
///
/// # Safety
/// Only between `fork` and `execve` (no allocation); `sock` and `fd` are open.
unsafe fn send(sock: RawFd, err: c_int, fd: Option<c_int>) -> bool {
    let mut payload = err;
    let mut iov = libc::iovec { iov_base: (&mut payload as *mut c_int).cast(), iov_len: std::mem::size_of::<c_int>() };
    let mut cmsg = Cmsg([0; 32]);
    // SAFETY: msghdr is plain data (zero is valid); it points at `iov` and `cmsg`, live
    // buffers of the sizes given; the control header written is the first of `cmsg`,
    // which has room and alignment for one fd (`Cmsg`).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            msg.msg_control = cmsg.0.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<c_int>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<c_int>(), fd);
        }
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) >= 0
    }
}

/// In `exec`, after the child started: its listener, or why it has none.
pub fn receive(sock: &OwnedFd) -> Result<OwnedFd, String> {
    let mut payload: c_int = 0;
    let mut iov = libc::iovec { iov_base: (&mut payload as *mut c_int).cast(), iov_len: std::mem::size_of::<c_int>() };
    let mut cmsg = Cmsg([0; 32]);
    // SAFETY: msghdr points at live buffers of the sizes given.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = cmsg.0.len();
        if libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) < 0 {
            return Err(format!("no word from the child: {}", io::Error::last_os_error()));
        }
        let c = libc::CMSG_FIRSTHDR(&msg);
        if !c.is_null() && (*c).cmsg_type == libc::SCM_RIGHTS {
            return Ok(OwnedFd::from_raw_fd(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<c_int>())));
        }
    }
    Err(match payload {
        libc::EACCES | libc::EPERM => "seccomp is not permitted here".into(),
        libc::EBUSY => "an outer seccomp supervisor already answers this tree".into(),
        libc::EINVAL => "the kernel has no seccomp user notification (Linux 5.0+)".into(),
        e => format!("installing the filter failed: {}", io::Error::from_raw_os_error(e)),
    })
}

/// A `SOCK_SEQPACKET` pair, both ends close-on-exec.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: fds is a valid out-array of two.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh fds we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the classic-BPF program on a `seccomp_data` (the three instructions it uses).
    fn verdict(p: &[sock_filter], nr: i64, arch: u32, arg3: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as i32).to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        data[40..48].copy_from_slice(&arg3.to_ne_bytes());
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = p[pc];
            match u32::from(i.code) {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    acc = u32::from_ne_bytes(data[i.k as usize..i.k as usize + 4].try_into().unwrap());
                    pc += 1;
                }
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => pc += 1 + usize::from(if acc == i.k { i.jt } else { i.jf }),
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                c => panic!("unexpected instruction {c:#x}"),
            }
        }
    }

    #[test]
    fn the_trapped_calls_notify_and_everything_else_is_allowed() {
        use libc::{SECCOMP_RET_ALLOW as ALLOW, SECCOMP_RET_USER_NOTIF as NOTIFY};
        for connect in [false, true] {
            let p = program(&trapped(connect));
            assert_eq!(verdict(&p, libc::SYS_bind, AUDIT_ARCH, 0), NOTIFY);
            assert_eq!(verdict(&p, libc::SYS_listen, AUDIT_ARCH, 7), NOTIFY);
            assert_eq!(verdict(&p, libc::SYS_connect, AUDIT_ARCH, 0), if connect { NOTIFY } else { ALLOW });
            for nr in [libc::SYS_read, libc::SYS_accept, libc::SYS_socket, libc::SYS_sendto, libc::SYS_execve] {
                assert_eq!(verdict(&p, nr, AUDIT_ARCH, 0), ALLOW, "syscall {nr}");
            }
            // a 32-bit program's calls (other numbers there) are never trapped
            assert_eq!(verdict(&p, libc::SYS_bind, 0x4000_0003, 0), ALLOW);
            // the daemon's tagged test bind goes through; half a tag does not
            assert_eq!(verdict(&p, libc::SYS_bind, AUDIT_ARCH, UNSUPERVISED_BIND), ALLOW);
            assert_eq!(verdict(&p, libc::SYS_bind, AUDIT_ARCH, UNSUPERVISED_BIND & 0xffff_ffff), NOTIFY);
            assert_eq!(verdict(&p, libc::SYS_bind, AUDIT_ARCH, UNSUPERVISED_BIND & !0xffff_ffff), NOTIFY);
        }
    }
}
