//! `imds-emulator --listen IP:PORT --identity CLIENT_ID[=name]... [--system-identity CLIENT_ID[=name]]
//! [--token-lifetime-secs N]`: serves the Azure IMDS emulator (see `nmi_agent_e2e::imds_emulator`) until SIGINT or
//! SIGTERM. Prints `ready` on stdout once it listens (the address goes to stderr).

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use nmi_agent_e2e::imds_emulator::{EmulatedIdentity, Emulator, EmulatorConfig};
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "usage: imds-emulator --listen IP:PORT --identity CLIENT_ID[=name]... \
[--system-identity CLIENT_ID[=name]] [--token-lifetime-secs N]";

fn parse(args: impl Iterator<Item = String>) -> Result<EmulatorConfig, String> {
    let mut config = EmulatorConfig::new(Vec::new());
    let mut listen = None;
    let mut args = args.peekable();
    while let Some(flag) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                listen = Some(
                    v.parse::<SocketAddr>()
                        .map_err(|e| format!("--listen {v}: {e}"))?,
                );
            }
            "--identity" => config
                .identities
                .push(EmulatedIdentity::parse(&value("--identity")?)?),
            "--system-identity" => {
                config.system_identity =
                    Some(EmulatedIdentity::parse(&value("--system-identity")?)?)
            }
            "--token-lifetime-secs" => {
                let v = value("--token-lifetime-secs")?;
                let secs: u64 = v
                    .parse()
                    .map_err(|e| format!("--token-lifetime-secs {v}: {e}"))?;
                config.token_lifetime = Duration::from_secs(secs);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    config.listen = listen.ok_or("--listen is required")?;
    Ok(config)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let config = match parse(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("imds-emulator: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
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

    fn args(s: &str) -> impl Iterator<Item = String> {
        s.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn parses_the_command_line() {
        let c = parse(args(
            "--listen 10.0.0.1:8080 --identity a=one --identity b --token-lifetime-secs 60",
        ))
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
        let c = parse(args("--listen [::1]:0 --system-identity s")).expect("valid");
        assert_eq!(c.system_identity, Some(EmulatedIdentity::new("s", "s")));
        for bad in [
            "",
            "--identity a",
            "--listen nope",
            "--listen 1.2.3.4:5 --bogus",
            "--listen 1.2.3.4:5 --identity",
            "--listen 1.2.3.4:5 --token-lifetime-secs x",
        ] {
            assert!(parse(args(bad)).is_err(), "{bad}");
        }
    }
}
