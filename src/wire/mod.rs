//! What crosses the network, independent of either side: a bet and its CSV rows, the
//! requests and replies as bytes, and a socket with its read buffer and deadlines.

pub mod bet;
pub(crate) mod connection;
pub(crate) mod plain;
pub mod protocol;
pub mod row;
pub(crate) mod token;
pub(crate) mod transport;
