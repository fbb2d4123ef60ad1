//! What runs a round for people and tests rather than serving one: `lottery-round`, synthetic
//! data sets, and misbehaving clients.

pub(crate) mod attack_round;
pub mod attacks;
pub(crate) mod botnet;
pub(crate) mod crowd;
pub mod dataset;
pub mod hostile;
pub(crate) mod keys;
pub mod local_round;
pub(crate) mod local_server;
pub(crate) mod progress;
pub(crate) mod report;
pub(crate) mod round_options;
