//! Text from others (process names, session names, a daemon's messages) made safe for a
//! terminal: every table cell the CLI prints, and the hooks' stderr notice, go through
//! [`cell`]. `--json` output
//! needs none of this: JSON escapes control characters itself.

use std::borrow::Cow;

/// A character a terminal may act on rather than show: C0 controls (ESC starts escape
/// sequences, BEL rings, CR overwrites), DEL, C1 controls (U+009B is a one-character
/// CSI), and the bidirectional overrides that reorder what follows them.
fn unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with each control character written as a visible escape (`\x1b`, `\u{9b}`,
/// `\n`): one line, shown as is, never interpreted.
pub fn cell(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if u32::from(c) < 0x80 && unsafe_char(c) => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A message of several lines (an error): each line neutralised, the line breaks kept.
pub fn lines(s: &str) -> String {
    s.split('\n').map(cell).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_become_visible_escapes() {
        assert!(matches!(cell("node"), Cow::Borrowed("node")));
        assert_eq!(cell("héllo wörld ✓"), "héllo wörld ✓");
        assert_eq!(cell("\x1b[31mevil\x07"), "\\x1b[31mevil\\x07");
        assert_eq!(cell("a\u{9b}b\u{7f}c\u{85}"), "a\\u{9b}b\\x7fc\\u{85}");
        assert_eq!(cell("x\ny\tz\r"), "x\\ny\\tz\\r");
        assert_eq!(cell("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(lines("one\x1b\ntwo"), "one\\x1b\ntwo");
    }
}
