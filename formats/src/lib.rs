//! Checkpoint formats for surgeon: Hugging Face config and safetensors, GGUF, tokenizers and the Hub;
//! and the model [plan](plan::Plan) that every operator rewrites, with its streaming [writer](writer).
pub mod arch;
pub mod config;
pub mod dtype;
pub mod error;
pub mod export;
pub mod gguf;
pub mod gguf_import;
pub mod hub;
pub mod importance;
pub mod inspect;
pub mod layout;
pub mod load;
pub mod output;
pub mod plan;
pub mod safetensors_file;
pub mod synthetic;
pub mod tokenizer_extend;
pub mod writer;

pub use arch::{
    Attention, AttentionKind, Family, GemmaParams, Layer, Mlp, ModelArch, MoeRouting, SurgeonMeta,
};
pub use dtype::DType;
pub use error::{Error, Result};
pub use importance::{ImportanceScores, LayerImportance};
pub use load::{open_hf_dir, open_model};
pub use plan::{AuxFile, HostTensor, Op, Plan, Source, TensorEntry};
pub use writer::{write_model, WriteOptions, WriteReport};
