//! One module per subcommand of `scconv-tch`.
pub mod allocator;
pub mod bench;
pub mod export;
pub mod infer;
pub mod info;
pub mod parity;
