//! `lottery-server`: see [`lottery::app::server_main`].

fn main() -> std::process::ExitCode {
    lottery::app::server_main()
}
