//! `lottery-round`: see [`lottery::tools::local_round`].

fn main() -> std::process::ExitCode {
    lottery::tools::local_round::main()
}
