//! What runs a round for people and tests rather than serving one: `lottery-round`, synthetic
//! data sets, and misbehaving clients.

pub mod attack_round;
pub mod attacks;
pub mod botnet;
pub mod crowd;
pub mod dataset;
pub mod hostile;
pub mod keys;
pub mod local_round;
pub mod progress;
pub mod report;
