//! The notice: one line on the program's stderr (`styxy-preload: …`), under the one rule
//! for where a line of ours may go ([`notice_rule`](crate::notice_rule), which the hooks'
//! logic follows too). `STYXY_PRELOAD_NOTIFY=off` silences it.

use crate::libc_calls::{errno, set_errno};
use crate::notice_rule::write_line;
use crate::settings::env;
use crate::switch;

/// The longest line written; a longer one is cut.
const LINE_MAX: usize = 512;

/// `styxy-preload: ` and `parts`, one line on stderr; errno untouched.
pub(crate) fn notice(parts: &[&[u8]]) {
    let saved = errno();
    // SAFETY: tested here and not kept.
    if !unsafe { env(c"STYXY_PRELOAD_NOTIFY") }.is_some_and(switch::is_off) {
        let mut line = [0u8; LINE_MAX];
        let mut n = 0;
        for part in core::iter::once(&b"styxy-preload: "[..]).chain(parts.iter().copied()) {
            n = cut(&mut line, n, part);
        }
        if let Some(end) = line.get_mut(n) {
            *end = b'\n';
        }
        // SAFETY: passed on and not kept.
        write_line(line.get(..=n).unwrap_or(&[]), unsafe { env(c"STYXY_PRELOAD_STDERR") });
    }
    set_errno(saved);
}

/// `s` copied into `line` at `at` as far as it fits (a byte left for the newline), control
/// characters as `?` (a line is one line); the new length.
fn cut(line: &mut [u8; LINE_MAX], at: usize, s: &[u8]) -> usize {
    let mut n = at;
    for c in s {
        let Some(slot) = line.get_mut(n).filter(|_| n < LINE_MAX - 1) else { break };
        *slot = if c.is_ascii_control() { b'?' } else { *c };
        n += 1;
    }
    n
}
