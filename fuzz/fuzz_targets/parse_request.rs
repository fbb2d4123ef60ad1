//! Fuzz target for everything that parses what a peer sends: request lines, bet rows and reply
//! lines. Each parser must answer any bytes with a value or a typed error, never a panic, and
//! whatever it accepts must survive a trip through its encoder unchanged.
//!
//! Run: `cargo +nightly fuzz run parse_request` from the repository root (see docs/fuzzing.md).

#![no_main]

use libfuzzer_sys::fuzz_target;
use lottery::wire::bet::{Bet, RowParser, RowWriter};
use lottery::wire::row::RowEncoder;
use lottery::wire::protocol::{ProtocolError, Reply, Request, parse_request};
use time::{Date, Month};

fuzz_target!(|data: &[u8]| {
    let today = Date::from_calendar_date(2026, Month::November, 26).expect("a calendar date");
    let mut parser = RowParser::default();
    check_request(data, &mut parser, today);
    for line in data.split(|&b| b == b'\n') {
        check_request(line, &mut parser, today);
        check_row(line, &mut parser, today);
        check_fast_path(line, &mut parser, today);
        if let Ok(text) = std::str::from_utf8(line) {
            check_reply(text);
        }
    }
});

/// A request parses, or is refused with an error that is itself a well-formed reply. A parsed
/// request, written back in canonical form, parses to the same request.
fn check_request(line: &[u8], parser: &mut RowParser, today: Date) {
    match parse_request(line) {
        Ok(request) => {
            assert_eq!(parse_request(&encode_request(&request)).as_ref(), Ok(&request), "line {line:?}");
            if let Request::Bet(row) = &request {
                check_row(row, parser, today);
            }
        }
        Err(error) => check_reply_round_trip(&Reply::Err(error)),
    }
}

/// The line an agency would send for `request`.
fn encode_request(request: &Request) -> Vec<u8> {
    match request {
        Request::Ping => b"PING".to_vec(),
        Request::Hello { agency, token: None } => format!("HELLO {agency}").into_bytes(),
        Request::Hello { agency, token: Some(token) } => format!("HELLO {agency} {}", token.expose()).into_bytes(),
        Request::Bet(row) => [b"BET ".as_slice(), row].concat(),
        Request::Batch { offset, count } => format!("BATCH {offset} {count}").into_bytes(),
        Request::Done => b"DONE".to_vec(),
        Request::Winners => b"WINNERS".to_vec(),
        Request::Status => b"STATUS".to_vec(),
        Request::Quit => b"QUIT".to_vec(),
    }
}

/// A row the parser accepts as a bet is a valid bet, and `push_bet` writes it back as a row that
/// parses to the same bet. A six-field row that is an agency and a bet does the same through
/// `push_stored`, as `bets.csv` is read back.
fn check_row(line: &[u8], parser: &mut RowParser, today: Date) {
    let stored = match parser.fields(line) {
        Ok(fields) => {
            assert!(fields.len() <= 16, "{} fields from {line:?}", fields.len());
            match fields.as_slice() {
                [agency, bet @ ..] if bet.len() == 5 => {
                    agency.parse::<u32>().ok().zip(Bet::from_fields(bet, today).ok())
                }
                _ => None,
            }
        }
        Err(_) => None,
    };
    if let Some((agency, bet)) = stored {
        let mut writer = RowWriter::default();
        writer.push_stored(agency, &bet);
        let row = one_line(writer.take());
        let fields = parser.fields(&row).expect("a written row is well-formed CSV");
        assert_eq!(fields.first().map(|a| a.parse::<u32>()), Some(Ok(agency)), "row {row:?}");
        assert_eq!(Bet::from_fields(&fields[1..], today).as_ref(), Ok(&bet), "row {row:?}");
    }

    if let Ok(bet) = parser.bet(line, today) {
        assert_valid(&bet, today);
        let mut writer = RowWriter::default();
        writer.push_bet(&bet);
        let row = one_line(writer.take());
        assert_eq!(parser.bet(&row, today).as_ref(), Ok(&bet), "line {line:?} was written back as {row:?}");
    }
}

/// The fast path ([`RowEncoder`]) stores and sends exactly what the reference path (the parser,
/// then the writer) did, and refuses what it refused with the same error.
fn check_fast_path(line: &[u8], parser: &mut RowParser, today: Date) {
    let reference = parser.bet(line, today);
    let (mut encoder, mut writer) = (RowEncoder::new(today), RowWriter::default());
    let mut stored = Vec::new();
    let fast = encoder.push_stored(7, line, &mut stored).map(|()| stored);
    let expected = reference.as_ref().map(|bet| {
        writer.push_stored(7, bet);
        writer.take()
    });
    assert_eq!(fast.as_ref(), expected.as_ref().map_err(|e| *e), "stored row of {line:?}");
    let mut wire = Vec::new();
    let fast = encoder.push_wire(line, &mut wire).map(|()| wire);
    let expected = reference.as_ref().map(|bet| {
        writer.push_bet(bet);
        writer.take()
    });
    assert_eq!(fast.as_ref(), expected.as_ref().map_err(|e| *e), "wire row of {line:?}");
}

/// The rules of a valid bet (the spec's "Data files"), checked on what the parser let through.
fn assert_valid(bet: &Bet, today: Date) {
    for name in [&bet.first_name, &bet.last_name] {
        assert!(!name.is_empty() && name.len() <= 100 && !name.chars().any(char::is_control), "name {name:?}");
    }
    assert!((1..=10).contains(&bet.document.len()) && bet.document.bytes().all(|b| b.is_ascii_digit()));
    let today = format!("{:04}-{:02}-{:02}", today.year(), u8::from(today.month()), today.day());
    assert!(bet.birthdate.as_str() >= "1900-01-01" && bet.birthdate <= today, "birthdate {:?}", bet.birthdate);
    assert!(bet.number <= 9999);
}

/// A reply the agency accepts, encoded back, parses to the same reply.
fn check_reply(line: &str) {
    if let Ok(reply) = Reply::parse(line) {
        check_reply_round_trip(&reply);
    }
}

fn check_reply_round_trip(reply: &Reply) {
    let mut out = Vec::new();
    reply.encode(&mut out);
    let line = String::from_utf8(one_line(out)).expect("a reply is UTF-8");
    // The encoder keeps an error to one line by turning its line breaks into spaces.
    let expected = match reply {
        Reply::Err(e) => Reply::Err(ProtocolError::new(e.code, e.message.replace(['\n', '\r'], " "))),
        other => other.clone(),
    };
    assert_eq!(Reply::parse(&line), Ok(expected), "reply {reply:?} was encoded as {line:?}");
}

/// An encoded row or reply without its `\n`, checked to be exactly one line.
fn one_line(mut bytes: Vec<u8>) -> Vec<u8> {
    assert_eq!(bytes.pop(), Some(b'\n'), "{bytes:?} ends in \\n");
    assert!(!bytes.contains(&b'\n'), "{bytes:?} is one line");
    bytes
}
