//! The `sidemesh` command: one binary for every part of the mesh.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sidemesh",
    version,
    about = "A service mesh modelled on Rainbond's plugin system"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a sidecar config (JSON, as discover serves it) and print what is wrong.
    Check(CheckArgs),
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The config file to check.
    file: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => check(&args),
    }
}

fn check(args: &CheckArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?;
    match sidemesh_api::Snapshot::from_json(&bytes) {
        Ok(s) => {
            println!("{}: valid (version {})", args.file.display(), s.version());
            Ok(())
        }
        Err(sidemesh_api::ConfigError::Invalid(errors)) => {
            for e in &errors.0 {
                eprintln!("{}: {e}", args.file.display());
            }
            anyhow::bail!("{} problem(s) in {}", errors.0.len(), args.file.display())
        }
        Err(e) => anyhow::bail!("{}: {e}", args.file.display()),
    }
}
