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

/// Splits on white space, honouring single and double quotes (and backslash escapes inside double
/// quotes), as Ansible's `key=value` syntax does.
fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("has an unclosed quote".to_owned()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => word.push(c),
                            None => return Err("has an unclosed quote".to_owned()),
                        },
                        Some(c) => word.push(c),
                        None => return Err("has an unclosed quote".to_owned()),
                    }
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
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
            json!(5),
            json!(null),
            json!(["a=1"]),
        ] {
            assert!(parse(&bad).is_err(), "{bad} was accepted");
        }
    }
}
