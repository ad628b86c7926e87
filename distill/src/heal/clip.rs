//! Global gradient-norm clipping: the norm over every trained parameter's gradient, and the
//! scaling of all of them by one factor. On the CPU backend both run on the host in parallel,
//! reading and scaling the gradients where they lie; elsewhere in tensor operations on the device.
use crate::backend::{cast, owned_f32, same, Cpu, CpuView};
use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// The global gradient norm over `params` (id, name, rank): per-parameter sums of squares added in
/// f64 in parameter order.
pub fn grad_norm<B: AutodiffBackend>(
    g: &GradientsParams,
    params: &[(ParamId, String, usize)],
) -> f64 {
    let grads = params
        .iter()
        .filter_map(|(id, _, r)| Some((grad::<B>(g, *id, *r)?, *r)));
    if crate::backend::is_cpu::<B::InnerBackend>() {
        let sums = grads.map(|(x, _)| sum_sq_host(same::<_, FloatTensor<Cpu>>(x)));
        return sums.sum::<f64>().sqrt();
    }
    let sums: Vec<Tensor<B::InnerBackend, 1>> = grads
        .map(|(x, rank)| sum_sq_device::<B::InnerBackend>(x, rank))
        .collect();
    if sums.is_empty() {
        return 0.0;
    }
    let data = Tensor::cat(sums, 0).into_data().convert::<f64>();
    data.iter::<f64>().sum::<f64>().sqrt()
}

/// Multiplies the gradient of every parameter in `params` by `f` (rounded to f32, as a tensor's
/// `mul_scalar` does).
pub fn scale_grads<B: AutodiffBackend>(
    g: &mut GradientsParams,
    params: &[(ParamId, String, usize)],
    f: f64,
) {
    for (id, _, rank) in params {
        match rank {
            1 => scale::<B, 1>(g, *id, f),
            3 => scale::<B, 3>(g, *id, f),
            _ => scale::<B, 2>(g, *id, f),
        }
    }
}

/// The gradient of `id` (rank 1, 2 or 3) as a backend primitive, if it has one.
fn grad<B: AutodiffBackend>(
    g: &GradientsParams,
    id: ParamId,
    rank: usize,
) -> Option<FloatTensor<B::InnerBackend>> {
    match rank {
        1 => g.get::<B::InnerBackend, 1>(id).map(primitive),
        3 => g.get::<B::InnerBackend, 3>(id).map(primitive),
        _ => g.get::<B::InnerBackend, 2>(id).map(primitive),
    }
}

fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// Sum of squares of a rank-`rank` tensor's values, on its device.
fn sum_sq_device<B: Backend>(x: FloatTensor<B>, rank: usize) -> Tensor<B, 1> {
    let x = TensorPrimitive::Float(x);
    match rank {
        1 => Tensor::<B, 1>::from_primitive(x).powi_scalar(2).sum(),
        3 => Tensor::<B, 3>::from_primitive(x).powi_scalar(2).sum(),
        _ => Tensor::<B, 2>::from_primitive(x).powi_scalar(2).sum(),
    }
}

/// Sum of squares of a CPU tensor's values: 16 f32 lanes per chunk (so that it vectorises),
/// chunks added in f64 in order (the same value whatever the threads do).
fn sum_sq_host(x: FloatTensor<Cpu>) -> f64 {
    let x = CpuView::new(x);
    let chunks: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| {
            let mut lanes = [0f32; 16];
            let mut it = c.chunks_exact(16);
            for v in &mut it {
                for (l, &x) in lanes.iter_mut().zip(v) {
                    *l += x * x;
                }
            }
            let tail: f64 = it.remainder().iter().map(|&x| (x * x) as f64).sum();
            lanes.iter().map(|&l| l as f64).sum::<f64>() + tail
        })
        .collect();
    chunks.iter().sum()
}

fn scale<B: AutodiffBackend, const D: usize>(g: &mut GradientsParams, id: ParamId, f: f64) {
    let Some(t) = g.remove::<B::InnerBackend, D>(id) else {
        return;
    };
    let t = match cast::<Tensor<B::InnerBackend, D>, Tensor<Cpu, D>>(t) {
        Ok(t) if t.dtype() == burn::tensor::DType::F32 => same(scale_host(t, f as f32)),
        Ok(t) => same(t.mul_scalar(f)),
        Err(t) => t.mul_scalar(f),
    };
    g.register(id, t);
}

/// `t * f` in place (or in a copy where `t` is a view or shared), in parallel.
fn scale_host<const D: usize>(t: Tensor<Cpu, D>, f: f32) -> Tensor<Cpu, D> {
    let n = t.shape().num_elements();
    let mut x = owned_f32(t.into_primitive().tensor());
    x.storage_mut::<f32>()[..n]
        .par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= f));
    Tensor::from_primitive(TensorPrimitive::Float(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn host_sum_of_squares_matches_f64_reference() {
        let x = Tensor::<Cpu, 2>::random(
            [301, 517],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        );
        let v: Vec<f32> = x.to_data().into_vec().unwrap();
        let want: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
        let got = sum_sq_host(x.into_primitive().tensor());
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
    }

    #[test]
    fn host_scale_equals_mul_scalar_and_spares_shared_buffers() {
        let x = Tensor::<Cpu, 2>::random(
            [70, 1000],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        );
        let want: Vec<f32> = x.clone().mul_scalar(0.37f64).to_data().into_vec().unwrap();
        let kept: Vec<f32> = x.to_data().into_vec().unwrap();
        let got: Vec<f32> = scale_host(x.clone(), 0.37f64 as f32)
            .to_data()
            .into_vec()
            .unwrap();
        assert_eq!(got, want);
        let after: Vec<f32> = x.to_data().into_vec().unwrap();
        assert_eq!(
            after, kept,
            "a buffer shared with another handle is copied, not scaled"
        );
    }
}
