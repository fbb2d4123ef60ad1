//! The `WINNERS` reply a round must give.

/// The reply to `WINNERS` for these documents.
pub fn winners_reply(documents: &[String]) -> String {
    match documents {
        [] => "WINNERS 0".to_owned(),
        docs => format!("WINNERS {} {}", docs.len(), docs.join(",")),
    }
}
