use std::path::PathBuf;

use super::test_executable;

#[test]
fn the_test_executable_comes_from_the_matching_compiler_artifact() {
    let messages = concat!(
        r#"{"reason":"compiler-artifact","target":{"name":"nmi_agent_e2e","kind":["lib"]},"executable":null}"#,
        "\n",
        r#"{"reason":"compiler-artifact","target":{"name":"datapath","kind":["test"]},"executable":"/t/release/deps/datapath-1f2e"}"#,
        "\n",
        r#"{"reason":"build-finished","success":true}"#,
    );
    assert_eq!(
        test_executable(messages, "datapath"),
        Some(PathBuf::from("/t/release/deps/datapath-1f2e"))
    );
    assert_eq!(test_executable(messages, "harness"), None);
}
