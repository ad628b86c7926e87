//! What `surgeon inspect` reports about a model.
use crate::arch::Mlp;
use crate::plan::{describe_layer, group_digits, Plan};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Clone, Debug, Serialize)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub parameters: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelSummary {
    pub source: String,
    pub model_type: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub num_experts: Option<usize>,
    pub experts_per_token: Option<usize>,
    pub vocab_size: usize,
    pub tied_embeddings: bool,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// Gemma's attention and logit parameters (Gemma models only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gemma: Option<crate::arch::GemmaParams>,
    /// Keys a sliding-window layer sees (`sliding_window`), if any layer slides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    pub dtypes: BTreeMap<String, u64>,
    pub parameters: u64,
    pub bytes: u64,
    pub parameters_by_component: BTreeMap<String, u64>,
    /// Bytes of KV cache per token at 16-bit precision (bf16/f16), all layers.
    pub kv_cache_bytes_per_token: u64,
    /// Distinct layer shapes as `first..end: description`.
    pub layers: Vec<String>,
    pub new_layers: Vec<usize>,
    pub new_token_ids: usize,
    pub history: Vec<String>,
    /// The config.json dialect an export writes (`llama`, `nemotron-nas`, `surgeon`, ...).
    pub export_format: String,
    /// Why that dialect (see [`crate::export::choose_export`]).
    pub export_reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors: Option<Vec<TensorSummary>>,
}

fn component(name: &str) -> &'static str {
    if name.contains("embed_tokens") {
        "embeddings"
    } else if name.starts_with("lm_head") {
        "lm_head"
    } else if name.contains("self_attn") {
        "attention"
    } else if name.contains(".mlp.") || name.contains("block_sparse_moe") {
        "mlp"
    } else if name.contains("norm") {
        "norms"
    } else {
        "other"
    }
}

pub fn summarize(plan: &Plan, with_tensors: bool) -> ModelSummary {
    let a = &plan.arch;
    let first = &a.layers[0];
    let attention = a
        .layers
        .iter()
        .map(|l| &l.attention)
        .find(|at| !at.is_no_op())
        .unwrap_or(&first.attention);
    let export = crate::export::choose_export(a);
    let (intermediate_size, num_experts, experts_per_token) = match &first.mlp {
        Mlp::Dense { intermediate_size } => (*intermediate_size, None, None),
        Mlp::NoOp => (0, None, None),
        Mlp::Moe {
            num_experts,
            top_k,
            intermediate_size,
            ..
        } => (*intermediate_size, Some(*num_experts), Some(*top_k)),
    };
    let mut dtypes = BTreeMap::new();
    let mut by_component = BTreeMap::new();
    for (name, t) in &plan.tensors {
        *dtypes.entry(t.dtype.to_string()).or_insert(0) += t.numel() as u64;
        *by_component.entry(component(name).to_string()).or_insert(0) += t.numel() as u64;
    }
    let mut layers = vec![];
    let mut i = 0;
    while i < a.layers.len() {
        let mut j = i + 1;
        while j < a.layers.len() && a.layers[j] == a.layers[i] {
            j += 1;
        }
        layers.push(format!("{i}..{j}: {}", describe_layer(&a.layers[i])));
        i = j;
    }
    let tensors = with_tensors.then(|| {
        plan.ordered_names()
            .into_iter()
            .map(|n| {
                let t = &plan.tensors[n];
                TensorSummary {
                    name: n.clone(),
                    dtype: t.dtype.to_string(),
                    shape: t.shape(),
                    parameters: t.numel() as u64,
                }
            })
            .collect()
    });
    ModelSummary {
        source: plan.origin.clone(),
        model_type: a.family.model_type().into(),
        num_layers: a.num_layers(),
        hidden_size: a.hidden_size,
        num_heads: attention.num_heads,
        num_kv_heads: attention.num_kv_heads,
        head_dim: attention.head_dim,
        intermediate_size,
        num_experts,
        experts_per_token,
        vocab_size: a.vocab_size,
        tied_embeddings: a.tie_word_embeddings,
        rope_theta: a.rope_theta,
        max_position_embeddings: a.max_position_embeddings,
        gemma: a.family.is_gemma().then(|| a.gemma.clone()),
        sliding_window: a.sliding_window,
        dtypes,
        parameters: plan.parameter_count(),
        bytes: plan.byte_size(),
        parameters_by_component: by_component,
        kv_cache_bytes_per_token: 2 * a.kv_cache_values_per_token(),
        layers,
        new_layers: a.surgeon.new_layers.clone(),
        new_token_ids: a.surgeon.new_token_ids.len(),
        history: a.surgeon.history.clone(),
        export_format: export.format.model_type().into(),
        export_reason: export.reason,
        tensors,
    }
}

impl ModelSummary {
    /// Human-readable report (the default output of `surgeon inspect`).
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "source            {}", self.source);
        let _ = writeln!(s, "model type        {}", self.model_type);
        let _ = writeln!(s, "layers            {}", self.num_layers);
        let _ = writeln!(s, "hidden size       {}", self.hidden_size);
        let _ = writeln!(
            s,
            "heads / kv heads  {} / {} (head_dim {})",
            self.num_heads, self.num_kv_heads, self.head_dim
        );
        match (self.num_experts, self.experts_per_token) {
            (Some(e), Some(k)) => {
                let _ = writeln!(
                    s,
                    "ffn               {} experts x {}, top-{}",
                    e, self.intermediate_size, k
                );
            }
            _ => {
                let _ = writeln!(s, "ffn size          {}", self.intermediate_size);
            }
        }
        let _ = writeln!(s, "vocabulary        {}", self.vocab_size);
        let _ = writeln!(
            s,
            "tied embeddings   {}",
            if self.tied_embeddings { "yes" } else { "no" }
        );
        let _ = writeln!(
            s,
            "rope theta        {} (context {})",
            self.rope_theta, self.max_position_embeddings
        );
        if let Some(w) = self.sliding_window {
            let _ = writeln!(s, "sliding window    {w} keys");
        }
        if let Some(g) = &self.gemma {
            let show = |x: Option<f64>| x.map_or("none".to_string(), |x| x.to_string());
            let _ = writeln!(
                s,
                "gemma             query scalar {}, attention softcap {}, logit softcap {}, local rope theta {}",
                show(g.query_pre_attn_scalar),
                show(g.attn_logit_softcapping),
                show(g.final_logit_softcapping),
                show(g.rope_local_theta)
            );
        }
        let d: Vec<String> = self
            .dtypes
            .iter()
            .map(|(k, v)| format!("{k} ({})", group_digits(*v)))
            .collect();
        let _ = writeln!(s, "dtypes            {}", d.join(", "));
        let _ = writeln!(
            s,
            "parameters        {} ({} bytes)",
            group_digits(self.parameters),
            group_digits(self.bytes)
        );
        for (k, v) in &self.parameters_by_component {
            let _ = writeln!(
                s,
                "  {k:<15} {:>15} ({:.1}%)",
                group_digits(*v),
                100.0 * *v as f64 / self.parameters.max(1) as f64
            );
        }
        let _ = writeln!(
            s,
            "kv cache          {} bytes per token (16-bit keys and values)",
            group_digits(self.kv_cache_bytes_per_token)
        );
        if self.layers.len() > 1 {
            let _ = writeln!(s, "layer shapes:");
        }
        for l in &self.layers {
            let _ = writeln!(s, "  {l}");
        }
        if !self.new_layers.is_empty() {
            let _ = writeln!(s, "new layers        {:?}", self.new_layers);
        }
        if self.new_token_ids > 0 {
            let _ = writeln!(s, "new tokens        {}", self.new_token_ids);
        }
        for h in &self.history {
            let _ = writeln!(s, "history           {h}");
        }
        let _ = writeln!(
            s,
            "export as         {}: {}",
            self.export_format, self.export_reason
        );
        if let Some(ts) = &self.tensors {
            let width = ts.iter().map(|t| t.name.len()).max().unwrap_or(0);
            let _ = writeln!(s, "tensors:");
            for t in ts {
                let _ = writeln!(s, "  {:<width$}  {:<4} {:?}", t.name, t.dtype, t.shape);
            }
        }
        s
    }
}
