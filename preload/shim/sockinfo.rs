//! What the shim reads of the program's socket and address: the sockaddr (only where
//! the kernel would read it without a fault), the socket's type, `SO_REUSEPORT`.

use crate::decide::SocketFacts;
use core::ffi::{c_int, c_void};

use crate::libc_calls::{errno, set_errno, IoVec, SockLen, ENOSYS, EPERM, SOCK_STREAM, SOL_SOCKET, SO_REUSEPORT, SO_TYPE};
use crate::sockaddr;
use crate::sys::{getpid, getsockopt, process_vm_readv};

/// Caller memory this close above our own stack frame is the caller's frames: mapped.
const STACK_WINDOW: usize = 64 * 1024;

/// `SO_REUSEPORT` is set: the socket may share its port, so `EADDRINUSE` never comes.
pub(crate) fn shares_port(fd: c_int) -> bool {
    let mut v: c_int = 0;
    let mut len: SockLen = 4;
    // SAFETY: getsockopt writes at most `len` (4) bytes into `v`; any fd may be asked.
    unsafe { getsockopt(fd, SOL_SOCKET, SO_REUSEPORT, (&mut v as *mut c_int).cast(), &mut len) == 0 && v != 0 }
}

/// Whether the `len` bytes at `addr` (the caller's sockaddr, at most a
/// `sockaddr_storage`) can be read without a fault: the kernel returns `EFAULT` for a
/// bad pointer, and so must we, never `SIGSEGV`. Caller memory just above our own stack
/// frame is the caller's frames (where nearly every program keeps its sockaddr): no
/// syscall; anything else is read once by the kernel on our behalf.
fn readable(addr: *const c_void, len: SockLen) -> bool {
    let p = addr as usize;
    let len = (len as usize).min(128);
    if p < 4096 || p.checked_add(len).is_none() {
        return false;
    }
    let here = 0u8;
    let sp = &here as *const u8 as usize;
    if p >= sp && p + len <= sp + STACK_WINDOW {
        return true;
    }
    let saved = errno();
    let mut buf = [0u8; 128];
    let local = IoVec { base: buf.as_mut_ptr().cast(), len };
    let remote = IoVec { base: addr as *mut c_void, len };
    // SAFETY: the kernel writes at most `len` (≤ 128) bytes into `buf`, and reads `addr`
    // itself: memory it cannot read is an error, not a fault.
    let n = unsafe { process_vm_readv(getpid(), &local, 1, &remote, 1, 0) };
    // where the call itself is refused (a seccomp sandbox), trust the pointer as before
    let ok = n == len as isize || (n < 0 && matches!(errno(), ENOSYS | EPERM));
    set_errno(saved);
    ok
}

/// An IPv4 or IPv6 socket address: its bytes (at most a `sockaddr_storage`), family
/// and port.
pub(crate) struct Inet<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) family: u16,
    pub(crate) port: u16,
}

impl Inet<'_> {
    /// The address a program passed to bind or connect, `None` when it is not IPv4/IPv6
    /// or cannot be read (the kernel says `EFAULT`).
    ///
    /// # Safety
    /// `addr` and `len` are the program's arguments to the call being hooked, and the
    /// result is used during that call.
    pub(crate) unsafe fn of_call<'a>(addr: *const c_void, len: SockLen) -> Option<Inet<'a>> {
        if addr.is_null() || len < 4 || !readable(addr, len) {
            return None;
        }
        // SAFETY: `readable` saw these bytes readable (or a seccomp sandbox refused it the
        // check, and the program's word is taken for them, as it always was); the program
        // does not change them during its own call (this function's contract).
        Inet::parse(unsafe { core::slice::from_raw_parts(addr.cast::<u8>(), (len as usize).min(128)) })
    }

    /// The family and port of an IPv4/IPv6 address; `None` for anything else.
    pub(crate) fn parse(bytes: &[u8]) -> Option<Inet<'_>> {
        sockaddr::parse(bytes).map(|(family, port)| Inet { bytes, family, port })
    }

    /// A copy of the address (its `bytes.len()` ≤ 128 bytes) with another port (`sin_port`
    /// and `sin6_port` are both at offset 2).
    pub(crate) fn with_port(&self, port: u16) -> [u8; 128] {
        let mut copy = [0u8; 128];
        if let Some(to) = copy.get_mut(..self.bytes.len()) {
            to.copy_from_slice(self.bytes);
        }
        sockaddr::set_port(&mut copy, port);
        copy
    }

    pub(crate) fn is_loopback(&self) -> bool {
        sockaddr::is_loopback(self.bytes, self.family)
    }
}

pub(crate) fn stream(fd: c_int) -> bool {
    let saved = errno();
    let mut ty: c_int = 0;
    let mut len: SockLen = 4;
    // SAFETY: getsockopt writes at most `len` (4) bytes into `ty`; any fd may be asked.
    let ok = unsafe { getsockopt(fd, SOL_SOCKET, SO_TYPE, (&mut ty as *mut c_int).cast(), &mut len) } == 0 && ty == SOCK_STREAM;
    set_errno(saved);
    ok
}

/// The program's socket as the one decision asks about it ([`SocketFacts`]): each fact read
/// once, and only when the decision turns on it (an uncoordinated bind reads `SO_REUSEPORT`
/// alone, and `SO_TYPE` only after its `EADDRINUSE`).
pub(crate) struct Facts {
    fd: c_int,
    moved_from: Option<u16>,
    stream: Option<bool>,
    shares_port: Option<bool>,
}

impl Facts {
    /// `fd`'s facts; `moved_from`: fallback mode's first port of the tool, when it moved on.
    pub(crate) fn of(fd: c_int, moved_from: Option<u16>) -> Facts {
        Facts { fd, moved_from, stream: None, shares_port: None }
    }
}

impl SocketFacts for Facts {
    fn stream(&mut self) -> bool {
        *self.stream.get_or_insert_with(|| stream(self.fd))
    }
    fn shares_port(&mut self) -> bool {
        *self.shares_port.get_or_insert_with(|| shares_port(self.fd))
    }
    fn moved_from(&mut self) -> Option<u16> {
        self.moved_from
    }
}
