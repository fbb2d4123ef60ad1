//! A plain-text client speaking the protocol line by line, as `nc` does.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};

use super::process::STEP;
use super::server::TestServer;

/// A line-oriented client, like `nc`, with read and write timeouts on its socket.
pub struct Client {
    pub stream: TcpStream,
    pub reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let stream = TcpStream::connect_timeout(&addr, STEP).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(STEP)).expect("read timeout");
        stream.set_write_timeout(Some(STEP)).expect("write timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone socket"));
        Client { stream, reader }
    }

    /// Writes `bytes` as they are.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends one request line and returns the reply line (without its `\n`).
    pub fn send(&mut self, line: &str) -> String {
        self.write(format!("{line}\n").as_bytes()).unwrap_or_else(|e| panic!("send {line:?}: {e}"));
        self.read_line()
    }

    /// The next reply line; panics on end of stream or timeout.
    pub fn read_line(&mut self) -> String {
        match self.try_read_line() {
            Ok(Some(line)) => line,
            Ok(None) => panic!("the server closed the connection instead of replying"),
            Err(e) => panic!("no reply: {e}"),
        }
    }

    /// The next line, or `None` at end of stream.
    pub fn try_read_line(&mut self) -> io::Result<Option<String>> {
        let mut line = String::new();
        match self.reader.read_line(&mut line)? {
            0 => Ok(None),
            _ => {
                assert!(line.ends_with('\n'), "a reply without its line end: {line:?}");
                Ok(Some(line.trim_end_matches(['\n', '\r']).to_owned()))
            }
        }
    }
}

impl TestServer {
    /// A new client connection.
    pub fn client(&self) -> Client {
        Client::connect(self.port)
    }
}
