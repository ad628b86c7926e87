//! One module per subcommand: argument definitions and a call into the library.
pub mod clover;
pub mod common;
pub mod convert;
pub mod convert_attention;
pub mod drop_layers;
pub mod eval;
pub mod expand;
pub mod export_gguf;
pub mod extend_vocab;
pub mod generate;
pub mod heal;
pub mod import_gguf;
pub mod inspect;
pub mod moe;
pub mod run;
pub mod synth;
pub mod upscale;
