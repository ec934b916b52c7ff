//! `nmi-agent`: parse the command line, then hand over to the library.

use clap::Parser;
use nmi_agent::{
    cli::{Cli, Command},
    datapath, run,
};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Uninstall(args) => datapath::uninstall(&args.pin_dir)
            .map(|done| {
                if !done.still_loaded.is_empty() {
                    eprintln!(
                        "nmi-agent: programs {:?} are unpinned but still loaded; the kernel detaches them shortly",
                        done.still_loaded
                    );
                }
                if !done.filters_removed.is_empty() {
                    println!(
                        "removed the forwarding guard from {}",
                        done.filters_removed.join(", ")
                    );
                }
                if done.removed {
                    println!("removed {}: interception is off", args.pin_dir.display());
                } else {
                    println!("nothing pinned at {}", args.pin_dir.display());
                }
            })
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nmi-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
