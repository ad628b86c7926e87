//! One module per subcommand: argument definitions and a call into the library.
pub mod common;
pub mod convert;
pub mod import_gguf;
pub mod eval;
pub mod generate;
pub mod heal;
pub mod drop_layers;
pub mod expand;
pub mod extend_vocab;
pub mod inspect;
pub mod moe;
pub mod synth;
pub mod upscale;
