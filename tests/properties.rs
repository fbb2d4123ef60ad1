//! Property tests for the text formats: bet rows (wire, data file, `bets.csv`) and the wire
//! protocol's requests and replies.
//!
//! Example-based tests in `src/` pin the spec's lines; these check the rules over generated
//! inputs: what the writer encodes the parser reads back unchanged, and no input, however
//! malformed, makes a parser panic. See `docs/fuzzing.md` for the fuzz target that goes further.

use lottery::wire::bet::{Bet, BetError, FORMULA_STARTS, RowParser, RowWriter, is_name_char};
use lottery::wire::protocol::{ErrorCode, ProtocolError, Reply, Request, Status, parse_request};
use lottery::wire::row::RowEncoder;
use proptest::prelude::*;
use time::{Date, Duration, Month};

/// Enough cases to catch the edges the strategies aim at, few enough that the whole file runs
/// in a few seconds in a debug build. `PROPTEST_CASES`, when set, wins: a longer hunt by hand.
fn config() -> ProptestConfig {
    let default = ProptestConfig::default();
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() { default.cases } else { 512 };
    ProptestConfig { cases, ..default }
}

fn first_day() -> Date {
    Date::from_calendar_date(1900, Month::January, 1).expect("1900-01-01 is a date")
}

/// The upper bound of a birthdate, fixed once per run so a case cannot straddle midnight.
fn today() -> Date {
    static TODAY: std::sync::OnceLock<Date> = std::sync::OnceLock::new();
    *TODAY.get_or_init(lottery::wire::bet::today)
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Characters a name may hold that a CSV writer, a spreadsheet or the fast path may treat
/// specially, plus non-ASCII ones. Plain `any::<char>()` almost never draws these, so they get
/// their own arm.
const TRICKY: &[char] =
    &[' ', '\'', '-', '.', '\u{2019}', '\u{2010}', 'é', 'ñ', 'Ñ', 'ü', 'ß', '中', 'ª', '\u{301}', '\u{1dc0}', 'Ǆ'];

/// One character a name may hold: a letter, a mark, a space, an apostrophe, a hyphen or a dot.
fn name_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => proptest::sample::select(TRICKY),
        3 => proptest::char::range('A', 'z').prop_map(|c| if c.is_ascii_alphabetic() { c } else { ' ' }),
        // Mapped rather than filtered: most of `any::<char>()` is no name character, and
        // rejecting them all would cost more draws than it keeps.
        2 => any::<char>().prop_map(|c| if is_name_char(c) { c } else { '\u{b7}' }),
    ]
    .prop_map(|c| if is_name_char(c) { c } else { 'x' })
}

/// A valid name: 1..=100 bytes of name characters, not starting with a hyphen (the last
/// characters are dropped until it fits in 100 bytes; the first always fits, so it is never
/// empty).
fn name() -> impl Strategy<Value = String> {
    proptest::collection::vec(name_char(), 1..=100).prop_map(|chars| {
        let mut name = String::new();
        for c in chars {
            if name.len() + c.len_utf8() > lottery::wire::bet::MAX_NAME_BYTES {
                break;
            }
            name.push(if name.is_empty() && FORMULA_STARTS.contains(&c) { 'A' } else { c });
        }
        name
    })
}

fn document() -> impl Strategy<Value = String> {
    "[0-9]{1,10}"
}

fn format_date(date: Date) -> String {
    format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day())
}

/// A real date from 1900-01-01 to today, with both ends and a leap day drawn often.
fn birthdate() -> impl Strategy<Value = String> {
    let span = (today() - first_day()).whole_days();
    prop_oneof![
        1 => Just(first_day()),
        1 => Just(today()),
        1 => Just(Date::from_calendar_date(2000, Month::February, 29).expect("2000 is a leap year")),
        7 => (0..=span).prop_map(|days| first_day() + Duration::days(days)),
    ]
    .prop_map(format_date)
}

fn valid_bet() -> impl Strategy<Value = Bet> {
    (name(), name(), document(), birthdate(), 0u16..=9999).prop_map(
        |(first_name, last_name, document, birthdate, number)| Bet {
            first_name,
            last_name,
            document,
            birthdate,
            number,
        },
    )
}

/// A bet row as the agency sends it: `first,last,document,birthdate,number`, no line end.
fn encode_bet(bet: &Bet) -> Vec<u8> {
    let mut writer = RowWriter::default();
    writer.push_bet(bet);
    strip_line_end(writer.take())
}

fn strip_line_end(mut row: Vec<u8>) -> Vec<u8> {
    assert_eq!(row.pop(), Some(b'\n'), "a row ends in exactly one \\n");
    assert!(!row.contains(&b'\n') && !row.contains(&b'\r'), "a row is one line: {row:?}");
    row
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL.to_vec())
}

/// Any reply the server may send: an `ERR` message is anything without a line break.
fn reply() -> impl Strategy<Value = Reply> {
    let status = (any::<u32>(), any::<u32>(), any::<u64>(), any::<bool>())
        .prop_map(|(agencies_done, agencies, bets, drawn)| Status { agencies_done, agencies, bets, drawn });
    let message = "[^\r\n]{0,80}";
    prop_oneof![
        Just(Reply::Pong),
        Just(Reply::Bye),
        proptest::option::of(any::<u64>()).prop_map(Reply::Ok),
        proptest::collection::vec(document(), 0..20).prop_map(Reply::Winners),
        status.prop_map(Reply::Status),
        (error_code(), message).prop_map(|(code, message)| Reply::Err(ProtocolError::new(code, message))),
    ]
}

/// The keyword in any letter case: the server understands `ping` as `PING`.
fn any_case(keyword: &'static str) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<bool>(), keyword.len()).prop_map(move |upper| {
        keyword.chars().zip(upper).map(|(c, up)| if up { c } else { c.to_ascii_lowercase() }).collect()
    })
}

/// A valid request line (no line end) and the request it must parse to.
fn request() -> impl Strategy<Value = (Vec<u8>, Request)> {
    let no_args = proptest::sample::select(vec![
        ("PING", Request::Ping),
        ("DONE", Request::Done),
        ("WINNERS", Request::Winners),
        ("STATUS", Request::Status),
        ("QUIT", Request::Quit),
    ])
    .prop_flat_map(|(keyword, request)| any_case(keyword).prop_map(move |k| (k.into_bytes(), request.clone())));
    let hello = (any_case("HELLO"), any::<u32>())
        .prop_map(|(k, agency)| (format!("{k} {agency}").into_bytes(), Request::Hello { agency, token: None }));
    let batch = (any_case("BATCH"), any::<u64>(), 1..=lottery::wire::protocol::MAX_BATCH_ROWS).prop_map(
        |(k, offset, count)| (format!("{k} {offset} {count}").into_bytes(), Request::Batch { offset, count }),
    );
    let bet = (any_case("BET"), valid_bet()).prop_map(|(k, bet)| {
        let row = encode_bet(&bet);
        let mut line = format!("{k} ").into_bytes();
        line.extend_from_slice(&row);
        (line, Request::Bet(row))
    });
    prop_oneof![1 => no_args, 2 => hello, 2 => batch, 3 => bet]
}

/// Bytes shaped like requests (a keyword, then arguments from a small alphabet) so that the
/// no-panic properties reach the argument parsers, not only the "unknown keyword" path.
fn request_like() -> impl Strategy<Value = Vec<u8>> {
    let keyword = proptest::sample::select(vec![
        "PING", "ping", "HELLO", "hello", "BET", "BATCH", "batch", "DONE", "WINNERS", "STATUS", "QUIT", "",
    ]);
    let arg_byte = prop_oneof![
        4 => proptest::sample::select(b"0123456789 ,-+\"".to_vec()),
        1 => any::<u8>(),
    ];
    (keyword, proptest::option::of(proptest::collection::vec(arg_byte, 0..40))).prop_map(|(keyword, args)| {
        let mut line = keyword.as_bytes().to_vec();
        if let Some(args) = args {
            line.push(b' ');
            line.extend(args);
        }
        line
    })
}

/// Bytes shaped like bet rows: the CSV special bytes, digits, dashes, and now and then any byte.
fn row_like() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        30 => proptest::sample::select(b"ab0123456789-,,,\"\" ".to_vec()),
        // A line break ends the parse early, so it stays rare enough to let most rows reach it.
        1 => proptest::sample::select(b"\r\n".to_vec()),
        5 => any::<u8>(),
    ];
    proptest::collection::vec(byte, 0..80)
}

/// A valid bet's row with bytes spliced in: what a CSV reader or the fast path may get wrong
/// (quotes, commas, line breaks, a BOM, a C1 control, invalid UTF-8, half a character, a
/// leading zero), at any place, even inside a multi-byte character.
fn bent_row() -> impl Strategy<Value = Vec<u8>> {
    let insert = proptest::sample::select(vec![
        &b"\""[..],
        b"\"\"",
        b",",
        b"\r",
        b"\n",
        b"\r\n",
        b"\xef\xbb\xbf",
        b"\xc2\x85",
        b"\xc2\xa0",
        b"\xff",
        b"\xc3",
        b"\xa1",
        b"0",
        b"9",
        b"-",
        b" ",
        b"\t",
        b"\x7f",
        b"+",
        b"=",
        b"@",
        b"'",
        b".",
        b"\xe2\x80\xa8",
        b"\xe2\x80\x8b",
        b"\xcc\x81",
        b"\xc2\xb7",
    ]);
    let edits = proptest::collection::vec((any::<proptest::sample::Index>(), insert), 0..3);
    (valid_bet(), edits, any::<bool>()).prop_map(|(bet, edits, quote_all)| {
        let mut row = encode_bet(&bet);
        if quote_all {
            // Quoted where no quote is needed: valid CSV that minimal quoting writes differently.
            let at = row.iter().position(|&b| b == b',').unwrap_or(row.len());
            row.insert(at, b'"');
            row.insert(0, b'"');
        }
        for (at, bytes) in edits {
            let at = at.index(row.len() + 1);
            row.splice(at..at, bytes.iter().copied());
        }
        row
    })
}

/// What the server stored for a row before the fast path: the reference parser, then the
/// writer's minimal quoting.
fn reference_stored(agency: u32, line: &[u8]) -> Result<Vec<u8>, BetError> {
    let bet = RowParser::default().bet(line, today())?;
    let mut writer = RowWriter::default();
    writer.push_stored(agency, &bet);
    Ok(writer.take())
}

fn reference_wire(line: &[u8]) -> Result<Vec<u8>, BetError> {
    let bet = RowParser::default().bet(line, today())?;
    let mut writer = RowWriter::default();
    writer.push_bet(&bet);
    Ok(writer.take())
}

/// A `HELLO` line gone wrong around a 64-hex-digit token: any keyword spelling, separators
/// other than one space (none, two, a tab, a NUL, a no-break space…), a bad agency word,
/// trailing junk, or the token on a line of its own. Returns the line and the token.
fn malformed_hello() -> impl Strategy<Value = (Vec<u8>, String)> {
    let keyword = proptest::sample::select(vec!["HELLO", "hello", "HeLLo", "HELO", "HELLO:", "XHELLO", ""]);
    let separator = proptest::sample::select(vec![
        " ",
        "  ",
        "\t",
        " \t",
        "",
        "\r",
        "\x0b",
        "\x00",
        ",",
        ":",
        "=",
        "\u{a0}",
        "\u{2028}",
        " \u{3000}",
    ]);
    let agency = proptest::sample::select(vec!["1", "01", "x", "", "99999999999", "-1", "1x", "5"]);
    let trailing = proptest::sample::select(vec!["", " ", "  junk", "\t", "\r", " extra words", "\x00", "|x"]);
    (keyword, separator.clone(), agency, separator, "[0-9a-f]{64}", trailing, any::<bool>()).prop_map(
        |(keyword, sep1, agency, sep2, token, trailing, alone)| {
            let line = if alone {
                format!("{token}{trailing}")
            } else {
                format!("{keyword}{sep1}{agency}{sep2}{token}{trailing}")
            };
            (line.into_bytes(), token)
        },
    )
}

/// Strings shaped like replies.
fn reply_like() -> impl Strategy<Value = String> {
    let word =
        proptest::sample::select(vec!["PONG", "BYE", "OK", "WINNERS", "STATUS", "ERR", "ERR BUSY", "ERR BAD_BET", ""]);
    (word, proptest::option::of("[0-9a-z_=/ ,+-]{0,40}")).prop_map(|(word, rest)| match rest {
        Some(rest) => format!("{word} {rest}"),
        None => word.to_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// A wire/data-file row written by `push_bet` reads back as the same bet.
    #[test]
    fn push_bet_then_parse_is_identity(bet in valid_bet()) {
        let row = encode_bet(&bet);
        prop_assert_eq!(RowParser::default().bet(&row, today()), Ok(bet));
    }

    /// A `bets.csv` row written by `push_stored` reads back as the agency and the same bet.
    #[test]
    fn push_stored_then_parse_is_identity(agency in any::<u32>(), bet in valid_bet()) {
        let mut writer = RowWriter::default();
        writer.push_stored(agency, &bet);
        let row = strip_line_end(writer.take());
        let mut parser = RowParser::default();
        let fields = parser.fields(&row).expect("a written row is well-formed CSV");
        prop_assert_eq!(fields.len(), 6);
        prop_assert_eq!(fields[0], agency.to_string());
        prop_assert_eq!(Bet::from_fields(&fields[1..], today()), Ok(bet));
    }

    /// `parse_request` answers any bytes with a request or a typed error, never a panic.
    #[test]
    fn parse_request_never_panics(line in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_request(&line);
    }

    #[test]
    fn parse_request_never_panics_on_request_like_bytes(line in request_like()) {
        let _ = parse_request(&line);
    }

    /// The row parser answers any bytes with fields or a typed error, never a panic, and a bet
    /// it accepts obeys every rule of a valid bet.
    #[test]
    fn row_parser_never_panics(line in prop_oneof![proptest::collection::vec(any::<u8>(), 0..200), row_like()]) {
        let mut parser = RowParser::default();
        if let Ok(fields) = parser.fields(&line) {
            prop_assert!(fields.len() <= 16);
        }
        if let Ok(bet) = parser.bet(&line, today()) {
            for name in [&bet.first_name, &bet.last_name] {
                prop_assert!(!name.is_empty() && name.len() <= 100 && !name.chars().any(char::is_control));
                prop_assert!(name.chars().all(is_name_char) && !name.starts_with(FORMULA_STARTS), "{:?}", name);
            }
            prop_assert!((1..=10).contains(&bet.document.len()));
            prop_assert!(bet.document.bytes().all(|b| b.is_ascii_digit()));
            prop_assert!(bet.number <= 9999);
            prop_assert!(bet.birthdate.as_str() >= "1900-01-01" && bet.birthdate <= format_date(today()));
        }
    }

    /// A comma or a quote anywhere in UTF-8 text, even between the bytes of one character, gives
    /// fields or a typed error, never a panic. Random bytes almost never reach this case: the
    /// fields must join into valid UTF-8.
    #[test]
    fn a_comma_inside_a_character_does_not_panic(text in "\\PC{1,12}",
                                                 at in any::<proptest::sample::Index>(),
                                                 separator in proptest::sample::select(vec![&b","[..], b"\"\",", b"\"\""])) {
        let mut line = text.into_bytes();
        let at = at.index(line.len() + 1);
        line.splice(at..at, separator.iter().copied());
        let _ = RowParser::default().fields(&line);
    }

    /// `Reply::parse` answers any text with a reply or a typed error, never a panic.
    #[test]
    fn reply_parse_never_panics(line in prop_oneof![any::<String>(), reply_like()]) {
        let _ = Reply::parse(&line);
    }

    /// Every reply encodes to one line that parses back to it.
    #[test]
    fn reply_encode_then_parse_is_identity(reply in reply()) {
        let mut out = Vec::new();
        reply.encode(&mut out);
        let line = String::from_utf8(strip_line_end(out)).expect("a reply is UTF-8");
        prop_assert_eq!(Reply::parse(&line), Ok(reply));
    }

    /// An error message with line breaks still encodes to one line; they become spaces.
    #[test]
    fn an_error_reply_is_always_one_line(code in error_code(), message in ".{0,40}") {
        let mut out = Vec::new();
        Reply::Err(ProtocolError::new(code, message.as_str())).encode(&mut out);
        let line = String::from_utf8(strip_line_end(out)).expect("a reply is UTF-8");
        let expected = ProtocolError::new(code, message.replace(['\n', '\r'], " "));
        prop_assert_eq!(Reply::parse(&line), Ok(Reply::Err(expected)));
    }

    /// A valid request line parses to exactly the request it was built from.
    #[test]
    fn valid_requests_parse_exactly((line, request) in request()) {
        prop_assert_eq!(parse_request(&line), Ok(request));
    }

    /// Whatever surrounds a token, a refused `HELLO`'s reply never shows eight characters of it.
    #[test]
    fn no_reply_to_a_malformed_hello_quotes_the_token((line, token) in malformed_hello()) {
        if let Err(error) = parse_request(&line) {
            let mut out = Vec::new();
            Reply::Err(error).encode(&mut out);
            let reply = String::from_utf8_lossy(&out);
            for part in token.as_bytes().windows(8) {
                let part = std::str::from_utf8(part).expect("hex");
                prop_assert!(!reply.contains(part), "{:?} quotes {:?}", reply, part);
            }
        }
    }

    /// A `BATCH` announcing no rows, or more than 8 KiB can hold, is refused as `BAD_REQUEST`.
    #[test]
    fn batch_counts_out_of_range_are_refused(offset in any::<u64>(),
                                             count in prop_oneof![Just(0u32), (lottery::wire::protocol::MAX_BATCH_ROWS + 1)..]) {
        let error = parse_request(format!("BATCH {offset} {count}").as_bytes()).unwrap_err();
        prop_assert_eq!(error.code, ErrorCode::BadRequest);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: config().cases * 4, ..config() })]

    /// The fast path stores exactly what the reference path stored, and refuses exactly what
    /// it refused, with the same error: on valid rows, bent rows and arbitrary bytes.
    #[test]
    fn the_fast_path_stores_what_the_reference_stored(
        agency in prop_oneof![1u32..=5, any::<u32>()],
        line in prop_oneof![
            2 => valid_bet().prop_map(|bet| encode_bet(&bet)),
            4 => bent_row(),
            1 => row_like(),
            1 => proptest::collection::vec(any::<u8>(), 0..120),
        ],
    ) {
        let mut encoder = RowEncoder::new(today());
        let mut stored = b"junk before".to_vec();
        let result = encoder.push_stored(agency, &line, &mut stored).map(|()| stored[11..].to_vec());
        prop_assert_eq!(&result, &reference_stored(agency, &line), "line {:?}", line);
        let mut wire = Vec::new();
        let result = encoder.push_wire(&line, &mut wire).map(|()| wire);
        prop_assert_eq!(result, reference_wire(&line), "line {:?}", line);
    }
}

proptest! {
    // Each case parses several rows twice: fewer cases keep it as quick as the others.
    #![proptest_config(ProptestConfig { cases: config().cases / 4, ..config() })]

    /// One parser reused row after row gives what a fresh parser gives: no state leaks.
    #[test]
    fn a_reused_parser_forgets_the_previous_row(bets in proptest::collection::vec(valid_bet(), 1..4),
                                               junk in row_like()) {
        let mut reused = RowParser::default();
        for bet in &bets {
            let _ = reused.bet(&junk, today());
            let row = encode_bet(bet);
            prop_assert_eq!(reused.bet(&row, today()), RowParser::default().bet(&row, today()));
        }
    }
}
