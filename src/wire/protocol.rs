//! The wire protocol: requests and replies as lines of text, parsed and encoded over bytes.
//!
//! Nothing here touches a socket, so every rule of the protocol can be tested on byte strings.
//! Framing (finding the lines, the 8 KiB cap, timeouts) lives in `wire::connection`.

use std::fmt;
use std::sync::Arc;

use crate::wire::token::Token;

/// Longest request line, without its line end; a batch's header plus rows share this budget too.
pub(crate) const MAX_LINE: usize = 8192;

/// Most rows a `BATCH` may announce. 8 KiB of rows cannot hold more: the shortest valid row
/// (`a,b,1,1900-01-01,0`) takes 19 bytes.
pub const MAX_BATCH_ROWS: u32 = (MAX_LINE / 19) as u32;

/// One request, parsed from one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ping,
    /// `HELLO <agency> [<token>]`; the token is a secret and never shown (see `wire::token::Token`).
    Hello {
        agency: u32,
        token: Option<Token>,
    },
    /// The CSV row after `BET `, not yet validated as a bet.
    Bet(Vec<u8>),
    /// `BATCH <offset> <count>`: `count` rows follow on their own lines.
    Batch {
        offset: u64,
        count: u32,
    },
    Done,
    Winners,
    Status,
    Quit,
}

/// The `<CODE>` of an `ERR` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    TooLong,
    BadAgency,
    BadBet,
    NoAgency,
    Closed,
    Unknown,
    BadRequest,
    Busy,
    Shutdown,
    /// The server could not write or sync `bets.csv`; nothing of the request was stored.
    Storage,
    /// The connection was silent, or too slow to finish a request, for the idle timeout.
    Timeout,
    /// Not allowed to speak for that agency: a wrong or missing token, plain text where TLS is
    /// required, or (protected mode) a peer that is not on loopback.
    Auth,
    /// A newer connection of the same agency took over this one's session.
    Replaced,
    /// The agency has stored as many bets as `SERVER_MAX_BETS_PER_AGENCY` allows.
    Quota,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::TooLong,
        ErrorCode::BadAgency,
        ErrorCode::BadBet,
        ErrorCode::NoAgency,
        ErrorCode::Closed,
        ErrorCode::Unknown,
        ErrorCode::BadRequest,
        ErrorCode::Busy,
        ErrorCode::Shutdown,
        ErrorCode::Storage,
        ErrorCode::Timeout,
        ErrorCode::Auth,
        ErrorCode::Replaced,
        ErrorCode::Quota,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorCode::TooLong => "TOO_LONG",
            ErrorCode::BadAgency => "BAD_AGENCY",
            ErrorCode::BadBet => "BAD_BET",
            ErrorCode::NoAgency => "NO_AGENCY",
            ErrorCode::Closed => "CLOSED",
            ErrorCode::Unknown => "UNKNOWN",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::Busy => "BUSY",
            ErrorCode::Shutdown => "SHUTDOWN",
            ErrorCode::Storage => "STORAGE",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::Auth => "AUTH",
            ErrorCode::Replaced => "REPLACED",
            ErrorCode::Quota => "QUOTA",
        }
    }

    fn parse(code: &str) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.as_str() == code)
    }
}

/// A request the server refuses, or a reply the agency cannot read: a code and a message for a
/// person. It is also the `ERR` reply itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError { code, message: message.into() }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ProtocolError {}

/// Parses one request line (its line end already removed). Keywords are case-insensitive, so
/// a person typing `ping` into `nc` is understood.
///
/// # Errors
/// `UNKNOWN` for a line that is no request, `BAD_REQUEST` or `BAD_AGENCY` for wrong arguments.
pub fn parse_request(line: &[u8]) -> Result<Request, ProtocolError> {
    let (keyword, args) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    let keyword = std::str::from_utf8(keyword)
        .ok()
        .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_ascii_uppercase)
        .ok_or_else(|| unknown(line))?;
    let no_args = |request| match args {
        None => Ok(request),
        Some(_) => Err(bad_request(format!("{keyword} takes no arguments"))),
    };
    match keyword.as_str() {
        "PING" => no_args(Request::Ping),
        "DONE" => no_args(Request::Done),
        "WINNERS" => no_args(Request::Winners),
        "STATUS" => no_args(Request::Status),
        "QUIT" => no_args(Request::Quit),
        "HELLO" => parse_hello(args.unwrap_or_default()),
        "BET" => match args {
            Some(row) if !row.is_empty() => Ok(Request::Bet(row.to_vec())),
            _ => Err(bad_request("usage: BET <first_name>,<last_name>,<document>,<birthdate>,<number>")),
        },
        "BATCH" => parse_batch(args.unwrap_or_default()),
        _ => Err(unknown(line)),
    }
}

fn parse_hello(args: &[u8]) -> Result<Request, ProtocolError> {
    // Only the agency's word is ever quoted back: the rest may be a secret.
    let (agency, token) = match args.iter().position(|&b| b == b' ') {
        Some(i) => (&args[..i], Some(&args[i + 1..])),
        None => (args, None),
    };
    // A separator other than one space leaves the token in this word: it is never quoted.
    let agency = match std::str::from_utf8(agency).ok().filter(|t| t.bytes().all(|b| b.is_ascii_digit())) {
        Some(text) if !text.is_empty() => text.parse::<u32>().ok(),
        _ => None,
    };
    let Some(agency) = agency else {
        return Err(ProtocolError::new(
            ErrorCode::BadAgency,
            "the agency is a number from 1 to the round's agencies (usage: HELLO <agency> <token>)",
        ));
    };
    let token = match token {
        None => None,
        Some(t) => Some(
            std::str::from_utf8(t)
                .ok()
                .and_then(Token::new)
                .ok_or_else(|| bad_request("a token is 1 to 256 printable characters without spaces"))?,
        ),
    };
    Ok(Request::Hello { agency, token })
}

fn parse_batch(args: &[u8]) -> Result<Request, ProtocolError> {
    const USAGE: &str = "usage: BATCH <offset> <count>, then <count> rows";
    let text = std::str::from_utf8(args).map_err(|_| bad_request(USAGE))?;
    let mut words = text.split(' ');
    let (Some(offset), Some(count), None) = (words.next(), words.next(), words.next()) else {
        return Err(bad_request(USAGE));
    };
    fn digits(s: &str) -> Option<&str> {
        Some(s).filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
    }
    let offset = digits(offset).and_then(|s| s.parse::<u64>().ok());
    let count = digits(count).and_then(|s| s.parse::<u32>().ok());
    match (offset, count) {
        (Some(offset), Some(count)) if (1..=MAX_BATCH_ROWS).contains(&count) => Ok(Request::Batch { offset, count }),
        (Some(_), Some(_)) => Err(bad_request(format!("a batch holds 1 to {MAX_BATCH_ROWS} rows"))),
        _ => Err(bad_request(USAGE)),
    }
}

/// Longest word an `UNKNOWN` reply quotes back: a mistyped keyword (`WINNERS` is 7 letters).
/// Quoting no more than this, and only letters, it can never show a token that followed a
/// `HELLO` with a tab or no space, or that came on a line of its own.
const MAX_QUOTED_WORD: usize = 7;

fn unknown(line: &[u8]) -> ProtocolError {
    let word = line.split(|b| !b.is_ascii_alphabetic()).next().unwrap_or_default();
    let whole_word = line.get(word.len()).is_none_or(|&b| b == b' ');
    let what = match std::str::from_utf8(word) {
        Ok(word) if whole_word && (1..=MAX_QUOTED_WORD).contains(&word.len()) => format!("{word:?}"),
        _ => "that line".to_owned(),
    };
    ProtocolError::new(
        ErrorCode::Unknown,
        format!("{what} is not a request (PING, HELLO, BET, BATCH, DONE, WINNERS, STATUS, QUIT)"),
    )
}

fn bad_request(message: impl Into<String>) -> ProtocolError {
    ProtocolError::new(ErrorCode::BadRequest, message)
}

/// At most 40 characters of a client's input, for quoting it back in a message.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// One reply line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Pong,
    /// `OK`, or `OK <stored>` after `HELLO`, `BET` and `BATCH`.
    Ok(Option<u64>),
    Winners(Vec<String>),
    Status(Status),
    Bye,
    Err(ProtocolError),
    /// A reply already encoded, `\n` included, shared rather than rebuilt per request (an
    /// agency's `WINNERS` line, made once at the draw). Never produced by [`Reply::parse`].
    Line(Arc<[u8]>),
}

/// The figures of a `STATUS` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub agencies_done: u32,
    pub agencies: u32,
    pub bets: u64,
    pub drawn: bool,
}

impl From<ProtocolError> for Reply {
    fn from(error: ProtocolError) -> Self {
        Reply::Err(error)
    }
}

impl Reply {
    /// Appends the reply and its `\n` to `out`. An error message is kept to one line.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        if let Reply::Line(line) = self {
            out.extend_from_slice(line);
            return;
        }
        // Writing into a Vec cannot fail.
        let _ = match self {
            Reply::Pong => out.write_all(b"PONG"),
            Reply::Ok(None) => out.write_all(b"OK"),
            Reply::Ok(Some(n)) => write!(out, "OK {n}"),
            Reply::Winners(dnis) if dnis.is_empty() => out.write_all(b"WINNERS 0"),
            Reply::Winners(dnis) => write!(out, "WINNERS {} {}", dnis.len(), dnis.join(",")),
            Reply::Status(s) => {
                write!(out, "STATUS agencies_done={}/{} bets={} drawn={}", s.agencies_done, s.agencies, s.bets, s.drawn)
            }
            Reply::Bye => out.write_all(b"BYE"),
            Reply::Err(e) => {
                let message = e.message.replace(['\n', '\r'], " ");
                write!(out, "ERR {} {message}", e.code.as_str())
            }
            Reply::Line(_) => Ok(()),
        };
        out.push(b'\n');
    }

    /// Parses a reply line (its line end removed), as the agency reads the server.
    ///
    /// # Errors
    /// A [`ProtocolError`] with code `UNKNOWN` naming the line that is no reply.
    pub fn parse(line: &str) -> Result<Reply, ProtocolError> {
        let bad = || ProtocolError::new(ErrorCode::Unknown, format!("not a reply: {:?}", shorten(line)));
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let reply = match (word, rest) {
            ("PONG", "") => Reply::Pong,
            ("BYE", "") => Reply::Bye,
            ("OK", "") => Reply::Ok(None),
            ("OK", n) => Reply::Ok(Some(n.parse().map_err(|_| bad())?)),
            ("WINNERS", rest) => Reply::Winners(parse_winners(rest).ok_or_else(bad)?),
            ("STATUS", rest) => Reply::Status(parse_status(rest).ok_or_else(bad)?),
            ("ERR", rest) => {
                let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
                let code = ErrorCode::parse(code).ok_or_else(bad)?;
                Reply::Err(ProtocolError::new(code, message))
            }
            _ => return Err(bad()),
        };
        Ok(reply)
    }
}

/// The `WINNERS` reply line, `\n` included, for documents already joined by commas: what the
/// server encodes once per agency at the draw.
pub(crate) fn winners_line(joined: &str) -> Vec<u8> {
    if joined.is_empty() {
        return b"WINNERS 0\n".to_vec();
    }
    let count = joined.bytes().filter(|&b| b == b',').count() + 1;
    format!("WINNERS {count} {joined}\n").into_bytes()
}

fn parse_winners(rest: &str) -> Option<Vec<String>> {
    let (count, list) = rest.split_once(' ').unwrap_or((rest, ""));
    let count: usize = count.parse().ok()?;
    let dnis: Vec<String> = match list {
        "" => Vec::new(),
        list => list.split(',').map(str::to_owned).collect(),
    };
    (dnis.len() == count).then_some(dnis)
}

fn parse_status(rest: &str) -> Option<Status> {
    let mut fields = rest.split(' ').map(|kv| kv.split_once('='));
    let (Some(("agencies_done", done)), Some(("bets", bets)), Some(("drawn", drawn)), None) =
        (fields.next()?, fields.next()?, fields.next()?, fields.next())
    else {
        return None;
    };
    let (done, agencies) = done.split_once('/')?;
    Some(Status {
        agencies_done: done.parse().ok()?,
        agencies: agencies.parse().ok()?,
        bets: bets.parse().ok()?,
        drawn: drawn.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &[u8]) -> ErrorCode {
        parse_request(line).unwrap_err().code
    }

    #[test]
    fn parses_every_request() {
        assert_eq!(parse_request(b"PING"), Ok(Request::Ping));
        assert_eq!(parse_request(b"ping"), Ok(Request::Ping));
        assert_eq!(parse_request(b"HELLO 3"), Ok(Request::Hello { agency: 3, token: None }));
        let token = Token::new("abc123").unwrap();
        assert_eq!(parse_request(b"HELLO 3 abc123"), Ok(Request::Hello { agency: 3, token: Some(token) }));
        assert_eq!(parse_request(b"BET a,b,1,2000-01-01,2"), Ok(Request::Bet(b"a,b,1,2000-01-01,2".to_vec())));
        assert_eq!(parse_request(b"BATCH 100 50"), Ok(Request::Batch { offset: 100, count: 50 }));
        assert_eq!(parse_request(b"DONE"), Ok(Request::Done));
        assert_eq!(parse_request(b"WINNERS"), Ok(Request::Winners));
        assert_eq!(parse_request(b"STATUS"), Ok(Request::Status));
        assert_eq!(parse_request(b"QUIT"), Ok(Request::Quit));
    }

    #[test]
    fn refuses_with_the_right_code() {
        assert_eq!(code(b""), ErrorCode::Unknown);
        assert_eq!(code(b"JUMP"), ErrorCode::Unknown);
        assert_eq!(code(b"\0\xff"), ErrorCode::Unknown);
        assert_eq!(code(b"PING now"), ErrorCode::BadRequest);
        assert_eq!(code(b"HELLO"), ErrorCode::BadAgency);
        assert_eq!(code(b"HELLO -1"), ErrorCode::BadAgency);
        assert_eq!(code(b"HELLO 99999999999"), ErrorCode::BadAgency);
        assert_eq!(code(b"HELLO 1 two words"), ErrorCode::BadRequest);
        assert_eq!(code(b"BET"), ErrorCode::BadRequest);
        assert_eq!(code(b"BATCH 1"), ErrorCode::BadRequest);
        assert_eq!(code(b"BATCH 1 0"), ErrorCode::BadRequest);
        assert_eq!(code(b"BATCH -1 2"), ErrorCode::BadRequest);
        assert_eq!(code(b"BATCH 0 100000"), ErrorCode::BadRequest);
        assert_eq!(code(b"BATCH 0 1 2"), ErrorCode::BadRequest);
    }

    #[test]
    fn a_bad_hello_never_quotes_the_token() {
        for line in [&b"HELLO x s3cret"[..], b"HELLO 1 s3cret extra", b"HELLO 1 s3cret\x01"] {
            let err = parse_request(line).unwrap_err();
            assert!(!err.message.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn replies_round_trip() {
        let replies = [
            Reply::Pong,
            Reply::Ok(None),
            Reply::Ok(Some(42)),
            Reply::Winners(vec![]),
            Reply::Winners(vec!["30904465".into(), "00000042".into()]),
            Reply::Status(Status { agencies_done: 2, agencies: 5, bets: 1000, drawn: false }),
            Reply::Bye,
            Reply::Err(ProtocolError::new(ErrorCode::BadBet, "row 3: number \"x\" is bad")),
        ];
        for reply in replies {
            let mut out = Vec::new();
            reply.encode(&mut out);
            let line = std::str::from_utf8(&out).unwrap().strip_suffix('\n').unwrap();
            assert_eq!(Reply::parse(line), Ok(reply));
        }
    }

    #[test]
    fn encodes_the_spec_lines() {
        let encode = |r: Reply| {
            let mut out = Vec::new();
            r.encode(&mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(encode(Reply::Winners(vec![])), "WINNERS 0\n");
        assert_eq!(encode(Reply::Winners(vec!["1".into(), "2".into()])), "WINNERS 2 1,2\n");
        assert_eq!(winners_line("1,2"), b"WINNERS 2 1,2\n");
        assert_eq!(winners_line(""), b"WINNERS 0\n");
        let status = Status { agencies_done: 1, agencies: 5, bets: 7, drawn: true };
        assert_eq!(encode(Reply::Status(status)), "STATUS agencies_done=1/5 bets=7 drawn=true\n");
        let err = ProtocolError::new(ErrorCode::Busy, "two\nlines");
        assert_eq!(encode(Reply::Err(err)), "ERR BUSY two lines\n");
    }
}
