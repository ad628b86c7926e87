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

    /// The base of the heterogeneous [`Variant`]s: `tiny` with 4 layers and MLP width 256 (so that
    /// uniform widths are nemotron-nas-expressible).
    pub fn hetero() -> Self {
        SyntheticSpec {
            num_layers: 4,
            intermediate_size: 256,
            ..Self::tiny()
        }
    }

    /// SmolLM2-135M's shape (30 layers, hidden 576, 9 query and 3 KV heads, tied embeddings),
    /// for benchmarks.
    pub fn smollm2_135m() -> Self {
        SyntheticSpec {
            family: Family::Llama,
            hidden_size: 576,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            intermediate_size: 1536,
            vocab_size: 49152,
            tie_word_embeddings: true,
            dtype: DType::BF16,
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
            qkv_bias: self.family == Family::Qwen2,
            qk_norm: self.family.has_qk_norm(),
            ..Attention::softmax(
                self.num_heads,
                self.num_kv_heads,
                self.hidden_size / self.num_heads,
            )
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
            gemma: Default::default(),
            torch_dtype: Some(self.dtype),
            surgeon: SurgeonMeta::default(),
            extra: Default::default(),
        }
    }

    /// A plan whose tensors are generated on the fly (norm weights are ones plus noise).
    pub fn plan(&self) -> Plan {
        self.plan_of(self.arch())
    }

    /// A plan of `arch` (e.g. a [`Variant`] of [`Self::arch`]) with generated tensors.
    pub fn plan_of(&self, arch: ModelArch) -> Plan {
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

    /// The architecture of `variant`: this spec's shape with layers made to differ.
    pub fn variant_arch(&self, variant: Variant) -> ModelArch {
        let mut arch = self.arch();
        let (h, kv) = (self.num_heads, self.num_kv_heads);
        let d = self.hidden_size / h;
        for (i, layer) in arch.layers.iter_mut().enumerate() {
            let dense = |w: usize| Mlp::Dense {
                intermediate_size: w,
            };
            match variant {
                Variant::Uniform => {}
                Variant::MlpWidths => layer.mlp = dense(256 * (1 + i % 3)),
                Variant::OddMlpWidths => layer.mlp = dense(self.intermediate_size - 32 * (i % 3)),
                Variant::KvGroups => layer.attention.num_kv_heads = [1, kv, h][i % 3],
                Variant::NoOpAttention if i % 2 == 1 => {
                    layer.attention = Attention::no_op(h, d);
                }
                Variant::NoOpMlp if i % 2 == 0 => layer.mlp = Mlp::NoOp,
                Variant::VHeadDim => layer.attention.v_head_dim = d / 2,
                Variant::Mixed => match i % 4 {
                    0 => {
                        layer.attention.num_kv_heads = 1;
                        layer.attention.v_head_dim = d / 2;
                        layer.mlp = dense(self.intermediate_size - 32);
                    }
                    1 => layer.attention = Attention::no_op(h, d),
                    2 => {
                        layer.attention.num_kv_heads = h;
                        layer.mlp = Mlp::NoOp;
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        arch
    }

    /// Writes the synthetic model as a Hugging Face directory, replacing an earlier surgeon
    /// output or an empty directory there (never anything else: see [`crate::output`]).
    pub fn write(&self, dir: &Path, shard_size: Option<u64>) -> Result<()> {
        self.write_plan(&self.plan(), dir, shard_size)
    }

    /// Writes `plan` (made by [`Self::plan_of`]) as a Hugging Face directory.
    pub fn write_plan(&self, plan: &Plan, dir: &Path, shard_size: Option<u64>) -> Result<()> {
        let opts = WriteOptions {
            shard_size: shard_size.unwrap_or(5_000_000_000),
            force: true,
            ..Default::default()
        };
        self.write_plan_with(plan, dir, &opts).map(|_| ())
    }

    /// Writes the synthetic model with explicit options (`force` included).
    pub fn write_with(&self, dir: &Path, opts: &WriteOptions) -> Result<crate::WriteReport> {
        self.write_plan_with(&self.plan(), dir, opts)
    }

    /// Writes `plan` (made by [`Self::plan_of`]) with explicit options (`force` included).
    pub fn write_plan_with(
        &self,
        plan: &Plan,
        dir: &Path,
        opts: &WriteOptions,
    ) -> Result<crate::WriteReport> {
        let opts = WriteOptions {
            description: "synthetic checkpoint".into(),
            ..opts.clone()
        };
        write_model(plan, dir, &opts)
    }
}

/// Heterogeneous synthetic checkpoints: one per feature that no standard class describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Every layer alike (the plain spec).
    Uniform,
    /// MLP widths 256, 512, 768, 256, ... (multiples of 256: nemotron-nas can say them).
    MlpWidths,
    /// MLP widths I, I-32, I-64, ... (not multiples of 256: only the surgeon format can).
    OddMlpWidths,
    /// KV heads 1, kv, heads, 1, ... (a different number of KV groups per layer).
    KvGroups,
    /// Every odd layer has no attention.
    NoOpAttention,
    /// Every even layer has no MLP.
    NoOpMlp,
    /// Value/output head size half the query/key head size in every layer.
    VHeadDim,
    /// All of the above in one model (layer i % 4: fewer KV heads with half-size values and a
    /// narrower MLP; no attention; as many KV heads as query heads and no MLP; standard).
    Mixed,
}

impl Variant {
    pub const ALL: [Variant; 8] = [
        Variant::Uniform,
        Variant::MlpWidths,
        Variant::OddMlpWidths,
        Variant::KvGroups,
        Variant::NoOpAttention,
        Variant::NoOpMlp,
        Variant::VHeadDim,
        Variant::Mixed,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Variant::Uniform => "uniform",
            Variant::MlpWidths => "mlp-widths",
            Variant::OddMlpWidths => "odd-mlp-widths",
            Variant::KvGroups => "kv-groups",
            Variant::NoOpAttention => "no-op-attention",
            Variant::NoOpMlp => "no-op-mlp",
            Variant::VHeadDim => "v-head-dim",
            Variant::Mixed => "mixed",
        }
    }
    pub fn from_name(name: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == name)
    }
}
