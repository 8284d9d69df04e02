use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = baker::cli::Cli::parse();
    match baker::cli::execute(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baker: {e}");
            ExitCode::FAILURE
        }
    }
}
