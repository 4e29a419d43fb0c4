//! The `legate` command.

legate::install_allocator!();

fn main() -> std::process::ExitCode {
    legate::Legate::new().main()
}
