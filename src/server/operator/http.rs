//! The little HTTP the operator's listener speaks: one `GET` (or `HEAD`) per connection, its
//! head read whole within [`MAX_HEAD`] bytes and a deadline, answered, closed. Anything else gets
//! the status that says why (400, 404, 405, 408, 431, 503) and is closed. Parsing only: the
//! caller reads and writes the socket.

/// Most bytes of a request's head (request line and headers), as nginx's default buffers.
pub(super) const MAX_HEAD: usize = 8192;

/// What a request's head asks for.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Request<'a> {
    /// `HEAD`: the same answer without its body.
    pub head_only: bool,
    /// The path, without its query.
    pub path: &'a str,
}

/// How far the head of a request has arrived in `data`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Head<'a> {
    /// Not whole yet: read more.
    Partial,
    Complete(Result<Request<'a>, Status>),
}

/// An answer's status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    Timeout,
    TooLarge,
    Unavailable,
}

impl Status {
    pub(super) fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::Timeout => "408 Request Timeout",
            Status::TooLarge => "431 Request Header Fields Too Large",
            Status::Unavailable => "503 Service Unavailable",
        }
    }
}

/// Looks at what has arrived of a request: its head is whole once an empty line ends it.
pub(super) fn parse(data: &[u8]) -> Head<'_> {
    let end = memchr::memmem::find(data, b"\r\n\r\n").or_else(|| memchr::memmem::find(data, b"\n\n"));
    let Some(end) = end else {
        return if data.len() >= MAX_HEAD { Head::Complete(Err(Status::TooLarge)) } else { Head::Partial };
    };
    if end > MAX_HEAD {
        return Head::Complete(Err(Status::TooLarge));
    }
    let line = data[..end].split(|&b| b == b'\n').next().unwrap_or_default();
    Head::Complete(request_line(line.strip_suffix(b"\r").unwrap_or(line)))
}

fn request_line(line: &[u8]) -> Result<Request<'_>, Status> {
    let line = std::str::from_utf8(line).map_err(|_| Status::BadRequest)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Status::BadRequest);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(Status::BadRequest);
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    match method {
        "GET" => Ok(Request { head_only: false, path }),
        "HEAD" => Ok(Request { head_only: true, path }),
        _ => Err(Status::MethodNotAllowed),
    }
}

/// An answer, whole: status line, headers, body (left out for `HEAD`).
pub(super) fn response(status: Status, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        status.line(),
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// An error answer: its status line as a plain-text body.
pub(super) fn error(status: Status) -> Vec<u8> {
    response(status, "text/plain; charset=utf-8", format!("{}\n", status.line()).as_bytes(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_is_read_once_its_head_is_whole() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), Head::Partial);
        let head = parse(b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(head, Head::Complete(Ok(Request { head_only: false, path: "/metrics" })));
        assert_eq!(parse(b"HEAD / HTTP/1.0\n\n"), Head::Complete(Ok(Request { head_only: true, path: "/" })));
    }

    #[test]
    fn a_bad_head_gets_the_status_that_says_why() {
        assert_eq!(parse(b"POST / HTTP/1.1\r\n\r\n"), Head::Complete(Err(Status::MethodNotAllowed)));
        assert_eq!(parse(b"GET /\r\n\r\n"), Head::Complete(Err(Status::BadRequest)));
        assert_eq!(parse(b"GET http://x/ HTTP/1.1\r\n\r\n"), Head::Complete(Err(Status::BadRequest)));
        assert_eq!(parse(b"\xff / HTTP/1.1\r\n\r\n"), Head::Complete(Err(Status::BadRequest)));
        assert_eq!(parse(&[b'a'; MAX_HEAD]), Head::Complete(Err(Status::TooLarge)));
    }

    #[test]
    fn a_head_request_has_no_body() {
        let answer = response(Status::Ok, "text/plain", b"hello", true);
        assert!(answer.ends_with(b"Content-Length: 5\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n"));
    }
}
