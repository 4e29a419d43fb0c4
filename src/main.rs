//! The `legate` command.

fn main() -> std::process::ExitCode {
    legate::Legate::new().main()
}
