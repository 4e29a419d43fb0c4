//! The binaries' allocator: mimalloc 2.x. Pingora allocates and frees some seventy blocks
//! for each proxied request (header maps, buffers, boxed futures); mimalloc serves them with
//! about a seventh fewer instructions per request than glibc's malloc
//! (benches/load/instructions.py) and 0.90x CPU time per request side by side.
//!
//! Each binary installs it (`legate::install_allocator!()` in src/main.rs and the examples);
//! the library does not, so that tests can count allocations with an allocator of their own.

/// `mi_option_arena_eager_commit` in mimalloc 2.x's `mimalloc.h` (the `v2` feature pins the
/// bundled version); libmimalloc-sys does not name it.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Commits arena memory as it is used rather than up front: eager commit shows as ~10 MiB
/// more RSS, and what a config's parsing frees there is never purged. mimalloc reads the
/// option when it reserves its first arena, at the first allocation, which Rust's runtime
/// makes before `main`; so a binary runs this from its `.init_array`
/// ([`install_allocator!`](crate::install_allocator)).
pub extern "C" fn configure() {
    // SAFETY: sets an allocator option; runs before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) }
}

/// Gives the memory that loading and compiling a config used and freed back to the system
/// (about 4 MiB after parsing a bootstrap). With another global allocator (tests) mimalloc
/// holds nothing and this does nothing.
pub fn return_freed_memory() {
    // SAFETY: mi_collect only frees memory mimalloc holds unused.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

pub use mimalloc::MiMalloc;

/// Makes mimalloc, set up as above, the global allocator of the binary that invokes it at
/// its top level.
#[macro_export]
macro_rules! install_allocator {
    () => {
        #[global_allocator]
        static ALLOCATOR: $crate::allocator::MiMalloc = $crate::allocator::MiMalloc;

        // An ELF constructor: runs before Rust's runtime makes its first allocation.
        #[cfg(target_os = "linux")]
        #[used]
        #[unsafe(link_section = ".init_array")]
        static CONFIGURE_ALLOCATOR: extern "C" fn() = $crate::allocator::configure;
    };
}
