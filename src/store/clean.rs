//! The one place where text from a playbook or a node is made storable.
//!
//! Everything a task reports (task names, host names, messages, event payloads, `err`, output
//! excerpts) comes from programs downlink does not control. Both databases take any valid UTF-8
//! except that PostgreSQL refuses NUL in text (SQLSTATE 22021), so the policy is one rule applied
//! here and nowhere else: bytes that are not valid UTF-8 and NUL characters both become U+FFFD,
//! the replacement character `String::from_utf8_lossy` already uses. Persistence passes every
//! write through [`Clean`] before it reaches the store, so no caller can forget it.
//!
//! JSON from the callback plugin may also carry an unpaired surrogate escape (`"\udcff"`, what
//! Python's `json.dumps` makes of a byte it decoded with `surrogateescape`), which is valid for
//! Python and refused by serde_json; [`repair_json_escapes`] turns those into `\ufffd` so the
//! event is kept instead of dropped.

use std::borrow::Cow;

use crate::store::{Finish, HostState, NewEvent};

/// The character that stands for anything that cannot be stored.
pub const REPLACEMENT: char = '\u{FFFD}';

/// `text` with every NUL replaced; borrowed when there is none (the common case costs a scan).
pub fn text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// Bytes read from a file or a pipe as storable text: invalid UTF-8 and NUL replaced.
pub fn bytes(bytes: &[u8]) -> String {
    let lossy = String::from_utf8_lossy(bytes);
    text(&lossy).into_owned()
}

fn field(value: &mut String) {
    if let Cow::Owned(clean) = text(value) {
        *value = clean;
    }
}

fn optional(value: &mut Option<String>) {
    if let Some(v) = value {
        field(v);
    }
}

/// A write whose text fields are made storable in place.
pub trait Clean {
    /// Replaces what no backend can store (see the module).
    fn clean(&mut self);
}

impl Clean for NewEvent {
    fn clean(&mut self) {
        optional(&mut self.host);
        field(&mut self.kind);
        optional(&mut self.task_name);
        field(&mut self.payload);
    }
}

impl Clean for HostState {
    fn clean(&mut self) {
        field(&mut self.host);
        optional(&mut self.result);
        optional(&mut self.msg);
    }
}

impl Clean for Finish {
    fn clean(&mut self) {
        optional(&mut self.err);
        for host in &mut self.hosts {
            host.clean();
        }
    }
}

impl<T: Clean> Clean for Vec<T> {
    fn clean(&mut self) {
        for item in self {
            item.clean();
        }
    }
}

/// JSON text with unpaired UTF-16 surrogate escapes (`\ud800`–`\udfff` not forming a pair)
/// replaced by `\ufffd`; `None` when there is nothing to repair.
pub fn repair_json_escapes(json: &str) -> Option<String> {
    if !json.contains("\\u") && !json.contains("\\U") {
        return None;
    }
    let b = json.as_bytes();
    let mut out = String::with_capacity(json.len());
    let mut changed = false;
    let mut i = 0;
    let mut last = 0;
    let hex_at = |at: usize| -> Option<u16> {
        let h = json.get(at..at + 4)?;
        u16::from_str_radix(h, 16).ok()
    };
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        // An escape: `\\` and `\"` are skipped whole so `\\u` is not read as an escape.
        if b.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        let Some(unit) = hex_at(i + 2) else {
            i += 2;
            continue;
        };
        let high = (0xD800..0xDC00).contains(&unit);
        let low = (0xDC00..0xE000).contains(&unit);
        if high
            && b.get(i + 6) == Some(&b'\\')
            && b.get(i + 7) == Some(&b'u')
            && hex_at(i + 8).is_some_and(|u| (0xDC00..0xE000).contains(&u))
        {
            i += 12;
            continue;
        }
        if high || low {
            out.push_str(&json[last..i]);
            out.push_str("\\ufffd");
            changed = true;
            i += 6;
            last = i;
            continue;
        }
        i += 6;
    }
    if !changed {
        return None;
    }
    out.push_str(&json[last..]);
    Some(out)
}

/// `s` on one line (runs of white space folded), at most `max` characters.
pub fn one_line(s: &str, max: usize) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Status;

    #[test]
    fn nul_and_invalid_utf8_become_the_replacement_character() {
        assert_eq!(text("a\0b"), "a\u{FFFD}b");
        assert!(matches!(text("plain"), Cow::Borrowed("plain")));
        assert_eq!(bytes(b"x\xff\0y"), "x\u{FFFD}\u{FFFD}y");
    }

    #[test]
    fn every_text_field_of_a_write_is_cleaned() {
        let mut ev = NewEvent {
            task_id: 1,
            seq: 1,
            host: Some("h\0".into()),
            kind: "k\0".into(),
            task_name: Some("a\0b".into()),
            payload: "{\0}".into(),
            created_at: crate::time::now(),
        };
        ev.clean();
        for f in [
            ev.host.as_deref(),
            Some(ev.kind.as_str()),
            ev.task_name.as_deref(),
            Some(ev.payload.as_str()),
        ] {
            let f = f.unwrap();
            assert!(!f.contains('\0') && f.contains(REPLACEMENT), "{f:?}");
        }
        let host = HostState {
            host: "h\0".into(),
            msg: Some("m\0".into()),
            result: Some("ok".into()),
            ..HostState::default()
        };
        let mut fin = Finish {
            id: 1,
            status: Status::Failed,
            err: Some("e\0".into()),
            exit_code: None,
            ended_at: crate::time::now(),
            hosts: vec![host],
            usage: Default::default(),
        };
        fin.clean();
        assert_eq!(fin.err.as_deref(), Some("e\u{FFFD}"));
        assert_eq!(fin.hosts[0].host, "h\u{FFFD}");
        assert_eq!(fin.hosts[0].msg.as_deref(), Some("m\u{FFFD}"));
    }

    #[test]
    fn lone_surrogate_escapes_are_repaired_and_pairs_kept() {
        let bad = r#"{"msg":"\udcff and \ud83d\ude00 and \\udcff and \ud800"}"#;
        let fixed = repair_json_escapes(bad).unwrap();
        assert_eq!(
            fixed,
            r#"{"msg":"\ufffd and \ud83d\ude00 and \\udcff and \ufffd"}"#
        );
        let v: serde_json::Value = serde_json::from_str(&fixed).unwrap();
        assert!(v["msg"].as_str().unwrap().starts_with('\u{FFFD}'));
        assert_eq!(repair_json_escapes(r#"{"a":"\u00e9"}"#), None);
        assert_eq!(repair_json_escapes("{}"), None);
    }
}
