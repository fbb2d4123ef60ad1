//! A client's check that the server hung up.

use std::io::{self, Read};

use super::client::Client;

impl Client {
    /// Asserts that the server closes the connection next, with nothing more to say.
    pub fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "more after the last reply: {:?}", String::from_utf8_lossy(&rest)),
            // A reset after the server closed is an end too.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected the connection to close: {e}"),
        }
    }
}
