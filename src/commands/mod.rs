//! One module per subcommand: argument definitions and a call into the library.
pub mod common;
pub mod convert;
pub mod drop_layers;
pub mod expand;
pub mod inspect;
pub mod synth;
pub mod upscale;
