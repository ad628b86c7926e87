//! The fused host attention ([`super::host_attention`]) as one autodiff operation, for training on
//! the CPU backend: its forward keeps the inputs, the output and each query's log-sum-exp, and its
//! backward computes the three gradients on the host. In tensor operations under autodiff, burn-flex
//! ran every step of the softmax and of its gradient on one thread and kept the `[T, T]` scores,
//! exponentials and weights of every block of every layer for the backward pass.
//!
//! [`fused`] picks the path by the backend's type: `Flex` runs the forward alone, `Autodiff<Flex>`
//! (with or without burn's balanced checkpointing) this operation; other backends get `None` and
//! keep the tensor operations.
use super::host_attention::{attention, Inputs};
use super::ScoreRule;
use crate::backend::Cpu;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{Shape, Tensor, TensorData, TensorPrimitive};
use std::any::Any;
use std::sync::Arc;

type Qkv<B> = (Tensor<B, 5>, Tensor<B, 4>, Tensor<B, 4>);

/// The fused attention of queries `[B, G, R, T, d]`, keys `[B, G, Tk, d]` and values
/// `[B, G, Tk, dv]` (see [`super::causal_attention`]) when `B` is the CPU backend, with or without
/// autodiff; otherwise the inputs back.
pub(super) fn fused<B: Backend>(
    qkv: Qkv<B>,
    start: usize,
    rule: ScoreRule,
) -> Result<Tensor<B, 5>, Qkv<B>> {
    let qkv = match cast::<_, Qkv<Cpu>>(qkv) {
        Ok((q, k, v)) => return Ok(cast(attention(q, k, v, start, rule)).ok().unwrap()),
        Err(qkv) => qkv,
    };
    let qkv = match cast::<_, Qkv<Autodiff<Cpu>>>(qkv) {
        Ok(qkv) => {
            return Ok(cast(tracked::<NoCheckpointing>(qkv, start, rule))
                .ok()
                .unwrap())
        }
        Err(qkv) => qkv,
    };
    match cast::<_, Qkv<Autodiff<Cpu, BalancedCheckpointing>>>(qkv) {
        Ok(qkv) => Ok(cast(tracked::<BalancedCheckpointing>(qkv, start, rule))
            .ok()
            .unwrap()),
        Err(qkv) => Err(qkv),
    }
}

/// `x` as a `U` when `T` is `U`; otherwise `x` back.
fn cast<T: 'static, U: 'static>(x: T) -> Result<U, T> {
    let mut slot = Some(x);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("just filled")),
        None => Err(slot.expect("not taken")),
    }
}

/// What the backward pass keeps: the inputs on the host, the output, the log-sum-exps, the rule
/// and the shapes of the three gradients.
#[derive(Debug, Clone)]
struct State {
    inputs: Arc<Inputs>,
    out: Arc<Vec<f32>>,
    lse: Arc<Vec<f32>>,
    rule: ScoreRule,
    shapes: [Shape; 3],
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Cpu, 3> for AttentionBackward {
    type State = State;

    fn backward(self, ops: Ops<State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<Cpu>(&ops.node);
        let d_out = crate::rows::host_f32(Tensor::<Cpu, 5>::from_primitive(
            TensorPrimitive::Float(d_out),
        ));
        let s = ops.state;
        let d = s.inputs.backward(s.rule, &s.out, &s.lse, &d_out);
        for ((parent, grad), shape) in ops.parents.into_iter().zip(d).zip(s.shapes) {
            if let Some(node) = parent {
                grads.register::<Cpu>(node.id, primitive(grad, shape));
            }
        }
    }
}

/// A CPU float tensor primitive holding `values` in `shape`.
fn primitive(values: Vec<f32>, shape: Shape) -> FloatTensor<Cpu> {
    Cpu::float_from_data(TensorData::new(values, shape), &Default::default())
}

/// The autodiff primitive of `x`: its CPU tensor and its graph node.
fn inner<C: CheckpointStrategy, const D: usize>(
    x: Tensor<Autodiff<Cpu, C>, D>,
) -> FloatTensor<Autodiff<Cpu, C>> {
    x.into_primitive().tensor()
}

/// The fused attention as a tracked operation of `Autodiff<Cpu, C>`.
fn tracked<C: CheckpointStrategy>(
    (q, k, v): Qkv<Autodiff<Cpu, C>>,
    start: usize,
    rule: ScoreRule,
) -> Tensor<Autodiff<Cpu, C>, 5> {
    let [b, g, r, t, _] = q.dims();
    let shapes = [q.shape(), k.shape(), v.shape()];
    let (q, k, v) = (inner(q), inner(k), inner(v));
    let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
    let host = |x| Tensor::<Cpu, 5>::from_primitive(TensorPrimitive::Float(x));
    let host4 = |x| Tensor::<Cpu, 4>::from_primitive(TensorPrimitive::Float(x));
    let inputs = Inputs::new(
        host(q.primitive),
        host4(k.primitive),
        host4(v.primitive),
        start,
    );
    let out_shape = Shape::new([b, g, r, t, inputs.dims.dv]);
    let (out, lse) = inputs.forward(rule);
    let output = primitive(out.clone(), out_shape);
    let result = match AttentionBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = State {
                inputs: Arc::new(inputs),
                out: Arc::new(out),
                lse: Arc::new(lse),
                rule,
                shapes,
            };
            prep.finish(state, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}
