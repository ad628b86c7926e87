//! A scalar loss of the logits whose value and gradient are computed together on the host, in one
//! pass over each row of the vocabulary ([`super::loss`]'s fused LM and KD losses).
//!
//! On the CPU backend under autodiff the gradient is written over the logits' own buffer and one
//! autodiff operation hands that buffer to the backward pass: no copy of the logits, no second
//! buffer. For SmolLM2 at 4 x 256 tokens each such buffer is 200 MB; the tensor-operation form
//! ([`with_logit_grad`]) copied the logits to the host, built the gradient tensor and had autodiff
//! multiply and sum them and differentiate that, five passes over fresh 200 MB buffers (each
//! page-faulted in, above malloc's mmap threshold): the loss was 5% of `perf`'s samples of a
//! 3-step LM heal, most of it that copy.
use crate::backend::{cast, cpu_primitive, owned_f32, same, Cpu, CpuView};
use crate::rows::host_f32;
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

/// The loss `rows` computes from `logits`: `rows` receives the logits' values (row-major, the
/// shape of `logits`), overwrites them with the gradient of the loss and returns its value.
pub fn logit_loss<B: Backend, const D: usize>(
    logits: Tensor<B, D>,
    rows: impl FnOnce(&mut [f32]) -> f64,
) -> Tensor<B, 1> {
    let logits = match cast::<_, Tensor<Autodiff<Cpu>, D>>(logits) {
        Ok(x) => return same(tracked::<NoCheckpointing, D>(x, rows)),
        Err(x) => x,
    };
    let logits = match cast::<_, Tensor<Autodiff<Cpu, BalancedCheckpointing>, D>>(logits) {
        Ok(x) => return same(tracked::<BalancedCheckpointing, D>(x, rows)),
        Err(x) => x,
    };
    let mut grad = host_f32(logits.clone().detach());
    let value = rows(&mut grad);
    with_logit_grad(logits, value, grad)
}

/// A scalar loss whose value is `value` and whose gradient with respect to `logits` is `grad`
/// (same shape, computed elsewhere), in tensor operations: `s - detach(s) + value` with
/// `s = sum(logits * grad)`, which is exactly `value` for finite logits.
pub fn with_logit_grad<B: Backend, const D: usize>(
    logits: Tensor<B, D>,
    value: f64,
    grad: Vec<f32>,
) -> Tensor<B, 1> {
    let device = logits.device();
    let v = Tensor::<B, 1>::from_data(TensorData::new(vec![value as f32], [1]), &device);
    if !B::ad_enabled(&device) {
        return v;
    }
    let g = Tensor::<B, D>::from_data(TensorData::new(grad, logits.shape()), &device);
    let s = (logits * g).sum();
    s.clone() - s.detach() + v
}

/// The gradient, kept from the forward pass for the backward one.
#[derive(Debug, Clone)]
struct State {
    grad: FloatTensor<Cpu>,
}

#[derive(Debug)]
struct LogitLossBackward;

impl Backward<Cpu, 1> for LogitLossBackward {
    type State = State;

    fn backward(self, ops: Ops<State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = CpuView::new(grads.consume::<Cpu>(&ops.node))[0];
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let grad = match dy {
                1.0 => ops.state.grad,
                _ => Cpu::float_mul_scalar(ops.state.grad, dy.into()),
            };
            grads.register::<Cpu>(node.id, grad);
        }
    }
}

/// The loss as a tracked operation of `Autodiff<Cpu, C>`, the gradient written in place.
fn tracked<C: CheckpointStrategy, const D: usize>(
    logits: Tensor<Autodiff<Cpu, C>, D>,
    rows: impl FnOnce(&mut [f32]) -> f64,
) -> Tensor<Autodiff<Cpu, C>, 1> {
    let n = logits.shape().num_elements();
    let x = logits.into_primitive().tensor();
    let node = x.node.clone();
    // In place when nothing else holds the logits (a copy otherwise, e.g. for a second loss).
    let mut grad = owned_f32(x.primitive);
    let value = rows(&mut grad.storage_mut::<f32>()[..n]);
    let output = cpu_primitive(vec![value as f32], Shape::new([1]));
    let result = match LogitLossBackward
        .prepare::<C>([node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(State { grad }, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}
