//! How the environment's on/off switches read (`STYXY_PRELOAD_ISOLATE=off`,
//! `STYXY_PRELOAD_NOTIFY=0`, `STYXY_PRELOAD_DISABLE=1`), in one place for the shim and the
//! hooks' logic, which had drifted apart. `no_std`: the shim includes this file.

/// A switch turned off: `0`, `off`, `false` or `no`, in any case, spaces around ignored.
pub fn is_off(v: &[u8]) -> bool {
    let v = v.trim_ascii();
    [b"0".as_slice(), b"off", b"false", b"no"].iter().any(|o| v.eq_ignore_ascii_case(o))
}

/// `STYXY_PRELOAD_DISABLE`'s value disables the hooks: set, and neither empty nor `0`.
pub fn disables(v: Option<&[u8]>) -> bool {
    v.map(<[u8]>::trim_ascii).is_some_and(|v| !v.is_empty() && v != b"0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_in_any_case_and_spacing() {
        for v in ["0", "off", "OFF", " Off ", "false", "FALSE", "no", "No"] {
            assert!(is_off(v.as_bytes()), "{v}");
        }
        for v in ["", "1", "on", "yes", "of", "offf", "nope"] {
            assert!(!is_off(v.as_bytes()), "{v}");
        }
    }

    #[test]
    fn disabled_by_anything_but_empty_or_zero() {
        assert!(!disables(None));
        for v in ["", "0", " 0 ", "  "] {
            assert!(!disables(Some(v.as_bytes())), "{v:?}");
        }
        for v in ["1", "yes", "true", "off"] {
            assert!(disables(Some(v.as_bytes())), "{v:?}");
        }
    }
}
