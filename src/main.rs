//! The `legate` command.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// An ELF constructor: runs before Rust's runtime makes its first allocation.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static CONFIGURE_ALLOCATOR: extern "C" fn() = legate::allocator::configure;

fn main() -> std::process::ExitCode {
    legate::Legate::new().main()
}
