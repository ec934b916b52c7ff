use clap::{CommandFactory, Parser};

use super::*;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("nmi-bench").chain(args.iter().copied()))
}

#[test]
fn the_command_line_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn the_measurement_sizes_default_to_the_documented_run() {
    let cli = parse(&[]).expect("no arguments");
    assert!(cli.command.is_none());
    let o = cli.opts;
    assert_eq!(
        (o.connects, o.rounds, o.threads, o.secs, o.hits, o.misses),
        (20_000, 5, 32, 5, 2_000, 500)
    );
    let o = parse(&["--connects", "200", "--rounds", "1", "--secs", "1"])
        .expect("sizes")
        .opts;
    assert_eq!((o.connects, o.rounds, o.secs), (200, 1, 1));
}

#[test]
fn a_size_of_zero_or_a_non_number_is_refused() {
    for args in [
        &["--rounds", "0"][..],
        &["--hits", "many"],
        &["--bogus", "1"],
    ] {
        assert!(parse(args).is_err(), "{args:?}");
    }
}

#[test]
fn the_workers_take_the_arguments_the_benchmark_gives_them() {
    for args in [
        &["worker", "connect", "10.213.0.1:8090", "5000"][..],
        &[
            "worker",
            "load",
            "169.254.169.254:80",
            "32",
            "5",
            "resource=x",
        ],
        &[
            "worker",
            "latency",
            "169.254.169.254:80",
            "1",
            "resource=x-{i}",
        ],
    ] {
        assert!(
            matches!(
                parse(args),
                Ok(Cli {
                    command: Some(Command::Worker { .. }),
                    ..
                })
            ),
            "{args:?}"
        );
    }
    assert!(parse(&["worker", "connect", "nope", "1"]).is_err());
}
