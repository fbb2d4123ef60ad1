//! The server's log lines: a field's value, and the spec's shape.

/// The value of field `key` in a log line (`… | key: value | …`).
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let suffix = format!(" {key}");
    line.split(" | ")
        .find_map(|f| f.split_once(": ").filter(|(k, _)| *k == key || k.ends_with(&suffix)).map(|(_, v)| v))
}
