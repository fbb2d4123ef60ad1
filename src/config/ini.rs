//! `config.ini`, read line by line so that every error can say the file, the line and what was
//! expected there. The format is the part of Python's `configparser` the course uses: `KEY =
//! value` or `KEY: value` lines, comments starting with `;` or `#`, blank lines, and an optional
//! `[DEFAULT]` section header (the course's file starts with one). Any other section is refused:
//! these binaries have one set of keys, so a section could only mislead.

use std::collections::HashMap;
use std::error::Error;

use config::{Map, Value, ValueKind};

/// The dialect as a `config` format: each value's origin is `path:line`, and an error is
/// `path:line: what is wrong`.
#[derive(Debug, Clone)]
pub(super) struct CourseIni {
    pub path: String,
    pub known: Vec<&'static str>,
}

impl config::Format for CourseIni {
    fn parse(&self, _uri: Option<&String>, text: &str) -> Result<Map<String, Value>, Box<dyn Error + Send + Sync>> {
        let entries = parse(text, &self.known).map_err(|(line, why)| format!("{}:{line}: {why}", self.path))?;
        Ok(entries
            .into_iter()
            .map(|(key, entry)| {
                let origin = format!("{}:{}", self.path, entry.line);
                (key, Value::new(Some(&origin), ValueKind::String(entry.value)))
            })
            .collect())
    }
}

impl config::FileStoredFormat for CourseIni {
    fn file_extensions(&self) -> &'static [&'static str] {
        &["ini"]
    }
}

/// A value from the file, and the line it is on (from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub value: String,
    pub line: usize,
}

/// Parses `text`; keys are upper-cased, and each must be one of `known`.
///
/// # Errors
/// `(line, what is wrong)` for the first line that is not a comment, a blank, `[DEFAULT]` or
/// a known `KEY = value` set once.
pub(super) fn parse(text: &str, known: &[&str]) -> Result<HashMap<String, Entry>, (usize, String)> {
    let mut entries: HashMap<String, Entry> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.trim();
        if content.is_empty() || content.starts_with([';', '#']) {
            continue;
        }
        if let Some(header) = content.strip_prefix('[') {
            section(header).map_err(|why| (line, why))?;
            continue;
        }
        let Some(at) = content.find(['=', ':']) else {
            let why = format!("{content:?} is not a setting: expected KEY = value, [DEFAULT], or a comment (; or #)");
            return Err((line, why));
        };
        let (key, value) = (content[..at].trim().to_ascii_uppercase(), unquote(content[at + 1..].trim()));
        if key.is_empty() {
            return Err((line, format!("{content:?} has no key before {:?}", &content[at..=at])));
        }
        if !known.contains(&key.as_str()) {
            return Err((line, format!("unknown key {key:?}: expected one of {}", known.join(", "))));
        }
        if let Some(first) = entries.get(&key) {
            return Err((line, format!("{key} is set twice (first on line {}): expected each key once", first.line)));
        }
        entries.insert(key, Entry { value: value.to_owned(), line });
    }
    Ok(entries)
}

/// A section header after its `[`: only `DEFAULT` is accepted.
fn section(header: &str) -> Result<(), String> {
    let Some(name) = header.strip_suffix(']') else {
        return Err(format!("[{header} has no closing ]: expected [DEFAULT]"));
    };
    if name.trim().eq_ignore_ascii_case("DEFAULT") {
        return Ok(());
    }
    Err(format!("section [{name}] is not accepted: expected keys at the top of the file or under [DEFAULT]"))
}

/// A value in matching double or single quotes stands for what is inside them.
fn unquote(value: &str) -> &str {
    for quote in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(quote).and_then(|v| v.strip_suffix(quote)) {
            return inner;
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["SERVER_PORT", "SERVER_IP", "SERVER_LISTEN_BACKLOG", "LOGGING_LEVEL"];

    #[test]
    fn reads_the_course_file() {
        let text =
            "[DEFAULT]\nSERVER_PORT = 12345\nSERVER_IP = server\nSERVER_LISTEN_BACKLOG = 5\nLOGGING_LEVEL = INFO\n";
        let entries = parse(text, KNOWN).unwrap();
        assert_eq!(entries["SERVER_IP"], Entry { value: "server".into(), line: 3 });
        assert_eq!(entries["LOGGING_LEVEL"].value, "INFO");
    }

    #[test]
    fn comments_colons_case_and_quotes() {
        let text =
            "; a comment\r\n  # another\n\nserver_port: 1\r\nSERVER_IP = \"::1\"\n[ default ]\nLOGGING_LEVEL='DEBUG'\n";
        let entries = parse(text, KNOWN).unwrap();
        assert_eq!(entries["SERVER_PORT"], Entry { value: "1".into(), line: 4 });
        assert_eq!(entries["SERVER_IP"].value, "::1");
        assert_eq!(entries["LOGGING_LEVEL"], Entry { value: "DEBUG".into(), line: 7 });
        assert!(parse("SERVER_IP =\n", KNOWN).unwrap()["SERVER_IP"].value.is_empty());
    }

    #[test]
    fn each_error_names_its_line_and_what_was_expected() {
        let cases: [(&str, usize, &str); 6] = [
            ("[DEFAULT]\nSERVER_PORT\n", 2, "\"SERVER_PORT\" is not a setting: expected KEY = value"),
            ("\n\n[server]\n", 3, "section [server] is not accepted: expected keys at the top"),
            ("[DEFAULT\n", 1, "[DEFAULT has no closing ]: expected [DEFAULT]"),
            ("SERVER_PROT = 1\n", 1, "unknown key \"SERVER_PROT\": expected one of SERVER_PORT, SERVER_IP"),
            ("SERVER_PORT = 1\n; x\nserver_port = 2\n", 3, "SERVER_PORT is set twice (first on line 1)"),
            (" = 5\n", 1, "\"= 5\" has no key before \"=\""),
        ];
        for (text, line, why) in cases {
            let (at, message) = parse(text, KNOWN).unwrap_err();
            assert_eq!(at, line, "{text:?}: {message}");
            assert!(message.starts_with(why), "{text:?}: {message:?} does not start with {why:?}");
            assert!(!message.contains("Some("), "debug text in {message:?}");
        }
    }
}
