//! The `pumice` command line: parse, set up the process, dispatch to one command in `cli/`,
//! map the outcome to the documented exit code. The only place (with `cli/`) that uses anyhow:
//! library errors arrive as `pumice::Error` and are printed as one line.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    cli::setup::quiet_headless_wsi();
    let args = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    cli::setup::init_logging(args.verbose);
    cli::setup::install_stop_handler();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::setup::report_failure(&e),
    }
}
