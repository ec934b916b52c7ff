//! `nmi-agent`: parse the command line, then hand over to the library.

use clap::Parser;
use nmi_agent::{
    boot,
    cli::{Cli, Command},
    datapath, run,
};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Guard(args) => boot::guard(&args),
        Command::InstallGuard(args) => boot::install_guard(&args),
        Command::Uninstall(args) => uninstall_guard(&args.host_root)
            .and_then(|()| datapath::uninstall(&args.pin_dir).map_err(anyhow::Error::from))
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
            }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nmi-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The boot guard's unit goes first: a reboot in between must not attach the programs again.
fn uninstall_guard(host_root: &std::path::Path) -> anyhow::Result<()> {
    let removed = boot::remove(host_root)?;
    for path in &removed {
        println!("removed {}", path.display());
    }
    if !removed.is_empty() {
        println!(
            "the boot guard is gone from the next boot on (`systemctl daemon-reload` forgets it now)"
        );
    }
    Ok(())
}
