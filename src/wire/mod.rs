//! What crosses the network, independent of either side: a bet and its CSV rows, the
//! requests and replies as bytes, and a socket with its read buffer and deadlines.

pub mod bet;
pub mod connection;
pub mod plain;
pub mod protocol;
pub mod row;
pub mod token;
pub mod transport;
