//! The stasis binary: parse, run, exit with the command's code (runc's codes).

fn main() {
    // Die quietly on a closed stdout pipe (`stasis list | head`), like C tools do,
    // instead of reporting "Broken pipe" as an error.
    // SAFETY: setting a signal disposition to its default before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let code = stasis::cli::main(std::env::args_os().collect());
    std::process::exit(code);
}
