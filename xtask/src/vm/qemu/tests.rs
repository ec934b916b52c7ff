use super::{Report, read_line, test_result};

#[test]
fn libtest_summaries_give_passed_and_failed_counts() {
    let ok = "test result: ok. 6 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 93.20s";
    assert_eq!(test_result(ok), Some((6, 0)));
    let failed = "test result: FAILED. 4 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
    assert_eq!(test_result(failed), Some((4, 2)));
    assert_eq!(test_result("running 6 tests"), None);
}

#[test]
fn the_exit_marker_sets_the_exit_code_and_other_lines_do_not() {
    let mut report = Report {
        exit_code: None,
        passed: 0,
        failed: 0,
    };
    read_line("test datapath::x ... ok", &mut report);
    assert_eq!(report.exit_code, None);
    read_line("nmi-vm: exit 101", &mut report);
    assert_eq!(report.exit_code, Some(101));
}
