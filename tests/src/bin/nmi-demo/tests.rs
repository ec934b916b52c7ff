use std::path::Path;

use crate::client::Outcome;
use crate::setup::identities;

#[test]
fn the_checked_in_bindings_name_the_orders_and_billing_identities() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/bindings.yaml");
    let ids = identities(&path).expect("bindings");
    let names: Vec<&str> = ids.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["orders", "billing"]);
    assert!(ids.iter().all(|(_, id)| id.len() == 36), "{ids:?}");
}

#[test]
fn outcomes_read_compactly() {
    assert_eq!(
        Outcome::Value("orders-Pa55w0rd".into()).describe(),
        "read \"orders-P…\""
    );
    assert_eq!(
        Outcome::Refused(403, "Forbidden".into()).describe(),
        "refused 403 Forbidden"
    );
}

#[test]
fn the_command_line_takes_only_hold() {
    use clap::{CommandFactory, Parser};

    use crate::Cli;

    Cli::command().debug_assert();
    let parse = |args: &[&str]| {
        Cli::try_parse_from(std::iter::once("nmi-demo").chain(args.iter().copied()))
    };
    assert!(!parse(&[]).expect("no arguments").hold);
    assert!(parse(&["--hold"]).expect("--hold").hold);
    assert!(parse(&["--bogus"]).is_err());
}
