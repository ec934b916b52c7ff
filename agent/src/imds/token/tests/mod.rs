//! Tests of where tokens come from, one file per source file.

mod entra;
mod imds;
mod retry;
mod upstream;
