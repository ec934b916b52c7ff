//! `imds-emulator --listen IP:PORT --identity CLIENT_ID[=name]... [--system-identity CLIENT_ID[=name]]
//! [--token-lifetime-secs N]`: serves the Azure IMDS emulator (see `nmi_testkit::imds_emulator`) until SIGINT or
//! SIGTERM. Prints `ready` on stdout once it listens (the address goes to stderr).

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::Parser;
use nmi_testkit::imds_emulator::{EmulatedIdentity, Emulator, EmulatorConfig};
use tokio::signal::unix::{SignalKind, signal};

/// Serves an Azure IMDS emulator until SIGINT or SIGTERM; prints `ready` once it listens.
#[derive(Debug, Parser)]
#[command(name = "imds-emulator")]
struct Cli {
    /// Where to listen (port 0 picks one).
    #[arg(long, value_name = "IP:PORT")]
    listen: SocketAddr,
    /// A user-assigned identity of the emulated VM; the name defaults to the client id. Repeatable.
    #[arg(long = "identity", value_name = "CLIENT_ID[=name]", value_parser = EmulatedIdentity::parse)]
    identities: Vec<EmulatedIdentity>,
    /// The system-assigned identity, served when a request names none.
    #[arg(long, value_name = "CLIENT_ID[=name]", value_parser = EmulatedIdentity::parse)]
    system_identity: Option<EmulatedIdentity>,
    /// `expires_in` of issued tokens.
    #[arg(long, value_name = "N", default_value_t = 86_400)]
    token_lifetime_secs: u64,
}

impl Cli {
    fn config(self) -> EmulatorConfig {
        EmulatorConfig {
            listen: self.listen,
            system_identity: self.system_identity,
            token_lifetime: Duration::from_secs(self.token_lifetime_secs),
            ..EmulatorConfig::new(self.identities)
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let config = Cli::parse().config();
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("imds-emulator: installing signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let identities = config.identities.len();
    let emulator = match Emulator::start(config).await {
        Ok(emulator) => emulator,
        Err(e) => {
            eprintln!("imds-emulator: listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "imds-emulator: listening on {} with {identities} identities",
        emulator.url()
    );
    println!("ready");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    drop(emulator);
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<EmulatorConfig, clap::Error> {
        Cli::try_parse_from(std::iter::once("imds-emulator").chain(s.split_whitespace()))
            .map(Cli::config)
    }

    #[test]
    fn the_command_line_names_address_identities_and_token_lifetime() {
        let c =
            parse("--listen 10.0.0.1:8080 --identity a=one --identity b --token-lifetime-secs 60")
                .expect("valid");
        assert_eq!(
            c.listen,
            "10.0.0.1:8080".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(
            c.identities,
            [
                EmulatedIdentity::new("a", "one"),
                EmulatedIdentity::new("b", "b")
            ]
        );
        assert_eq!(c.token_lifetime, Duration::from_secs(60));
        assert_eq!(c.system_identity, None);
        let c = parse("--listen [::1]:0 --system-identity s").expect("valid");
        assert_eq!(c.system_identity, Some(EmulatedIdentity::new("s", "s")));
    }

    #[test]
    fn a_command_line_without_an_address_or_with_a_bad_value_is_refused() {
        for bad in [
            "",
            "--identity a",
            "--listen nope",
            "--listen 1.2.3.4:5 --bogus",
            "--listen 1.2.3.4:5 --identity",
            "--listen 1.2.3.4:5 --identity =x",
            "--listen 1.2.3.4:5 --token-lifetime-secs x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
