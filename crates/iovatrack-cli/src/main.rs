//! `iovatrack`: plan the IOVA ranges a passthrough device must log for a VM's memory map,
//! and live-migrate a KVM guest with an emulated DMA device writing all the while.
//!
//! Arguments in, rendering out: every decision is the library's.

mod migrate_cmd;
mod output;
mod plan_cmd;
mod svg;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "iovatrack",
    version,
    about = "IOVA range planning and live migration for VMs with passthrough devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the IOVA ranges a device must log for a VM memory map.
    Plan(plan_cmd::PlanArgs),
    /// Live-migrate a KVM guest with an emulated DMA device writing all the while, and
    /// prove the destination's memory equals the source's.
    Migrate(Box<migrate_cmd::MigrateArgs>),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Plan(a) => plan_cmd::run(a),
        Command::Migrate(a) => migrate_cmd::run(*a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            let mut said = e.to_string();
            eprintln!("iovatrack: error: {said}");
            // Causes a message already spells out are not repeated.
            let mut src = std::error::Error::source(e.as_ref());
            while let Some(s) = src {
                let text = s.to_string();
                if !said.contains(&text) {
                    eprintln!("  caused by: {text}");
                    said.push_str(&text);
                }
                src = s.source();
            }
            // Hints for any error in the chain, in this CLI's terms.
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
            while let Some(err) = cur {
                if let Some(h) = migrate_cmd::hint(err).or_else(|| plan_cmd::hint(err)) {
                    eprintln!("  hint: {h}");
                    break;
                }
                cur = err.source();
            }
            ExitCode::from(2)
        }
    }
}
