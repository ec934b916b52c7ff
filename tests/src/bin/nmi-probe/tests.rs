use clap::{CommandFactory, Parser};

use nmi_agent_e2e::probe::RETRY_LOOP;

use super::*;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("nmi-probe").chain(args.iter().copied()))
}

#[test]
fn the_command_line_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn every_mode_takes_the_options_the_end_to_end_tests_give_it() {
    for args in [
        &["http"][..],
        &["http", "--count", "500", "--concurrency", "64"],
        &RETRY_LOOP,
        &["http", "--addr", "10.213.0.1:2579", "--duration-ms", "100"],
        &["connect", "--addr", "169.254.169.254:443"],
        &["bind", "--addr", "[::]:2579"],
        &["udp", "--connect"],
        &["udp", "--addr", "[::ffff:169.254.169.254]:80"],
        &["v6mapped", "--port", "80", "--timeout-ms", "100"],
        &["raw", "--hdrincl"],
        &["whoami"],
    ] {
        assert!(parse(args).is_ok(), "{args:?}: {:?}", parse(args).err());
    }
}

#[test]
fn attempts_aim_at_imds_port_80_unless_told_otherwise() {
    let Ok(Cli {
        mode: Mode::Connect { to, timeout },
    }) = parse(&["connect"])
    else {
        panic!("connect parses");
    };
    assert_eq!(to.addr, IMDS.parse().expect("constant"));
    assert_eq!(timeout.get(), Duration::from_secs(5));
}

#[test]
fn a_mode_refuses_options_it_has_no_use_for() {
    for args in [
        &[][..],
        &["nope"],
        &["whoami", "--addr", "1.2.3.4:5"],
        &["http", "--concurrency", "0"],
        &["connect", "--addr", "nope"],
    ] {
        assert!(parse(args).is_err(), "{args:?}");
    }
}
