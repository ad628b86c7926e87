//! The fused host attention ([`super::host_attention`]) as one autodiff operation, for training on
//! the CPU backend: its forward keeps the inputs, the output and each query's log-sum-exp, and its
//! backward computes the three gradients on the host. In tensor operations under autodiff, burn-flex
//! ran every step of the softmax and of its gradient on one thread and kept the `[T, T]` scores,
//! exponentials and weights of every block of every layer for the backward pass.
//!
//! Two entry points pick the path by the backend's type: `Flex` runs the forward alone,
//! `Autodiff<Flex>` (with or without burn's balanced checkpointing) this operation, and other
//! backends get their inputs back and keep the tensor operations.
//! - [`fused`]: heads-first queries, keys and values after RoPE (the cached path);
//! - [`fused_projections`]: the projections' outputs `[B, T, n * d]` before RoPE, which the
//!   operation applies itself, returning `[B, T, H * dv]` (a forward without a cache: no
//!   transposes on either side).
use super::host_attention::{rope, Dims, Inputs, Order};
use super::ScoreRule;
use crate::backend::{cast, cpu_primitive, cpu_values, same, Cpu, CpuView};
use crate::rows::host_f32;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Tensor, TensorData, TensorPrimitive};
use std::sync::Arc;

/// Queries, keys and values.
pub(super) type Qkv<B, const D: usize> = (Tensor<B, D>, Tensor<B, D>, Tensor<B, D>);

/// What an attention needs besides its inputs: where the queries start, the score rule, and for
/// [`fused_projections`] the heads and the RoPE tables `[1, 1, T, d]`.
pub(super) struct Setup<'a, B: Backend> {
    pub start: usize,
    pub rule: ScoreRule,
    /// Query heads, key heads, key width and value width.
    pub heads: [usize; 4],
    pub rope: Option<(&'a Tensor<B, 4>, &'a Tensor<B, 4>)>,
}

/// The fused attention of heads-first queries `[B, G, R, T, d]`, keys `[B, G, Tk, d]` and values
/// `[B, G, Tk, dv]` (see [`super::causal_attention`]) when `B` is the CPU backend, with or without
/// autodiff; otherwise the inputs back.
#[allow(clippy::type_complexity)]
pub(super) fn fused<B: Backend>(
    (q, k, v): (Tensor<B, 5>, Tensor<B, 4>, Tensor<B, 4>),
    start: usize,
    rule: ScoreRule,
) -> Result<Tensor<B, 5>, (Tensor<B, 5>, Tensor<B, 4>, Tensor<B, 4>)> {
    let [b, g, r, t, d] = q.dims();
    let [_, _, tk, dv] = v.dims();
    let dims = Dims {
        b,
        g,
        r,
        t,
        start,
        tk,
        d,
        dv,
    };
    // Flattened to rank 3, the shapes of the tracked operation; reshaped back below.
    let flat = (
        q.reshape([b, g * r * t, d]),
        k.reshape([b, g * tk, d]),
        v.reshape([b, g * tk, dv]),
    );
    let plan = Plan {
        dims,
        order: Order::HeadsFirst,
        rule,
        rope: None,
    };
    match run(flat, plan) {
        Ok(y) => Ok(y.reshape([b, g, r, t, dv])),
        Err((q, k, v)) => Err((
            q.reshape([b, g, r, t, d]),
            k.reshape([b, g, tk, d]),
            v.reshape([b, g, tk, dv]),
        )),
    }
}

/// The fused attention of the projections' outputs, queries `[B, T, H * d]`, keys `[B, T, G * d]`
/// and values `[B, T, G * dv]` (RoPE not yet applied; no cache: keys at the queries' positions),
/// returning `[B, T, H * dv]`, when `B` is the CPU backend; otherwise the inputs back.
pub(super) fn fused_projections<B: Backend>(
    qkv: Qkv<B, 3>,
    setup: Setup<'_, B>,
) -> Result<Tensor<B, 3>, Qkv<B, 3>> {
    let [b, t, _] = qkv.0.dims();
    let [h, g, d, dv] = setup.heads;
    let dims = Dims {
        b,
        g,
        r: h / g,
        t,
        start: setup.start,
        tk: setup.start + t,
        d,
        dv,
    };
    let rope = setup.rope.map(|(c, s)| {
        let table = |x: &Tensor<B, 4>| host_f32(x.clone());
        Arc::new((table(c), table(s)))
    });
    let plan = Plan {
        dims,
        order: Order::TokensFirst,
        rule: setup.rule,
        rope,
    };
    run(qkv, plan)
}

/// Everything the operation needs to know besides its inputs.
#[derive(Debug, Clone)]
struct Plan {
    dims: Dims,
    order: Order,
    rule: ScoreRule,
    /// RoPE tables `[T, d]` (cos, sin), applied to queries and keys first (tokens first only).
    rope: Option<Arc<(Vec<f32>, Vec<f32>)>>,
}

/// Dispatch by backend type on rank-3 inputs (see [`fused`] for the heads-first flattening).
fn run<B: Backend>(qkv: Qkv<B, 3>, plan: Plan) -> Result<Tensor<B, 3>, Qkv<B, 3>> {
    let qkv = match cast::<_, Qkv<Cpu, 3>>(qkv) {
        Ok(qkv) => return Ok(same(forward_only(qkv, &plan))),
        Err(qkv) => qkv,
    };
    let qkv = match cast::<_, Qkv<Autodiff<Cpu>, 3>>(qkv) {
        Ok(qkv) => return Ok(same(tracked::<NoCheckpointing>(qkv, plan))),
        Err(qkv) => qkv,
    };
    match cast::<_, Qkv<Autodiff<Cpu, BalancedCheckpointing>, 3>>(qkv) {
        Ok(qkv) => Ok(same(tracked::<BalancedCheckpointing>(qkv, plan))),
        Err(qkv) => Err(qkv),
    }
}

/// The inputs on the host, RoPE applied when the plan has it.
fn host_inputs(q: Vec<f32>, k: Vec<f32>, v: Vec<f32>, plan: &Plan) -> Inputs {
    let mut inputs = Inputs {
        q,
        k,
        v,
        dims: plan.dims,
        order: plan.order,
    };
    if let Some(tables) = &plan.rope {
        let Dims { g, r, t, tk, d, .. } = plan.dims;
        let tables = (&tables.0[..], &tables.1[..]);
        rope(&mut inputs.q, tables, [t, g * r, d], false);
        rope(&mut inputs.k, tables, [tk, g, d], false);
    }
    inputs
}

/// The output's shape, `[B, rows, width]`: like the queries', `dv` wide per head.
fn out_shape(q: [usize; 3], plan: &Plan) -> Shape {
    let [b, rows, width] = q;
    let Dims { d, dv, .. } = plan.dims;
    Shape::new([b, rows, width / d * dv])
}

fn forward_only((q, k, v): Qkv<Cpu, 3>, plan: &Plan) -> Tensor<Cpu, 3> {
    let shape = out_shape(q.dims(), plan);
    let device = q.device();
    let inputs = host_inputs(host_f32(q), host_f32(k), host_f32(v), plan);
    let (out, _) = inputs.forward(plan.rule);
    Tensor::from_data(TensorData::new(out, shape), &device)
}

/// What the backward pass keeps: the inputs on the host (after RoPE), the output, the
/// log-sum-exps, the plan and the shapes of the three gradients.
#[derive(Debug, Clone)]
struct State {
    inputs: Arc<Inputs>,
    /// The output tensor itself (not a copy).
    out: CpuView,
    lse: Arc<Vec<f32>>,
    plan: Plan,
    shapes: [Shape; 3],
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Cpu, 3> for AttentionBackward {
    type State = State;

    fn backward(self, ops: Ops<State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = cpu_values(grads.consume::<Cpu>(&ops.node));
        let s = ops.state;
        let [mut dq, mut dk, dv] = s.inputs.backward(s.plan.rule, &s.out, &s.lse, &d_out);
        if let Some(tables) = &s.plan.rope {
            let Dims { g, r, t, tk, d, .. } = s.plan.dims;
            let tables = (&tables.0[..], &tables.1[..]);
            rope(&mut dq, tables, [t, g * r, d], true);
            rope(&mut dk, tables, [tk, g, d], true);
        }
        for ((parent, grad), shape) in ops.parents.into_iter().zip([dq, dk, dv]).zip(s.shapes) {
            if let Some(node) = parent {
                grads.register::<Cpu>(node.id, cpu_primitive(grad, shape));
            }
        }
    }
}

/// The fused attention as a tracked operation of `Autodiff<Cpu, C>`.
fn tracked<C: CheckpointStrategy>(
    (q, k, v): Qkv<Autodiff<Cpu, C>, 3>,
    plan: Plan,
) -> Tensor<Autodiff<Cpu, C>, 3> {
    let shape = out_shape(q.dims(), &plan);
    let shapes = [q.shape(), k.shape(), v.shape()];
    let [q, k, v] = [q, k, v].map(|x| x.into_primitive().tensor());
    let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
    let inputs = host_inputs(
        cpu_values(q.primitive),
        cpu_values(k.primitive),
        cpu_values(v.primitive),
        &plan,
    );
    let (out, lse) = inputs.forward(plan.rule);
    let output = cpu_primitive(out, shape);
    let result = match AttentionBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = State {
                inputs: Arc::new(inputs),
                out: CpuView::new(output.clone()),
                lse: Arc::new(lse),
                plan,
                shapes,
            };
            prep.finish(state, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}
