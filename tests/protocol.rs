//! The wire protocol, spoken over a raw socket as `nc` would, against the real server.

mod common {
    pub mod client;
    pub mod client_eof;
    pub mod client_silence;
    pub mod keys;
    pub mod process;
    pub mod run;
    pub mod server;
    pub mod server_keys;
    pub mod server_temp;
    pub mod tls;
}

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::keys::{Keys, env_refs};
use common::process::STEP;
use common::server::TestServer;
use common::tls::TlsClient;

/// The `nc` session of docs/protocol.md, line by line: `> ` is what the person types, `< ` what
/// the server answers; that page shows exactly these lines. Run against a server for one agency
/// (`SERVER_AGENCIES=1`), so that its `DONE` makes the draw.
const NC_SESSION: &str = "\
> PING
< PONG
> STATUS
< STATUS agencies_done=0/1 bets=0 drawn=false
> HELLO 1
< OK 0
> BET Santiago Lionel,Lorca,30904465,1999-03-17,7574
< OK 1
> BATCH 1 2
> María José,Peña,00000042,1985-07-01,7574
> \"Tiago Nicolás\",Gómez,27555111,2001-12-24,1234
< OK 3
> BET Ana,Paz,123,2000-02-30,5
< ERR BAD_BET birthdate \"2000-02-30\" is not a calendar date YYYY-MM-DD
> WINNERS 7
< ERR BAD_REQUEST WINNERS takes no arguments
> DONE
< OK
> STATUS
< STATUS agencies_done=1/1 bets=3 drawn=true
> WINNERS
< WINNERS 2 30904465,00000042
> BET Luis,Sol,77,1990-01-01,7574
< ERR CLOSED the draw has been made
> QUIT
< BYE
";

#[test]
fn the_documented_nc_session_word_for_word() {
    let mut server = TestServer::start(1, &[]);
    let mut client = server.client();
    for (n, line) in NC_SESSION.lines().enumerate() {
        if let Some(request) = line.strip_prefix("> ") {
            client.write(format!("{request}\n").as_bytes()).unwrap();
        } else if let Some(reply) = line.strip_prefix("< ") {
            assert_eq!(client.read_line(), reply, "session line {}", n + 1);
        } else {
            panic!("session line {} is neither `> ` nor `< `: {line:?}", n + 1);
        }
    }
    // After BYE the server closes.
    client.expect_eof();
    server.proc.logs.wait_for("action: sorteo | result: success");
    let stored = fs::read_to_string(server.bets_path()).unwrap();
    assert_eq!(
        stored,
        "1,Santiago Lionel,Lorca,30904465,1999-03-17,7574\n\
         1,María José,Peña,00000042,1985-07-01,7574\n\
         1,Tiago Nicolás,Gómez,27555111,2001-12-24,1234\n"
    );
}

#[test]
fn the_documented_session_is_the_tested_one() {
    // docs/protocol.md's "A session with nc" shows, character for character, the conversation
    // that the test above replays: a change to either must be made to both.
    let page = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/protocol.md")).unwrap();
    assert!(page.contains(NC_SESSION), "docs/protocol.md does not show the nc session this file replays");
}

#[test]
fn a_batch_with_one_bad_row_stores_nothing_and_says_which_row() {
    let mut server = TestServer::start(2, &[]);
    let mut client = server.client();
    assert_eq!(client.send("HELLO 1"), "OK 0");
    assert_eq!(client.send("BET Ana,Paz,11,1990-01-01,7574"), "OK 1");
    let before = fs::read(server.bets_path()).unwrap();

    client
        .write(b"BATCH 1 3\nLuis,Sol,22,1980-02-02,1\nEva,Mar,33,1970-03-03,10000\nIvo,Luz,44,1960-04-04,2\n")
        .unwrap();
    let reply = client.read_line();
    assert!(reply.starts_with("ERR BAD_BET row 2: "), "{reply:?}");
    assert!(reply.contains("number \"10000\""), "the reply says why: {reply:?}");
    assert_eq!(fs::read(server.bets_path()).unwrap(), before, "bets.csv changed after a refused batch");
    server.proc.logs.wait_for("action: apuesta_recibida | result: fail | cantidad: 3");

    // The connection is still in step: the same batch, corrected, is stored whole.
    assert_eq!(client.send("PING"), "PONG");
    assert_eq!(client.send("STATUS"), "STATUS agencies_done=0/2 bets=1 drawn=false");
    client
        .write(b"BATCH 1 3\nLuis,Sol,22,1980-02-02,1\nEva,Mar,33,1970-03-03,1000\nIvo,Luz,44,1960-04-04,2\n")
        .unwrap();
    assert_eq!(client.read_line(), "OK 4");
    let after = fs::read_to_string(server.bets_path()).unwrap();
    assert_eq!(
        after,
        "1,Ana,Paz,11,1990-01-01,7574\n1,Luis,Sol,22,1980-02-02,1\n1,Eva,Mar,33,1970-03-03,1000\n1,Ivo,Luz,44,1960-04-04,2\n"
    );
}

#[test]
fn a_retried_batch_is_acknowledged_not_stored_twice() {
    let server = TestServer::start(1, &[]);
    let mut client = server.client();
    assert_eq!(client.send("HELLO 1"), "OK 0");
    let batch = b"BATCH 0 2\nLuis,Sol,22,1980-02-02,1\nEva,Mar,33,1970-03-03,2\n";
    client.write(batch).unwrap();
    assert_eq!(client.read_line(), "OK 2");
    // The reply was "lost": the agency reconnects and sends the same batch again.
    let mut again = server.client();
    assert_eq!(again.send("HELLO 1"), "OK 2");
    again.write(batch).unwrap();
    assert_eq!(again.read_line(), "OK 2");
    again.write(b"BATCH 5 1\nIvo,Luz,44,1960-04-04,2\n").unwrap();
    assert!(again.read_line().starts_with("ERR BAD_REQUEST "), "an offset past what is held");
    assert_eq!(fs::read_to_string(server.bets_path()).unwrap().lines().count(), 2);
}

#[test]
fn done_twice_counts_once() {
    let server = TestServer::start(3, &[]);
    let mut client = server.client();
    assert_eq!(client.send("HELLO 1"), "OK 0");
    assert_eq!(client.send("DONE"), "OK");
    assert_eq!(client.send("DONE"), "OK");
    assert_eq!(client.send("STATUS"), "STATUS agencies_done=1/3 bets=0 drawn=false");
    // And from another connection of the same agency.
    let mut other = server.client();
    assert_eq!(other.send("HELLO 1"), "OK 0");
    assert_eq!(other.send("DONE"), "OK");
    assert_eq!(other.send("STATUS"), "STATUS agencies_done=1/3 bets=0 drawn=false");
}

#[test]
fn an_agency_never_sees_another_agencys_winners() {
    let mut server = TestServer::start(2, &[]);
    let mut one = server.client();
    let mut two = server.client();
    assert_eq!(one.send("HELLO 1"), "OK 0");
    assert_eq!(two.send("HELLO 2"), "OK 0");
    one.write(b"BATCH 0 3\nAna,Paz,111,1990-01-01,7574\nLuis,Sol,112,1980-02-02,7573\nEva,Mar,113,1970-03-03,7574\n")
        .unwrap();
    assert_eq!(one.read_line(), "OK 3");
    two.write(b"BATCH 0 3\nIvo,Luz,221,1960-04-04,7574\nEma,Sal,222,1950-05-05,1\nTeo,Paz,00000223,1940-06-06,7574\n")
        .unwrap();
    assert_eq!(two.read_line(), "OK 3");
    assert_eq!(one.send("DONE"), "OK");
    assert_eq!(two.send("DONE"), "OK");
    assert_eq!(one.send("WINNERS"), "WINNERS 2 111,113");
    assert_eq!(two.send("WINNERS"), "WINNERS 2 221,00000223");
    // A connection that has not said HELLO gets nobody's winners.
    let mut stranger = server.client();
    assert!(stranger.send("WINNERS").starts_with("ERR NO_AGENCY "));
    server.proc.logs.wait_for("action: sorteo | result: success");
}

#[test]
fn winners_before_the_draw_waits_for_it_on_every_connection() {
    let mut server = TestServer::start(4, &[]);
    let mut waiting: Vec<_> = (1..=3)
        .map(|id| {
            let mut client = server.client();
            assert_eq!(client.send(&format!("HELLO {id}")), "OK 0");
            assert_eq!(client.send(&format!("BET Ana,Paz,{id}0{id},1990-01-01,7574")), "OK 1");
            assert_eq!(client.send("DONE"), "OK");
            client.write(b"WINNERS\n").unwrap();
            client
        })
        .collect();
    let mut last = server.client();
    assert_eq!(last.send("STATUS"), "STATUS agencies_done=3/4 bets=3 drawn=false");
    // Blocked: the server holds their queries, with no partial answer and without closing.
    for client in &mut waiting {
        client.expect_silence(Duration::from_millis(150));
    }
    assert_eq!(last.send("HELLO 4"), "OK 0");
    assert_eq!(last.send("DONE"), "OK");
    for (id, client) in (1..=3).zip(&mut waiting) {
        assert_eq!(client.read_line(), format!("WINNERS 1 {id}0{id}"));
        // And the connection goes on.
        assert_eq!(client.send("PING"), "PONG");
    }
    assert_eq!(last.send("WINNERS"), "WINNERS 0");
    server.proc.logs.wait_for("action: sorteo | result: success");
}

/// A `HELLO` whose token is not after exactly one space (a tab, two spaces, nothing, trailing
/// junk, the token on a line of its own) is refused, over TLS, and neither the reply nor the
/// server's log shows eight characters of the token.
#[test]
fn no_reply_or_log_line_quotes_a_token_whatever_surrounds_it() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::make(dir.path(), 2);
    let mut server = TestServer::start(2, &env_refs(&keys.server_env()));
    let token = keys.token(1);
    let forms = [
        format!("HELLO\t1\t{token}"),
        format!("HELLO 1\t{token}"),
        format!("HELLO  1 {token}"),
        format!("HELLO 1  {token}"),
        format!("HELLO 1{token}"),
        format!("HELLO1 {token}"),
        format!("HELLO {token}"),
        format!("HELLO 1 {token} junk"),
        format!("HELLO 1 {token}\x00"),
        format!("HELLO x {token}"),
        format!("hello:1:{token}"),
        token.clone(),
        format!("{token} HELLO 1"),
        format!("BET {token}"),
    ];
    let mut tls = TlsClient::connect(server.port, &keys.path("ca.pem"));
    let mut replies = Vec::new();
    for form in &forms {
        let reply = tls.send(form);
        assert!(reply.starts_with("ERR "), "a malformed HELLO was answered {reply}");
        replies.push(reply);
    }
    server.proc.signal(libc::SIGTERM);
    server.proc.wait_success(STEP);
    let said = format!("{}\n{}", replies.join("\n"), server.proc.logs.until_eof().join("\n"));
    for part in token.as_bytes().windows(8) {
        assert!(!said.contains(std::str::from_utf8(part).unwrap()), "a reply or log line quotes part of the token");
    }
}
