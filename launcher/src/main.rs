//! `warden`: see `warden --help`.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(warden::cli::main())
}
