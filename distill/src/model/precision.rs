//! Mixed precision (`heal --precision bf16`): the usual recipe of PyTorch's autocast. The
//! parameters stay f32 (the optimizer's master weights); every linear layer and the output
//! projection round their input and weight to bf16, multiply in bf16 (the backend accumulates in
//! f32 and rounds the product to bf16) and hand the product back in the caller's dtype (f32). Norms,
//! rotary embeddings, softmax, the loss and the optimizer stay f32.
//!
//! Why casts at the matmuls and not a bf16 copy of the whole model: burn 0.21 fixes one default
//! float dtype per device, and every tensor a forward creates (rotary tables, MoE buffers) gets it,
//! so a model whose activations were bf16 would mix dtypes (burn's Flex backend panics on that).
//! The casts are autodiff operations: the gradient reaching an f32 master weight went through the
//! bf16 matmul's backward and was cast back to f32, as under autocast. The cast weights live only
//! for one forward/backward, like autocast's weight cache.
use super::adapter::linears_mut;
use super::Llama;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};

/// `--precision`: the dtype of the matmuls while healing (the parameters and the loss are f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// The compute dtype of the matmuls (`None`: the inputs' own, f32).
    pub fn compute(self) -> Option<FloatDType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(FloatDType::BF16),
        }
    }

    /// Whether backend `B` computes in this precision on `device` (cast, add, multiply and matmul:
    /// burn's "general" usage of the dtype).
    pub fn supported<B: Backend>(self, device: &B::Device) -> bool {
        match self {
            Precision::F32 => true,
            Precision::Bf16 => B::supports_dtype(device, DType::BF16),
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision `{s}` (f32, bf16)")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// `x @ wt` computed in `compute` when given: both operands cast to it, the product cast back to
/// `x`'s dtype. Without `compute`, exactly `x.matmul(wt)`.
pub fn mixed_matmul<B: Backend>(
    x: Tensor<B, 2>,
    wt: Tensor<B, 2>,
    compute: Option<FloatDType>,
) -> Tensor<B, 2> {
    let Some(dt) = compute else {
        return x.matmul(wt);
    };
    let out = FloatDType::from(x.dtype());
    x.cast(dt).matmul(wt.cast(dt)).cast(out)
}

impl<B: Backend> Llama<B> {
    /// The model with every linear layer and the output projection computing in `compute` (see
    /// the module docs); the parameters are unchanged.
    pub fn with_compute(mut self, compute: Option<FloatDType>) -> Self {
        for lin in linears_mut(&mut self) {
            lin.compute = compute;
        }
        self.compute = compute;
        self
    }

    /// A frozen model (a teacher) whose linear weights and untied output matrix are stored in
    /// `dtype` (half the memory for bf16), computing in it. Embeddings and norms stay as they are.
    pub fn stored_in(self, dtype: FloatDType) -> Self {
        let mut m = self.with_compute(Some(dtype));
        for lin in linears_mut(&mut m) {
            lin.weight = lin.weight.clone().map(|w| w.cast(dtype));
        }
        m.lm_head = m.lm_head.map(|w| w.map(|w| w.cast(dtype)));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Linear;
    use burn::backend::{Autodiff, Flex};
    use burn::module::Param;
    use burn::tensor::{Distribution, TensorData};

    type AD = Autodiff<Flex>;

    fn bf16_round(v: &[f32]) -> Vec<f32> {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect()
    }

    fn random(shape: [usize; 2], seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..shape[0] * shape[1])
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect()
    }

    /// The bf16 linear layer equals the reference: input and weight rounded to bf16, the product
    /// in f32 (the Flex backend accumulates in f32), rounded to bf16. Tolerance: one bf16 rounding
    /// step of the reference (2^-8 relative), for a different summation order of the product.
    #[test]
    fn bf16_linear_equals_rounded_reference() {
        let dev = Default::default();
        let (x, w) = (random([5, 64], 1), random([24, 64], 2));
        let lin = Linear::<Flex> {
            weight: Param::from_data(TensorData::new(w.clone(), [24, 64]), &dev),
            bias: None,
            adapter: None,
            compute: Precision::Bf16.compute(),
        };
        let xt = Tensor::<Flex, 2>::from_data(TensorData::new(x.clone(), [5, 64]), &dev);
        let y = lin.forward(xt);
        assert_eq!(
            y.dtype(),
            DType::F32,
            "the layer answers in the input's dtype"
        );
        let y: Vec<f32> = y.into_data().to_vec().unwrap();
        let (xr, wr) = (bf16_round(&x), bf16_round(&w));
        let mut max_rel = 0f32;
        let mut differs_from_f32 = false;
        for i in 0..5 {
            for o in 0..24 {
                let dot = |a: &[f32], b: &[f32]| -> f32 {
                    (0..64).map(|k| a[i * 64 + k] * b[o * 64 + k]).sum()
                };
                let reference = bf16_round(&[dot(&xr, &wr)])[0];
                let plain = dot(&x, &w);
                let got = y[i * 24 + o];
                assert_eq!(got, bf16_round(&[got])[0], "the product is a bf16 value");
                max_rel = max_rel.max((got - reference).abs() / reference.abs().max(1e-3));
                differs_from_f32 |= got != plain;
            }
        }
        assert!(max_rel <= 1.0 / 256.0, "relative difference {max_rel}");
        assert!(differs_from_f32, "bf16 rounding changed nothing");
    }

    /// `compute: None` is the f32 matmul itself, bit for bit.
    #[test]
    fn f32_path_is_the_plain_matmul() {
        let dev = Default::default();
        let x = Tensor::<Flex, 2>::random([7, 32], Distribution::Default, &dev);
        let w = Tensor::<Flex, 2>::random([32, 9], Distribution::Default, &dev);
        let a: Vec<f32> = mixed_matmul(x.clone(), w.clone(), None)
            .into_data()
            .to_vec()
            .unwrap();
        let b: Vec<f32> = x.matmul(w).into_data().to_vec().unwrap();
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    /// Gradients reach the f32 weight through the bf16 matmul and arrive in f32, equal to the
    /// bf16 reference `dy^T x` within bf16 rounding.
    #[test]
    fn gradients_of_bf16_matmul_reach_f32_master_weights() {
        let dev = Default::default();
        let (x, w) = (random([6, 16], 3), random([16, 4], 4));
        let xt = Tensor::<AD, 2>::from_data(TensorData::new(x.clone(), [6, 16]), &dev);
        let wt =
            Tensor::<AD, 2>::from_data(TensorData::new(w.clone(), [16, 4]), &dev).require_grad();
        let y = mixed_matmul(xt, wt.clone(), Some(FloatDType::BF16));
        let grads = y.sum().backward();
        let g = wt.grad(&grads).expect("gradient of the master weight");
        assert_eq!(g.dtype(), DType::F32);
        let g: Vec<f32> = g.into_data().to_vec().unwrap();
        // d sum(x W) / dW[k, o] = sum_i x[i, k] (x rounded to bf16, dy = 1).
        let xr = bf16_round(&x);
        for k in 0..16 {
            let reference: f32 = (0..6).map(|i| xr[i * 16 + k]).sum();
            for o in 0..4 {
                let d = (g[k * 4 + o] - reference).abs();
                assert!(d <= reference.abs() / 128.0 + 1e-6, "{k},{o}: {d}");
            }
        }
    }

    /// A teacher stored in bf16 computes exactly what the f32 model computing in bf16 does (the
    /// cast of a bf16 weight is a no-op), and its linear weights are bf16. Against plain f32 the
    /// logits move by bf16 rounding only: within 5% of the largest logit on a tiny random model.
    #[test]
    fn stored_bf16_teacher_equals_bf16_compute() {
        let dev = Default::default();
        let plan = surgeon_formats::synthetic::SyntheticSpec::tiny().plan();
        let m = Llama::<Flex>::from_plan(&plan, &dev).unwrap();
        let ids: Vec<i64> = (0..12).map(|i| (i * 29 % 250) as i64 + 3).collect();
        let x = Tensor::<Flex, 2, burn::tensor::Int>::from_data(TensorData::new(ids, [2, 6]), &dev);
        let logits = |m: &Llama<Flex>| -> Vec<f32> {
            let y = m.forward(x.clone());
            assert_eq!(y.dtype(), DType::F32);
            y.into_data().to_vec().unwrap()
        };
        let plain = logits(&m);
        let mixed = logits(&m.clone().with_compute(Some(FloatDType::BF16)));
        let stored = m.stored_in(FloatDType::BF16);
        let q = &stored.layers[0].self_attn().unwrap().q_proj;
        assert_eq!(q.weight.val().dtype(), DType::BF16);
        assert_eq!(stored.embed_tokens.val().dtype(), DType::F32);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&logits(&stored)), bits(&mixed));
        let scale = plain.iter().fold(0f32, |a, x| a.max(x.abs()));
        let d = plain
            .iter()
            .zip(&mixed)
            .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
        assert!(d > 0.0 && d < 0.05 * scale, "max |d| {d}, scale {scale}");
    }
}
