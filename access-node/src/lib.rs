//! access-node as a library: only its command-line definition (`args.rs`), so that the
//! `packaging` crate can generate the man pages and shell completions from the same clap
//! definitions the binary parses. The daemon's modules stay in the binary (`main.rs`);
//! nothing here is a stable API.

pub mod args;
