//! SIGTERM: the server stops in order, tells the clients that wait for the draw, and exits 0.

mod common {
    pub mod client;
    pub mod client_eof;
    pub mod client_silence;
    pub mod process;
    pub mod server;
    pub mod server_temp;
}

use std::time::Duration;

use common::process::STEP;
use common::server::TestServer;

#[test]
fn sigterm_while_agencies_wait_for_the_draw() {
    let mut server = TestServer::start(3, &[]);
    let mut waiting: Vec<_> = (1..=2)
        .map(|id| {
            let mut client = server.client();
            assert_eq!(client.send(&format!("HELLO {id}")), "OK 0");
            assert_eq!(client.send(&format!("BET Ana,Paz,{id},1990-01-01,7574")), "OK 1");
            assert_eq!(client.send("DONE"), "OK");
            client.write(b"WINNERS\n").unwrap();
            client
        })
        .collect();
    // One more connection, idle between requests.
    let mut idle = server.client();
    assert_eq!(idle.send("STATUS"), "STATUS agencies_done=2/3 bets=2 drawn=false");
    for client in &mut waiting {
        client.expect_silence(Duration::from_millis(100));
    }

    // The clients still waiting for the draw do not hold the shutdown up: it exits 0 while
    // they are connected (a condition, not a time: the deadline is only the test's own).
    server.proc.signal(libc::SIGTERM);
    server.proc.wait_success(STEP);

    for client in &mut waiting {
        let reply = client.read_line();
        assert!(reply.starts_with("ERR SHUTDOWN "), "a waiting client read {reply:?}");
        // One request, one reply line: then the connection ends.
        client.expect_eof();
    }
    // The idle connection is closed too (it may be told why first).
    match idle.try_read_line() {
        Ok(None) => {}
        Ok(Some(line)) => {
            assert!(line.starts_with("ERR SHUTDOWN "), "{line:?}");
            idle.expect_eof();
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }

    let lines = server.proc.logs.until_eof().to_vec();
    assert!(
        lines.last().is_some_and(|l| l.ends_with("action: shutdown | result: success")),
        "last log line: {:?}",
        lines.last()
    );
    assert!(!lines.iter().any(|l| l.contains("action: sorteo")), "no draw without the third agency");
    // Everything acknowledged is in the file, whole.
    assert_eq!(
        std::fs::read_to_string(server.bets_path()).unwrap(),
        "1,Ana,Paz,1,1990-01-01,7574\n2,Ana,Paz,2,1990-01-01,7574\n"
    );
}

#[test]
fn sigterm_on_an_idle_server_exits_0_with_its_last_line() {
    let mut server = TestServer::start(1, &[]);
    server.proc.signal(libc::SIGTERM);
    server.proc.wait_success(STEP);
    let lines = server.proc.logs.until_eof();
    assert!(lines.last().is_some_and(|l| l.ends_with("action: shutdown | result: success")), "{lines:?}");
}
