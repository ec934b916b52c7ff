//! libFuzzer entry for [`nmi_agent_fuzz::token_query`]: the property lives there, so `cargo test` replays regressions.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nmi_agent_fuzz::token_query::check(data));
