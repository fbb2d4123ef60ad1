//! Where a round lives: the bets file, the small file that remembers `DONE`s and the draw, and
//! the shared state behind the Mutex with its "winners ready" and group-commit Condvars.

pub mod free_space;
pub mod lock;
pub mod round;
pub mod round_file;
pub mod store;
