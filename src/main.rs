//! The stasis binary: parse, run, exit with the command's code (runc's codes).

fn main() {
    let code = stasis::cli::main(std::env::args_os().collect());
    std::process::exit(code);
}
