use super::{module_closure, parse_ldd, shell_quote};

#[test]
fn ldd_output_yields_every_library_path_and_the_loader() {
    let text = "\tlinux-vdso.so.1 (0x00007ffd5b1f2000)\n\
                \tlibmnl.so.0 => /lib/x86_64-linux-gnu/libmnl.so.0 (0x00007f2cfc4c3000)\n\
                \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2cfc4cb000)\n\
                \t/lib64/ld-linux-x86-64.so.2 (0x00007f2cfc7dc000)\n";
    let libraries = parse_ldd(text).expect("parses");
    let shown: Vec<_> = libraries.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(
        shown,
        [
            "/lib/x86_64-linux-gnu/libmnl.so.0",
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib64/ld-linux-x86-64.so.2",
        ]
    );
}

#[test]
fn a_library_ldd_cannot_find_is_an_error_naming_it() {
    let error = parse_ldd("\tlibjansson.so.4 => not found\n").unwrap_err();
    assert!(error.to_string().contains("libjansson.so.4"), "{error}");
}

#[test]
fn module_closure_adds_dependencies_outside_the_wanted_trees_transitively() {
    let deps = "kernel/net/netfilter/nft_objref.ko: kernel/net/netfilter/nf_tables.ko kernel/lib/libcrc32c.ko\n\
                kernel/net/netfilter/nf_tables.ko: kernel/net/netfilter/nfnetlink.ko kernel/lib/libcrc32c.ko\n\
                kernel/net/netfilter/nfnetlink.ko:\n\
                kernel/lib/libcrc32c.ko: kernel/crypto/crc32c_generic.ko\n\
                kernel/crypto/crc32c_generic.ko:\n\
                kernel/drivers/net/veth.ko:\n\
                kernel/fs/fuse/fuse.ko:\n";
    let wanted = module_closure(
        deps,
        &["kernel/net/netfilter/", "kernel/drivers/net/veth.ko"],
    );
    let wanted: Vec<_> = wanted.iter().map(String::as_str).collect();
    assert_eq!(
        wanted,
        [
            "kernel/crypto/crc32c_generic.ko",
            "kernel/drivers/net/veth.ko",
            "kernel/lib/libcrc32c.ko",
            "kernel/net/netfilter/nf_tables.ko",
            "kernel/net/netfilter/nfnetlink.ko",
            "kernel/net/netfilter/nft_objref.ko",
        ]
    );
}

#[test]
fn shell_quoting_survives_single_quotes() {
    assert_eq!(shell_quote("plain"), "'plain'");
    assert_eq!(shell_quote("it's"), r"'it'\''s'");
}
