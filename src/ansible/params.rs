//! The `params` field: Ansible extra vars as a JSON object, a JSON object encoded in a string, or
//! Ansible's `key=value key2="two words"` text. All three become one JSON object, written to
//! `extra_vars.json` and passed as `-e @extra_vars.json`.

use serde_json::{Map, Value};

/// Reads `params` into a JSON object, or says why it cannot.
pub fn parse(value: &Value) -> Result<Map<String, Value>, String> {
    match value {
        Value::Object(map) => Ok(map.clone()),
        Value::String(text) => parse_text(text),
        _ => Err("must be a JSON object or a string".to_owned()),
    }
}

fn parse_text(text: &str) -> Result<Map<String, Value>, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(Map::new());
    }
    if trimmed.starts_with('{') {
        return match serde_json::from_str::<Value>(trimmed) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err("is not a valid JSON object".to_owned()),
        };
    }
    let mut map = Map::new();
    for token in split_words(trimmed)? {
        let Some((key, value)) = token.split_once('=') else {
            return Err(format!("`{}` is not key=value", clip(&token)));
        };
        if !is_var_name(key) {
            return Err(format!("`{}` is not a valid variable name", clip(key)));
        }
        map.insert(key.to_owned(), Value::String(value.to_owned()));
    }
    Ok(map)
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

fn is_var_name(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Splits as a POSIX shell would (shlex): white space separates words, single and double quotes
/// group them, a backslash escapes the next character outside single quotes.
fn split_words(text: &str) -> Result<Vec<String>, String> {
    shlex::split(text).ok_or_else(|| "has an unclosed quote or a trailing backslash".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn three_forms() {
        assert_eq!(
            parse(&json!({"a": 1})).unwrap(),
            json!({"a": 1}).as_object().unwrap().clone()
        );
        assert_eq!(parse(&json!("{\"a\": [1]}")).unwrap()["a"], json!([1]));
        let kv = parse(&json!("a=1 b='two words' c=\"x\\\"y\" d=")).unwrap();
        assert_eq!(
            Value::Object(kv),
            json!({"a": "1", "b": "two words", "c": "x\"y", "d": ""})
        );
        let escaped = parse(&json!(r"path=C:\\dir\ x q='a\b'")).unwrap();
        assert_eq!(
            Value::Object(escaped),
            json!({"path": "C:\\dir x", "q": "a\\b"})
        );
        assert!(parse(&json!("")).unwrap().is_empty());
        assert!(parse(&json!("  ")).unwrap().is_empty());
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            json!("{not json"),
            json!("[1,2]"),
            json!("novalue"),
            json!("1a=2"),
            json!("a='open"),
            json!("a=trailing\\"),
            json!(5),
            json!(null),
            json!(["a=1"]),
        ] {
            assert!(parse(&bad).is_err(), "{bad} was accepted");
        }
    }
}
