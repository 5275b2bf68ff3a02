use std::process::ExitCode;

fn main() -> ExitCode {
    // Panics and unexpected errors get readable reports; user errors don't panic.
    let _ = color_eyre::install();
    imaging::main_with_args(std::env::args_os().collect())
}
