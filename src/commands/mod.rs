//! One module per subcommand: argument definitions and a call into the library.
pub mod common;
pub mod convert;
pub mod extend_vocab;
pub mod inspect;
pub mod synth;
