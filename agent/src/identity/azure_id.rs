//! The shapes of Azure's identifiers, checked where they enter the agent (the bindings file, pod cgroup names).

/// 8-4-4-4-12 hex digits, the form Azure prints client and object ids in (and kubelet prints pod UIDs in).
pub fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The shape aad-pod-identity validated: `/subscriptions/<s>/resourcegroups/<rg>/providers/
/// Microsoft.ManagedIdentity/userAssignedIdentities/<name>`, case-insensitive as ARM is.
pub fn is_uami_resource_id(s: &str) -> bool {
    let parts: Vec<String> = s
        .trim_end_matches('/')
        .split('/')
        .map(str::to_ascii_lowercase)
        .collect();
    matches!(
        parts.iter().map(String::as_str).collect::<Vec<_>>().as_slice(),
        ["", "subscriptions", sub, "resourcegroups", rg, "providers", "microsoft.managedidentity", "userassignedidentities", name]
            if !sub.is_empty() && !rg.is_empty() && !name.is_empty()
    )
}
