//! A client's check that the server keeps it waiting.

use std::io::{self, BufRead};
use std::time::Duration;

use super::client::Client;
use super::process::STEP;

impl Client {
    /// Asserts that nothing arrives (and the connection stays open) for `wait`.
    pub fn expect_silence(&mut self, wait: Duration) {
        self.stream.set_read_timeout(Some(wait)).expect("read timeout");
        let result = self.reader.fill_buf().map(<[u8]>::to_vec);
        self.stream.set_read_timeout(Some(STEP)).expect("read timeout");
        match result {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("the connection broke while it should wait: {e}"),
            Ok(bytes) if bytes.is_empty() => panic!("the server closed the connection while it should wait"),
            Ok(bytes) => panic!("a reply while it should wait: {:?}", String::from_utf8_lossy(&bytes)),
        }
    }
}
