//! The probes a guest may make in plain text (`PING`, `STATUS`, `QUIT`), answered by the door
//! from what has arrived, with no thread: strangers that probe as fast as they can (`flood`),
//! keep a connection alive with a probe now and then (`refresh`), pipeline probes without
//! reading the replies (`noread`) or trickle a line a byte at a time (`trickle`) cost the
//! server a few system calls each, never a thread. What is no probe (a `HELLO`, a TLS hello)
//! goes to a thread of its own, with the probes before it answered and counted.
//!
//! Parsing only: the door peeks at the socket, hands the bytes here, and takes back how many
//! to consume, what to send, and what comes next.

use crate::wire::protocol::{ErrorCode, ProtocolError, Reply, Request, Status, parse_request};

/// Requests a guest may make before `HELLO`; past them, `ERR BUSY` and the connection closed.
pub(crate) const MAX_GUEST_REQUESTS: u32 = 16;

/// The answer to a guest's request past [`MAX_GUEST_REQUESTS`].
pub(crate) fn too_many() -> ProtocolError {
    ProtocolError::new(ErrorCode::Busy, format!("at most {MAX_GUEST_REQUESTS} requests before HELLO; closing"))
}

/// What to do once the probes that have arrived are answered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Then {
    /// Wait for more: nothing, or only part of a line, is left.
    Wait,
    /// A line that is no probe (or a line too long to be one) is next: a thread takes it from there.
    HandOff,
    /// `QUIT`, or past [`MAX_GUEST_REQUESTS`]: close once the replies are sent.
    Close,
}

/// The answers to the probes at the front of `data`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Answered {
    /// How many bytes of `data` the probes took: to be consumed, and no more.
    pub consumed: usize,
    /// The replies, encoded, in order.
    pub replies: Vec<u8>,
    /// How many probes were answered.
    pub probes: u32,
    pub then: Then,
}

/// Longest probe line the door looks for: anything longer is no probe, and a thread deals with it.
pub(crate) const MAX_PROBE_LINE: usize = 64;

/// Answers the complete probe lines at the front of `data` (what has arrived, unread), for a
/// guest that had made `made` requests; `status` gives the figures of a `STATUS`.
pub(crate) fn answer(data: &[u8], made: u32, status: impl Fn() -> Result<Status, ProtocolError>) -> Answered {
    let mut answered = Answered { consumed: 0, replies: Vec::new(), probes: 0, then: Then::Wait };
    loop {
        let rest = &data[answered.consumed..];
        let Some(end) = rest.iter().take(MAX_PROBE_LINE + 2).position(|&b| b == b'\n') else {
            if rest.len() > MAX_PROBE_LINE + 1 {
                answered.then = Then::HandOff;
            }
            return answered;
        };
        let line = &rest[..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let reply = match parse_request(line) {
            Ok(Request::Ping) => Reply::Pong,
            Ok(Request::Status) => status().map_or_else(Reply::Err, Reply::Status),
            Ok(Request::Quit) => Reply::Bye,
            _ => {
                answered.then = Then::HandOff;
                return answered;
            }
        };
        answered.consumed += end + 1;
        if made + answered.probes >= MAX_GUEST_REQUESTS {
            Reply::Err(too_many()).encode(&mut answered.replies);
            answered.then = Then::Close;
            return answered;
        }
        answered.probes += 1;
        reply.encode(&mut answered.replies);
        if reply == Reply::Bye {
            answered.then = Then::Close;
            return answered;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Result<Status, ProtocolError> {
        Ok(Status { agencies_done: 1, agencies: 5, bets: 7, drawn: false })
    }

    #[test]
    fn probes_at_the_front_are_answered_and_the_rest_is_left() {
        let a = answer(b"PING\r\nstatus\nHELLO 1 abc\nPING\n", 0, status);
        assert_eq!(a.consumed, 13);
        assert_eq!(a.replies, b"PONG\nSTATUS agencies_done=1/5 bets=7 drawn=false\n");
        assert_eq!((a.probes, a.then), (2, Then::HandOff));
    }

    #[test]
    fn part_of_a_line_waits_and_a_long_one_goes_to_a_thread() {
        let a = answer(b"PING\nSTA", 0, status);
        assert_eq!((a.consumed, a.probes, a.then), (5, 1, Then::Wait));
        let a = answer(&[b'S'; MAX_PROBE_LINE + 2], 0, status);
        assert_eq!((a.consumed, a.then), (0, Then::HandOff));
        assert_eq!(answer(b"", 0, status).then, Then::Wait);
        // A TLS hello, or anything else that is not a probe line.
        assert_eq!(answer(&[0x16, 3, 1, 0, b'\n'], 0, status).then, Then::HandOff);
        assert_eq!(answer(b"PING extra\n", 0, status).then, Then::HandOff);
    }

    #[test]
    fn quit_and_the_request_limit_close() {
        let a = answer(b"PING\nQUIT\nPING\n", 0, status);
        assert_eq!((a.consumed, a.replies.as_slice(), a.then), (10, &b"PONG\nBYE\n"[..], Then::Close));
        let a = answer(b"PING\nPING\nPING\n", MAX_GUEST_REQUESTS - 1, status);
        assert_eq!(a.probes, 1);
        assert_eq!(a.then, Then::Close);
        assert!(a.replies.starts_with(b"PONG\nERR BUSY at most 16 requests before HELLO"), "{:?}", a.replies);
    }
}
