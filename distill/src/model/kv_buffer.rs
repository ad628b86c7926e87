//! The generation cache of softmax and latent attention: keys and values (or latents and rotary
//! keys) in buffers with room to grow, so that a decoding step writes its own position instead of
//! copying every earlier one (concatenation made decoding quadratic in the context: 0.5 tokens/s
//! after 2k tokens of SmolLM2).
use crate::backend::{cast, same, Cpu, CpuView};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};

/// Positions a buffer holds when it is first made (at least what the first call writes).
const FIRST_CAPACITY: usize = 256;

/// Keys and values `[B, kv_heads, capacity, *]` of which the first `len` positions are filled.
#[derive(Clone, Debug)]
pub struct KvBuffer<B: Backend> {
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    len: usize,
}

impl<B: Backend> KvBuffer<B> {
    /// A buffer holding `k`, `v` `[B, G, t, *]`, with room for more.
    fn new(k: Tensor<B, 4>, v: Tensor<B, 4>) -> Self {
        let len = k.dims()[2];
        let (kd, vd) = (k.dims(), v.dims());
        let empty = |d: [usize; 4]| {
            Tensor::<B, 4>::zeros([d[0], d[1], len.max(FIRST_CAPACITY), d[3]], &k.device())
        };
        KvBuffer {
            keys: empty(kd),
            values: empty(vd),
            len: 0,
        }
        .write(k, v)
    }

    /// Appends `k`, `v` `[B, G, t, *]` to `buffer` (making it if there is none) and returns views of
    /// every key and value so far `[B, G, len, *]`.
    pub fn append(
        buffer: &mut Option<Self>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let buf = match buffer.take() {
            None => KvBuffer::new(k, v),
            Some(mut buf) => {
                let need = buf.len + k.dims()[2];
                let cap = buf.keys.dims()[2];
                if need > cap {
                    let cap = need.max(2 * cap);
                    buf.keys = grown(buf.keys, cap);
                    buf.values = grown(buf.values, cap);
                }
                buf.write(k, v)
            }
        };
        let views = (
            buf.keys.clone().narrow(2, 0, buf.len),
            buf.values.clone().narrow(2, 0, buf.len),
        );
        *buffer = Some(buf);
        views
    }

    /// Writes `k`, `v` at the next positions. The buffers are moved, not cloned, and the views of
    /// the previous step are gone, so they can be written in place (see [`write_at`]).
    fn write(mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Self {
        let t = k.dims()[2];
        self.keys = write_at(self.keys, k, self.len);
        self.values = write_at(self.values, v, self.len);
        self.len += t;
        self
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Numbers held in the filled positions (keys and values).
    pub fn numel(&self) -> usize {
        let [b, g, _, dk] = self.keys.dims();
        b * g * self.len * (dk + self.values.dims()[3])
    }
}

/// `buf` `[B, G, capacity, e]` with `x` `[B, G, t, e]` written at positions `at..at + t`. On the CPU
/// backend, in place when `buf` is not shared: burn-flex 0.21's `slice_assign` holds a second
/// reference to the buffer while writing and so copies all of it (perf of `surgeon generate` after
/// a 1.2k-token prompt: 13% of the time, growing with the context).
fn write_at<B: Backend>(buf: Tensor<B, 4>, x: Tensor<B, 4>, at: usize) -> Tensor<B, 4> {
    match cast::<_, (Tensor<Cpu, 4>, Tensor<Cpu, 4>)>((buf, x)) {
        Ok((buf, x)) => same(write_on_host(buf, x, at)),
        Err((buf, x)) => {
            let [b, g, t, e] = x.dims();
            buf.slice_assign([0..b, 0..g, at..at + t, 0..e], x)
        }
    }
}

/// [`write_at`] on the host: each `[t, e]` block of `x` copied into its place in `buf`'s storage
/// (copied first only if another tensor shares it).
fn write_on_host(buf: Tensor<Cpu, 4>, x: Tensor<Cpu, 4>, at: usize) -> Tensor<Cpu, 4> {
    let [b, g, cap, e] = buf.dims();
    let t = x.dims()[2];
    let mut p = buf.into_primitive().tensor();
    let whole = p.layout().contiguous_offsets() == Some((0, b * g * cap * e));
    if !whole || p.dtype() != DType::F32 {
        let buf = Tensor::<Cpu, 4>::from_primitive(TensorPrimitive::Float(p));
        return buf.slice_assign([0..b, 0..g, at..at + t, 0..e], x);
    }
    let src = CpuView::new(x.into_primitive().tensor());
    let dst = p.storage_mut::<f32>();
    for (bg, block) in src.chunks_exact(t * e).enumerate() {
        let start = (bg * cap + at) * e;
        dst[start..start + t * e].copy_from_slice(block);
    }
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// `x` `[B, G, n, e]` in a buffer of `capacity >= n` positions (zeros after the first `n`).
fn grown<B: Backend>(x: Tensor<B, 4>, capacity: usize) -> Tensor<B, 4> {
    let [b, g, n, e] = x.dims();
    let buf = Tensor::<B, 4>::zeros([b, g, capacity, e], &x.device());
    buf.slice_assign([0..b, 0..g, 0..n, 0..e], x)
}
