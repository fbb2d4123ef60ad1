//! `lottery-round`: see [`lottery::local_round`].

fn main() -> std::process::ExitCode {
    lottery::local_round::main()
}
