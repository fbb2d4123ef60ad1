//! `lottery-agency`: see [`lottery::app::agency_main`].

fn main() -> std::process::ExitCode {
    lottery::app::agency_main()
}
