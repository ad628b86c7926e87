//! SwiGLU's activation `silu(gate) * up` fused on the host for the CPU backend, with or without
//! autodiff (as one autodiff operation with its own backward pass). In tensor operations, burn-flex
//! ran the sigmoid (libm `expf` per value), the two products and, under autodiff, their gradients
//! one after another on one thread, each into a new buffer: `expf` alone was 3.5% of `surgeon
//! eval`. Here each chunk runs once, in parallel, with the vectorised exponential of
//! [`crate::rows`]; the values differ from the tensor ops' in rounding only, and a KD teacher and
//! an identical student both run this code.
use crate::backend::{cast, cpu_primitive, same, Cpu, CpuView};
use crate::rows;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;
use std::sync::Arc;

/// Values per parallel task (and per scratch row of exponentials).
const CHUNK: usize = 4096;

type Pair<B, const D: usize> = (Tensor<B, D>, Tensor<B, D>);

/// `silu(gate) * up` when `B` is the CPU backend, with or without autodiff; otherwise the inputs
/// back.
pub(super) fn fused<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Result<Tensor<B, D>, Pair<B, D>> {
    let pair = match cast::<_, Pair<Cpu, D>>((gate, up)) {
        Ok((g, u)) => {
            let (shape, device) = (g.shape(), g.device());
            let [g, u] = [g, u].map(|x| CpuView::new(x.into_primitive().tensor()));
            let out = forward(&g, &u);
            return Ok(same(Tensor::<Cpu, D>::from_data(
                TensorData::new(out, shape),
                &device,
            )));
        }
        Err(pair) => pair,
    };
    let pair = match cast::<_, Pair<Autodiff<Cpu>, D>>(pair) {
        Ok(pair) => return Ok(same(tracked::<NoCheckpointing, D>(pair))),
        Err(pair) => pair,
    };
    match cast::<_, Pair<Autodiff<Cpu, BalancedCheckpointing>, D>>(pair) {
        Ok(pair) => Ok(same(tracked::<BalancedCheckpointing, D>(pair))),
        Err(pair) => Err(pair),
    }
}

/// `sigmoid(x)` of each value of `g` into `s` (`s` is a scratch row of the same length).
fn sigmoid(g: &[f32], s: &mut Vec<f32>) {
    s.clear();
    s.extend(g.iter().map(|&x| -x));
    rows::exp_shifted(s, 0.0);
    s.iter_mut().for_each(|e| *e = 1.0 / (1.0 + *e));
}

/// `g * sigmoid(g) * u`, element by element.
fn forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; g.len()];
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each_init(Vec::new, |s, (out, (g, u))| {
            sigmoid(g, s);
            for (((o, &g), &u), &s) in out.iter_mut().zip(g).zip(u).zip(s.iter()) {
                *o = g * s * u;
            }
        });
    out
}

/// The gradients of `g * sigmoid(g) * u` given the output's `dy`: with `s = sigmoid(g)`,
/// `dg = dy * u * s * (1 + g * (1 - s))` and `du = dy * g * s`.
fn backward(g: &[f32], u: &[f32], dy: &[f32]) -> [Vec<f32>; 2] {
    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            g.par_chunks(CHUNK)
                .zip(u.par_chunks(CHUNK))
                .zip(dy.par_chunks(CHUNK)),
        )
        .for_each_init(Vec::new, |s, ((dg, du), ((g, u), dy))| {
            sigmoid(g, s);
            for i in 0..g.len() {
                let (x, s) = (g[i], s[i]);
                dg[i] = dy[i] * u[i] * s * (1.0 + x * (1.0 - s));
                du[i] = dy[i] * x * s;
            }
        });
    [dg, du]
}

/// What the backward pass keeps: the gate's and up's values (the input tensors themselves, not
/// copies) and their shape.
#[derive(Debug, Clone)]
struct State {
    gate: Arc<CpuView>,
    up: Arc<CpuView>,
    shape: Shape,
}

#[derive(Debug)]
struct SwiGluBackward;

impl Backward<Cpu, 2> for SwiGluBackward {
    type State = State;

    fn backward(self, ops: Ops<State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = CpuView::new(grads.consume::<Cpu>(&ops.node));
        let s = ops.state;
        let d = backward(&s.gate, &s.up, &dy);
        for (parent, grad) in ops.parents.into_iter().zip(d) {
            if let Some(node) = parent {
                let grad = cpu_primitive(grad, s.shape.clone());
                grads.register::<Cpu>(node.id, grad);
            }
        }
    }
}

/// The activation as a tracked operation of `Autodiff<Cpu, C>`.
fn tracked<C: CheckpointStrategy, const D: usize>(
    (gate, up): Pair<Autodiff<Cpu, C>, D>,
) -> Tensor<Autodiff<Cpu, C>, D> {
    let shape = gate.shape();
    let [g, u] = [gate, up].map(|x| x.into_primitive().tensor());
    let nodes = [g.node.clone(), u.node.clone()];
    let (gate, up) = (CpuView::new(g.primitive), CpuView::new(u.primitive));
    let out = forward(&gate, &up);
    let output = cpu_primitive(out, shape.clone());
    let result = match SwiGluBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = State {
                gate: Arc::new(gate),
                up: Arc::new(up),
                shape,
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
    use burn::backend::Flex;
    use burn::tensor::{activation, Distribution};

    /// Max |fused - tensor ops| over `silu(g) * u` and the gradients of `sum(out * w)` with
    /// respect to `g` and `u`, relative to the largest tensor-ops value.
    fn fused_minus_tensor_ops<C: CheckpointStrategy>() -> f32 {
        type A<C> = Autodiff<Flex, C>;
        let device = Default::default();
        // Not a multiple of CHUNK: the last task's chunk is partial. Gates up to |8|: both tails
        // of the sigmoid.
        let shape = [3, 1000, 7];
        let g = Tensor::<A<C>, 3>::random(shape, Distribution::Uniform(-8.0, 8.0), &device);
        let u = Tensor::<A<C>, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<A<C>, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (g, u) = (g.into_data(), u.into_data());
        let run = |fused: bool| -> Vec<f32> {
            let g = Tensor::<A<C>, 3>::from_data(g.clone(), &device).require_grad();
            let u = Tensor::<A<C>, 3>::from_data(u.clone(), &device).require_grad();
            let y = match fused {
                true => super::fused(g.clone(), u.clone()).expect("the CPU backend"),
                false => activation::silu(g.clone()) * u.clone(),
            };
            let grads = (y.clone() * w.clone()).sum().backward();
            let mut all = host_f32(y.inner());
            all.extend(host_f32(g.grad(&grads).unwrap()));
            all.extend(host_f32(u.grad(&grads).unwrap()));
            all
        };
        crate::model::attention_tests::relative_diff(&run(true), &run(false))
    }

    #[test]
    fn fused_swiglu_and_its_gradients_equal_the_tensor_ops() {
        let diff = fused_minus_tensor_ops::<NoCheckpointing>();
        assert!(diff <= 1e-6, "relative |diff| {diff}");
        let diff = fused_minus_tensor_ops::<BalancedCheckpointing>();
        assert!(
            diff <= 1e-6,
            "balanced checkpointing: relative |diff| {diff}"
        );
    }
}
