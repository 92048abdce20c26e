//! The filter `exec` installs in its child just before `execve`: `bind`, `listen`
//! (and `connect`, for session virtualisation) go to a user-notification listener;
//! every other syscall runs untouched. The child hands the listener to `exec` over a
//! socketpair (`SCM_RIGHTS`), or the errno that stopped it — then runs the program
//! either way.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use libc::{c_int, sock_filter, sock_fprog};

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// The syscalls the supervisor answers.
pub fn trapped(connect: bool) -> Vec<i64> {
    let mut calls = vec![libc::SYS_bind, libc::SYS_listen];
    if connect {
        calls.push(libc::SYS_connect);
    }
    calls
}

/// The BPF program: another architecture (a 32-bit program) or another syscall is
/// allowed; one of `calls` is a user notification.
pub fn program(calls: &[i64]) -> Vec<sock_filter> {
    let op = |code: u32, k: u32, jt: u8, jf: u8| sock_filter { code: code as u16, jt, jf, k };
    let n = calls.len() as u8;
    let (ld, jeq, ret) =
        (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, libc::BPF_RET | libc::BPF_K);
    // offsets into struct seccomp_data: nr at 0, arch at 4
    let mut p = vec![op(ld, 4, 0, 0), op(jeq, AUDIT_ARCH, 0, n + 1), op(ld, 0, 0, 0)];
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
    let fprog = sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut sock_filter };
    let mut listener: c_int = -1;
    let mut err: c_int = 0;
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
        err = *libc::__errno_location();
    } else {
        // once the supervisor holds a notification, only a fatal signal interrupts the
        // call (Linux 5.19): otherwise a signal would restart a bind we already made
        for flags in
            [libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, libc::SECCOMP_FILTER_FLAG_NEW_LISTENER]
        {
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

/// Control-message space for one fd, with the alignment `cmsghdr` needs.
#[repr(C, align(8))]
struct Cmsg([u8; 32]);

unsafe fn send(sock: RawFd, err: c_int, fd: Option<c_int>) -> bool {
    let mut payload = err;
    let mut iov = libc::iovec { iov_base: (&mut payload as *mut c_int).cast(), iov_len: std::mem::size_of::<c_int>() };
    let mut cmsg = Cmsg([0; 32]);
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

    #[test]
    fn every_trapped_call_jumps_to_the_notification_and_the_rest_to_allow() {
        for connect in [false, true] {
            let calls = trapped(connect);
            let p = program(&calls);
            let notify = p.len() - 1;
            assert_eq!(p[notify].k, libc::SECCOMP_RET_USER_NOTIF);
            assert_eq!(p[notify - 1].k, libc::SECCOMP_RET_ALLOW);
            assert_eq!(1 + 1 + p[1].jf as usize, notify - 1, "another arch is allowed");
            for (i, nr) in calls.iter().enumerate() {
                let at = 3 + i;
                assert_eq!(p[at].k, *nr as u32);
                assert_eq!(at + 1 + p[at].jt as usize, notify);
                assert_eq!(p[at].jf, 0);
            }
        }
    }
}
