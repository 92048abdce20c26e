//! `connect()` inside a session (docs/ARCHITECTURE.md "A call's way"): a loopback
//! connect to a port this session remapped goes to the actual port; one to a
//! coordinated port another session holds is refused, as if nothing listened. Two
//! reads of the shared port map, no round trip.

use libc::{c_int, SOCK_STREAM};
use styxy_preload_common::policy::Decision;

use crate::call::Route;
use crate::process::Process;
use crate::sys::Addr;

/// Where a connect to `orig` goes; `sock_type` is asked only when the port matters.
pub fn route(p: &Process, orig: &Addr, sock_type: &mut dyn FnMut() -> Option<c_int>) -> Route {
    if p.tag == 0 || !orig.is_loopback() {
        return Route::AsAsked;
    }
    let Some(map) = p.portmap() else {
        return Route::AsAsked;
    };
    if let Some(actual) = map.lookup(p.tag, orig.port).filter(|a| *a != orig.port) {
        if sock_type() == Some(SOCK_STREAM) {
            return Route::To(orig.with_port(actual));
        }
        return Route::AsAsked;
    }
    if p.isolate {
        let holder = map.held(orig.port);
        if holder != 0
            && holder != p.tag
            && !matches!(p.policy.decide(orig.port), Decision::Untouched(_))
            && sock_type() == Some(SOCK_STREAM)
        {
            return Route::Refused;
        }
    }
    Route::AsAsked
}
