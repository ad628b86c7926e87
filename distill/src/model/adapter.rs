//! Trainable adapters on [`Linear`] layers, merged into the weights when a model is saved.
//!
//! An adapter sits inside a `Linear` ([`Linear::adapter`]) and rewrites its output before the bias:
//! - LoRA (Hu et al., arXiv 2106.09685; peft's layout): `y = x W^T + s (x A^T) B^T` with `A`
//!   `[r, in]` (Kaiming-uniform as peft: U(-1/sqrt(in), 1/sqrt(in))), `B` `[out, r]` zeros and
//!   `s = alpha / r`; merged as `W + s B A`. Parameters `{linear}.lora_A.weight`, `{linear}.lora_B.weight`.
//!
//! - CLOVER cores (`heal --train clover`): `W = blockdiag(L_h T_h^T) B` with the basis `B` in place
//!   of the weight (frozen), a trainable `b x b` core `T_h` per block of `b` output rows and an
//!   optional frozen left factor `L_h` ([`BlockFactors`], computed by `surgeon_convert`'s
//!   `clover_finetune` and handed in as plain data); merged as that product. Parameters
//!   `{linear}.clover_core` (trainable) and `{linear}.clover_left`.
//!
//! Adapters are attached after loading ([`Llama::attach_adapters`]) to any set of linear layers
//! chosen by name, their parameters named in the model's table so that the trainer, the optimizer
//! record and checkpoints see them like any other; [`Llama::merge_adapters`] folds them back, so
//! the saved model has the original tensors, shapes and class.
use super::{Linear, Llama, Mlp, SwiGlu};
use crate::error::Result;
use burn::module::{Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// Tensors by name as `(shape, values)` (adapter values saved in a checkpoint).
pub type AdapterValues = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Name endings of adapter parameters.
const ADAPTER_SUFFIXES: [&str; 3] = [".lora_A.weight", ".lora_B.weight", ".clover_core"];

/// Whether `name` is the name of a trainable adapter parameter.
pub fn is_adapter_param(name: &str) -> bool {
    ADAPTER_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// A trainable rewrite of one linear layer's output.
#[derive(Module, Debug)]
pub enum Adapter<B: Backend> {
    Lora(Lora<B>),
    Cores(Cores<B>),
}

/// One linear layer's CLOVER factors (plain data, row-major f32; see the module documentation).
#[derive(Clone, PartialEq)]
pub struct BlockFactors {
    /// Rows per block (`b`).
    pub block: usize,
    /// `B`, `[out, in]`: replaces the weight while training.
    pub basis: Vec<f32>,
    /// `T_h`, `[out / b, b, b]`: the initial trainable cores.
    pub core: Vec<f32>,
    /// `L_h`, `[out / b, b, b]`.
    pub left: Option<Vec<f32>>,
}

impl std::fmt::Debug for BlockFactors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockFactors(block {})", self.block)
    }
}

/// What [`Cores::new`] builds: the cores, the basis for the weight, the parameters' ids and names.
pub type CoresAndBasis<B> = (Cores<B>, Tensor<B, 2>, Vec<(ParamId, String)>);

/// Per-block cores `W = blockdiag(L_h T_h^T) B` (the weight holds `B`).
#[derive(Module, Debug)]
pub struct Cores<B: Backend> {
    /// `T_h`, `[n, b, b]`, trainable.
    pub core: Param<Tensor<B, 3>>,
    /// `L_h`, `[n, b, b]`, frozen.
    pub left: Option<Param<Tensor<B, 3>>>,
}

impl<B: Backend> Cores<B> {
    /// The cores of the linear layer `module` (`[out, in]`) from `f` (its trainable cores from
    /// `saved` on a resume), and the basis that replaces the layer's weight.
    pub fn new(
        module: &str,
        [out, inp]: [usize; 2],
        f: &BlockFactors,
        saved: Option<&AdapterValues>,
        device: &B::Device,
    ) -> Result<CoresAndBasis<B>> {
        let b = f.block;
        let n = out.checked_div(b).unwrap_or(0);
        let sizes_ok = n * b == out
            && f.basis.len() == out * inp
            && f.core.len() == n * b * b
            && f.left.as_ref().is_none_or(|l| l.len() == n * b * b);
        if !sizes_ok {
            return Err(crate::error::Error::Invalid(format!(
                "CLOVER factors of `{module}` do not fit its shape [{out}, {inp}] (block {b})"
            )));
        }
        let name = format!("{module}.clover_core");
        let values = saved
            .and_then(|s| s.get(&name))
            .map_or_else(|| f.core.clone(), |(_, v)| v.clone());
        let (core, id) = param(&name, [n, b, b], values, device);
        let mut ids = vec![id];
        let left = f.left.as_ref().map(|l| {
            let name = format!("{module}.clover_left");
            let (p, id) = param(&name, [n, b, b], l.clone(), device);
            ids.push(id);
            Param::initialized(p.id, p.val().set_require_grad(false))
        });
        let basis = Tensor::from_data(TensorData::new(f.basis.clone(), [out, inp]), device);
        Ok((Cores { core, left }, basis, ids))
    }

    /// `blockdiag(L_h T_h^T)` applied to the rows of `y` `[N, n * b]`.
    fn apply(&self, y: Tensor<B, 2>) -> Tensor<B, 2> {
        let [rows, out] = y.dims();
        let [n, b, _] = self.core.val().dims();
        let z = y
            .reshape([rows, n, b])
            .swap_dims(0, 1)
            .matmul(self.core.val());
        let z = match &self.left {
            Some(l) => z.matmul(l.val().swap_dims(1, 2)),
            None => z,
        };
        z.swap_dims(0, 1).reshape([rows, out])
    }

    /// `blockdiag(L_h T_h^T) basis`.
    fn merged(&self, basis: Tensor<B, 2>) -> Tensor<B, 2> {
        let [out, inp] = basis.dims();
        let [n, b, _] = self.core.val().dims();
        let t = self.core.val().swap_dims(1, 2);
        let m = match &self.left {
            Some(l) => l.val().matmul(t),
            None => t,
        };
        m.matmul(basis.reshape([n, b, inp])).reshape([out, inp])
    }
}

/// Low-rank update `s B A`.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[r, in]`.
    pub a: Param<Tensor<B, 2>>,
    /// `[out, r]`.
    pub b: Param<Tensor<B, 2>>,
    /// `alpha / r`.
    pub scale: f64,
}

/// A trainable parameter named `name` with its stable id.
fn param<B: Backend, const D: usize>(
    name: &str,
    shape: [usize; D],
    values: Vec<f32>,
    device: &B::Device,
) -> (Param<Tensor<B, D>>, (ParamId, String)) {
    let id = super::param_id_for(name);
    let t = Tensor::from_data(TensorData::new(values, shape), device).require_grad();
    (Param::initialized(id, t), (id, name.to_string()))
}

/// FNV-1a of `s`, to give each adapter its own random stream.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl<B: Backend> Lora<B> {
    /// A fresh adapter of rank `r` for the linear layer `module` (`[out, in]`): `A` drawn from
    /// `seed` and the name, `B` zero; or the values saved in `saved` (resume).
    pub fn new(
        module: &str,
        [out, inp]: [usize; 2],
        (r, alpha): (usize, f64),
        seed: u64,
        saved: Option<&AdapterValues>,
        device: &B::Device,
    ) -> (Self, Vec<(ParamId, String)>) {
        let (na, nb) = (
            format!("{module}.lora_A.weight"),
            format!("{module}.lora_B.weight"),
        );
        let from_saved = |n: &str| saved.and_then(|s| s.get(n)).map(|(_, v)| v.clone());
        let a = from_saved(&na).unwrap_or_else(|| {
            let bound = 1.0 / (inp as f32).sqrt();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ fnv(&na));
            (0..r * inp)
                .map(|_| rng.random_range(-bound..bound))
                .collect()
        });
        let b = from_saved(&nb).unwrap_or_else(|| vec![0.0; out * r]);
        let (a, ia) = param(&na, [r, inp], a, device);
        let (b, ib) = param(&nb, [out, r], b, device);
        let scale = alpha / r as f64;
        (Lora { a, b, scale }, vec![ia, ib])
    }
}

impl<B: Backend> Adapter<B> {
    /// The adapted output for input rows `x` `[N, in]` whose plain output is `y` `[N, out]`.
    pub fn apply(&self, x: Tensor<B, 2>, y: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Adapter::Lora(l) => {
                let low = x.matmul(l.a.val().transpose());
                y + low.matmul(l.b.val().transpose()).mul_scalar(l.scale)
            }
            Adapter::Cores(c) => c.apply(y),
        }
    }

    /// The weight `[out, in]` that computes the adapted map on its own.
    pub fn merged(&self, weight: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Adapter::Lora(l) => weight + l.b.val().matmul(l.a.val()).mul_scalar(l.scale),
            Adapter::Cores(c) => c.merged(weight),
        }
    }
}

impl<B: Backend> Linear<B> {
    /// Folds the adapter (if any) into the weight; the weight keeps its parameter id.
    pub fn merge_adapter(&mut self) {
        if let Some(a) = self.adapter.take() {
            let w = self.weight.val();
            let grad = w.is_require_grad();
            let merged = a.merged(w.detach()).detach().set_require_grad(grad);
            self.weight = Param::initialized(self.weight.id, merged);
        }
    }
}

fn swiglu<B: Backend>(m: &mut SwiGlu<B>) -> [&mut Linear<B>; 3] {
    [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]
}

/// Every linear layer of `model` (attention projections, MLP and MoE router and experts).
pub(super) fn linears_mut<B: Backend>(model: &mut Llama<B>) -> Vec<&mut Linear<B>> {
    let mut out = vec![];
    for layer in &mut model.layers {
        if let Some(a) = &mut layer.attention {
            let s = &mut a.self_attn;
            out.extend([&mut s.q_proj, &mut s.k_proj, &mut s.v_proj, &mut s.o_proj]);
        }
        if let Some(f) = &mut layer.feed_forward {
            match &mut f.mlp {
                Mlp::Dense(m) => out.extend(swiglu(m)),
                Mlp::Moe(m) => {
                    out.push(&mut m.gate);
                    for e in &mut m.experts {
                        out.extend(swiglu(e));
                    }
                }
            }
        }
    }
    out
}

/// What [`Llama::attach_adapters`] asks for each linear layer: its HF module name (for example
/// `model.layers.0.self_attn.q_proj`) and the layer; it answers with the adapter (and its
/// parameters' ids and names) or `None`.
/// It may rewrite the layer (CLOVER puts its basis in place of the weight).
pub type AdapterMaker<'a, B> =
    dyn FnMut(&str, &mut Linear<B>) -> Result<Option<(Adapter<B>, Vec<(ParamId, String)>)>> + 'a;

impl<B: Backend> Llama<B> {
    /// Attaches the adapters `make` builds; returns the model and the names of the linear layers
    /// that got one.
    pub fn attach_adapters(
        mut self,
        make: &mut AdapterMaker<'_, B>,
    ) -> Result<(Self, Vec<String>)> {
        let names = self.names.clone();
        let (mut extra, mut adapted) = (vec![], vec![]);
        for lin in linears_mut(&mut self) {
            let weight = names.get(&lin.weight.id).expect("every parameter is named");
            let module = weight.strip_suffix(".weight").unwrap_or(weight);
            let lin: &mut Linear<B> = lin;
            if let Some((a, params)) = make(module, lin)? {
                extra.extend(params);
                adapted.push(module.to_string());
                lin.adapter = Some(a);
            }
        }
        self.names = names.with(extra);
        Ok((self, adapted))
    }

    /// Folds every adapter into its layer's weight (the model computes the same function).
    pub fn merge_adapters(mut self) -> Self {
        linears_mut(&mut self)
            .into_iter()
            .for_each(Linear::merge_adapter);
        self
    }

    /// Current values of the trainable adapter parameters, by name.
    pub fn adapter_values(&self) -> AdapterValues {
        let mut out = AdapterValues::new();
        self.visit_named(&mut |name, p| {
            if is_adapter_param(name) {
                out.insert(name.to_string(), (p.shape(), p.to_f32()));
            }
        });
        out
    }
}
