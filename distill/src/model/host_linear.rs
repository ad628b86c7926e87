//! `x W^T` (every linear layer's product and the output projection) on the host for the CPU
//! backend in f32, with or without autodiff (one autodiff operation with its own backward pass).
//!
//! burn-flex's matmul runs the same `gemm` crate, but every output buffer it makes is allocated
//! zeroed as bytes and then copied into a 16-byte-aligned allocation (`Bytes::from_bytes_vec`), so
//! each product's output was written three times and its pages faulted in twice; and under
//! autodiff `x.matmul(W^T)` hands the weight its gradient as a transposed view, which the optimizer
//! then copies. In `perf` of an LM training step of SmolLM2 that was 10% of the time (page
//! clearing, memset and memcpy under matmul). Here the output is one `Vec<f32>`, and the weight's
//! gradient `dY^T X` is computed directly in the weight's layout; a frozen weight (or input) gets
//! no gradient product at all.
use crate::backend::{cast, cpu_primitive, same, Cpu, CpuView};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use std::sync::Arc;

/// Products with at least this many multiply-adds run on the thread pool (burn-flex's threshold).
const PARALLEL_WORK: usize = 192 * 192 * 192;

type Pair<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// `x W^T` for `x` `[m, k]` and `W` `[n, k]`, when `B` is the CPU backend (with or without
/// autodiff) and both are f32; otherwise the inputs back.
pub(super) fn product<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, Pair<B>> {
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Err((x, w));
    }
    let pair = match cast::<_, Pair<Cpu>>((x, w)) {
        Ok((x, w)) => {
            let k = w.dims()[1];
            let [x, w] = [x, w].map(|t| CpuView::new(t.into_primitive().tensor()));
            let (y, shape) = forward(&x, &w, k);
            return Ok(same(Tensor::<Cpu, 2>::from_primitive(
                TensorPrimitive::Float(cpu_primitive(y, shape)),
            )));
        }
        Err(pair) => pair,
    };
    let pair = match cast::<_, Pair<Autodiff<Cpu>>>(pair) {
        Ok(pair) => return Ok(same(tracked::<NoCheckpointing>(pair))),
        Err(pair) => pair,
    };
    match cast::<_, Pair<Autodiff<Cpu, BalancedCheckpointing>>>(pair) {
        Ok(pair) => Ok(same(tracked::<BalancedCheckpointing>(pair))),
        Err(pair) => Err(pair),
    }
}

/// A row-major matrix in host memory.
#[derive(Debug)]
struct Mat<'a> {
    values: &'a [f32],
    rows: usize,
    cols: usize,
}

impl<'a> Mat<'a> {
    fn new(values: &'a [f32], cols: usize) -> Self {
        let rows = values.len().checked_div(cols).unwrap_or(0);
        Mat { values, rows, cols }
    }
}

/// `y = x W^T` for `x` `[m, k]` and `W` `[n, k]`, and its shape `[m, n]`.
fn forward(x: &[f32], w: &[f32], k: usize) -> (Vec<f32>, Shape) {
    let (x, w) = (Mat::new(x, k), Mat::new(w, k));
    let (m, n) = (x.rows, w.rows);
    // W read with its rows as columns.
    let y = gemm([m, n, k], (&x, false), (&w, true), Threads::Pool);
    (y, Shape::new([m, n]))
}

/// The gradients of `y = x W^T` given `dy` `[m, n]`: `dx = dy W` `[m, k]` and `dW = dy^T x`
/// `[n, k]` (in W's own layout), each only when wanted.
fn backward(x: &[f32], w: &[f32], dy: &[f32], k: usize, want: [bool; 2]) -> [Option<Vec<f32>>; 2] {
    let (x, w) = (Mat::new(x, k), Mat::new(w, k));
    let (m, n) = (x.rows, w.rows);
    let dy = Mat::new(dy, n);
    let dx = want[0].then(|| gemm([m, k, n], (&dy, false), (&w, false), Threads::Pool));
    let dw = want[1].then(|| gemm([n, k, m], (&dy, true), (&x, false), Threads::Pool));
    [dx, dw]
}

/// Whether a product may use the thread pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    /// The pool, for products large enough ([`PARALLEL_WORK`]).
    Pool,
    /// This thread only (the caller runs products in parallel).
    One,
}

/// `x W^T` for row-major `x` `[m, k]` and `W` `[n, k]`: a new row-major `[m, n]` buffer.
pub(crate) fn x_wt(x: &[f32], w: &[f32], k: usize, threads: Threads) -> Vec<f32> {
    let (x, w) = (Mat::new(x, k), Mat::new(w, k));
    gemm([x.rows, w.rows, k], (&x, false), (&w, true), threads)
}

/// `lhs . rhs` for `[m, n, k]`, each operand a row-major matrix read as itself or (`true`) as its
/// transpose: a new row-major `[m, n]` buffer, written once by the product (never zeroed first:
/// for the output projection that memset was 3.5% of `surgeon eval`).
fn gemm([m, n, k]: [usize; 3], lhs: (&Mat, bool), rhs: (&Mat, bool), threads: Threads) -> Vec<f32> {
    // (row stride, column stride) of a matrix read as `[r, c]`, and its shape.
    let strides = |(a, t): (&Mat, bool)| match t {
        false => ((a.cols as isize, 1isize), [a.rows, a.cols]),
        true => ((1isize, a.cols as isize), [a.cols, a.rows]),
    };
    let ((lrs, lcs), lshape) = strides(lhs);
    let ((rrs, rcs), rshape) = strides(rhs);
    assert_eq!(lshape, [m, k], "left operand's shape");
    assert_eq!(rshape, [k, n], "right operand's shape");
    assert!(lhs.0.values.len() >= m * k && rhs.0.values.len() >= k * n);
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    let parallelism = match threads == Threads::Pool && m * n * k >= PARALLEL_WORK {
        true => gemm::Parallelism::Rayon(0),
        false => gemm::Parallelism::None,
    };
    let mut dst = Vec::<f32>::with_capacity(m * n);
    // SAFETY: the operands' shapes and strides were checked against their lengths above, and
    // `dst` has room for `m * n` values and overlaps neither. With `read_dst` false (and k > 0)
    // gemm writes every element of the `m x n` destination without reading it, so all `m * n`
    // values are initialised before the length is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.0.values.as_ptr(),
            lcs,
            lrs,
            rhs.0.values.as_ptr(),
            rcs,
            rrs,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        dst.set_len(m * n);
    }
    dst
}

/// What the backward pass keeps: both operands where they lie (or their contiguous copies).
#[derive(Debug, Clone)]
struct State {
    x: Arc<CpuView>,
    w: Arc<CpuView>,
    k: usize,
    shapes: [Shape; 2],
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<Cpu, 2> for LinearBackward {
    type State = State;

    fn backward(self, ops: Ops<State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = CpuView::new(grads.consume::<Cpu>(&ops.node));
        let s = ops.state;
        let want = [ops.parents[0].is_some(), ops.parents[1].is_some()];
        let d = backward(&s.x, &s.w, &dy, s.k, want);
        for ((parent, grad), shape) in ops.parents.into_iter().zip(d).zip(s.shapes) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<Cpu>(node.id, cpu_primitive(grad, shape));
            }
        }
    }
}

/// The product as a tracked operation of `Autodiff<Cpu, C>`.
fn tracked<C: CheckpointStrategy>((x, w): Pair<Autodiff<Cpu, C>>) -> Tensor<Autodiff<Cpu, C>, 2> {
    let shapes = [x.shape(), w.shape()];
    let k = w.dims()[1];
    let [x, w] = [x, w].map(|t| t.into_primitive().tensor());
    let nodes = [x.node.clone(), w.node.clone()];
    let (x, w) = (CpuView::new(x.primitive), CpuView::new(w.primitive));
    let (y, shape) = forward(&x, &w, k);
    let output = cpu_primitive(y, shape);
    let result = match LinearBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = State {
                x: Arc::new(x),
                w: Arc::new(w),
                k,
                shapes,
            };
            prep.finish(state, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::host_f32;
    use burn::tensor::Distribution;

    /// The host product and both gradients against burn's `x.matmul(W^T)` under autodiff, for
    /// shapes on both sides of the parallel threshold.
    fn host_minus_burn<C: CheckpointStrategy>([m, n, k]: [usize; 3]) -> f32 {
        type A<C> = Autodiff<Cpu, C>;
        let device = Default::default();
        let x = Tensor::<Cpu, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Cpu, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &device);
        let r = Tensor::<A<C>, 2>::random([m, n], Distribution::Normal(0.0, 1.0), &device);
        let run = |host: bool| -> Vec<f32> {
            let x = Tensor::<A<C>, 2>::from_inner(x.clone()).require_grad();
            let w = Tensor::<A<C>, 2>::from_inner(w.clone()).require_grad();
            let y = match host {
                true => product(x.clone(), w.clone()).expect("the CPU backend"),
                false => x.clone().matmul(w.clone().transpose()),
            };
            let grads = (y.clone() * r.clone()).sum().backward();
            let mut all = host_f32(y.inner());
            all.extend(host_f32(x.grad(&grads).unwrap()));
            all.extend(host_f32(w.grad(&grads).unwrap()));
            all
        };
        crate::model::attention_tests::relative_diff(&run(true), &run(false))
    }

    #[test]
    fn host_product_and_gradients_equal_burns() {
        for dims in [[3, 5, 7], [300, 200, 190], [1, 33, 16]] {
            let diff = host_minus_burn::<NoCheckpointing>(dims);
            assert!(diff <= 1e-6, "{dims:?}: relative |diff| {diff}");
            let diff = host_minus_burn::<BalancedCheckpointing>(dims);
            assert!(diff <= 1e-6, "{dims:?}, balanced: relative |diff| {diff}");
        }
    }

    /// Without autodiff the product is burn-flex's to the bit (the same `gemm` call); a weight
    /// that is not trained gets no gradient.
    #[test]
    fn frozen_weight_gets_no_gradient_and_plain_cpu_matches() {
        type A = Autodiff<Cpu>;
        let device = Default::default();
        let x = Tensor::<Cpu, 2>::random([40, 24], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Cpu, 2>::random([16, 24], Distribution::Normal(0.0, 1.0), &device);
        let plain = product(x.clone(), w.clone()).unwrap();
        let want = host_f32(x.clone().matmul(w.clone().transpose()));
        assert_eq!(host_f32(plain), want, "same gemm, same bits");
        let xa = Tensor::<A, 2>::from_inner(x).require_grad();
        let wa = Tensor::<A, 2>::from_inner(w);
        let grads = product(xa.clone(), wa.clone()).unwrap().sum().backward();
        assert!(xa.grad(&grads).is_some());
        assert!(wa.grad(&grads).is_none());
    }
}
