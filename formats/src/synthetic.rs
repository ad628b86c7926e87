//! Synthetic checkpoints of any size, for tests and benchmarks. Values are deterministic
//! pseudo-random normals generated while writing, so even a 1B-parameter model needs little memory.
use crate::arch::*;
use crate::plan::{Plan, Source, TensorEntry};
use crate::writer::{write_model, WriteOptions};
use crate::{DType, Result};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    pub family: Family,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub dtype: DType,
    pub seed: u64,
}

impl SyntheticSpec {
    /// A tiny Llama (2 layers, hidden 64) for unit tests.
    pub fn tiny() -> Self {
        SyntheticSpec {
            family: Family::Llama,
            hidden_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            intermediate_size: 128,
            vocab_size: 256,
            tie_word_embeddings: false,
            dtype: DType::F32,
            seed: 0,
        }
    }

    /// A Llama of about 1.1B parameters (TinyLlama's shape), for benchmarks.
    pub fn llama_1b() -> Self {
        SyntheticSpec {
            family: Family::Llama,
            hidden_size: 2048,
            num_layers: 22,
            num_heads: 32,
            num_kv_heads: 4,
            intermediate_size: 5632,
            vocab_size: 32000,
            tie_word_embeddings: false,
            dtype: DType::BF16,
            seed: 0,
        }
    }

    pub fn arch(&self) -> ModelArch {
        let attention = Attention {
            kind: AttentionKind::Softmax,
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.hidden_size / self.num_heads,
            qkv_bias: self.family == Family::Qwen2,
        };
        let mlp = Mlp::Dense {
            intermediate_size: self.intermediate_size,
        };
        ModelArch {
            family: self.family,
            hidden_size: self.hidden_size,
            vocab_size: self.vocab_size,
            layers: vec![Layer { attention, mlp }; self.num_layers],
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 2048,
            tie_word_embeddings: self.tie_word_embeddings,
            sliding_window: None,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: None,
            hidden_act: "silu".into(),
            torch_dtype: Some(self.dtype),
            surgeon: SurgeonMeta::default(),
            extra: Default::default(),
        }
    }

    /// A plan whose tensors are generated on the fly (norm weights are ones plus noise).
    pub fn plan(&self) -> Plan {
        let arch = self.arch();
        let mut tensors = BTreeMap::new();
        for (k, (name, shape)) in arch.expected_tensors().into_iter().enumerate() {
            let is_norm = shape.len() == 1;
            let source = Source::Random {
                shape: shape.clone(),
                seed: self.seed.wrapping_mul(1_000_003).wrapping_add(k as u64),
                // Norm weights near 1 keep activations well scaled.
                mean: if is_norm { 1.0 } else { 0.0 },
                std: if is_norm { 0.1 } else { 0.02 },
            };
            let mut e = TensorEntry::new(source);
            e.dtype = self.dtype;
            tensors.insert(name, e);
        }
        Plan {
            arch,
            tensors,
            files: BTreeMap::new(),
            origin: format!("synthetic(seed {})", self.seed),
        }
    }

    /// Writes the synthetic model as a Hugging Face directory, replacing an earlier surgeon
    /// output or an empty directory there (never anything else: see [`crate::output`]).
    pub fn write(&self, dir: &Path, shard_size: Option<u64>) -> Result<()> {
        let opts = WriteOptions {
            shard_size: shard_size.unwrap_or(5_000_000_000),
            force: true,
            ..Default::default()
        };
        self.write_with(dir, &opts).map(|_| ())
    }

    /// Writes the synthetic model with explicit options (`force` included).
    pub fn write_with(&self, dir: &Path, opts: &WriteOptions) -> Result<crate::WriteReport> {
        let opts = WriteOptions {
            description: "synthetic checkpoint".into(),
            ..opts.clone()
        };
        write_model(&self.plan(), dir, &opts)
    }
}
