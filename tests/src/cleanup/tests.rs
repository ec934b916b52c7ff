use super::*;

#[test]
fn owner_pid_parses_only_our_names() {
    assert_eq!(owner_pid("nmie2e-1234-0"), Some(1234));
    assert_eq!(owner_pid("nmie2e-1234-3-pod-a"), Some(1234));
    assert_eq!(owner_pid("nmie2e-x-3"), None);
    assert_eq!(owner_pid("cni-1234-0"), None);
}
