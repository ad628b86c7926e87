//! Which burn backend runs the model: CPU (`Flex`, always built), `Wgpu` and `Cuda` (cargo features).
use crate::error::{Error, Result};
use burn::tensor::backend::Backend;

/// The default CPU backend (pure Rust, rayon + SIMD).
pub type Cpu = burn::backend::Flex;

/// True when `B` is [`Cpu`] itself (not under autodiff): its tensors live in host memory, so a
/// reduction over them can run on the host without a transfer.
pub fn is_cpu<B: Backend>() -> bool {
    std::any::TypeId::of::<B>() == std::any::TypeId::of::<Cpu>()
}

/// `x` as a `U`, where the caller has found that `T` is `U`.
pub(crate) fn same<T: 'static, U: 'static>(x: T) -> U {
    match cast(x) {
        Ok(u) => u,
        Err(_) => unreachable!("the types were found equal"),
    }
}

/// `x` as a `U` when `T` is `U`; otherwise `x` back.
pub(crate) fn cast<T: 'static, U: 'static>(x: T) -> Result<U, T> {
    let mut slot = Some(x);
    match (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("just filled")),
        None => Err(slot.expect("not taken")),
    }
}

/// The values of a CPU float tensor primitive (of any rank), for an autodiff operation computed on
/// the host.
pub(crate) fn cpu_values(x: burn::tensor::ops::FloatTensor<Cpu>) -> Vec<f32> {
    use burn::tensor::{Tensor, TensorPrimitive};
    crate::rows::host_f32(Tensor::<Cpu, 1>::from_primitive(TensorPrimitive::Float(x)))
}

/// The f32 values of a CPU float tensor primitive, read where they lie when it is contiguous (a
/// copy through [`cpu_values`] otherwise, or for another dtype).
#[derive(Debug, Clone)]
pub(crate) enum CpuView {
    InPlace(burn::tensor::ops::FloatTensor<Cpu>),
    Copied(Vec<f32>),
}

impl CpuView {
    pub(crate) fn new(x: burn::tensor::ops::FloatTensor<Cpu>) -> Self {
        match x.as_slice::<f32>().is_some() {
            true => CpuView::InPlace(x),
            false => CpuView::Copied(cpu_values(x)),
        }
    }

    /// The values of a tensor of any backend: read where they lie on the CPU backend (with or
    /// without autodiff), copied to the host otherwise.
    pub(crate) fn of<B: Backend, const D: usize>(x: burn::tensor::Tensor<B, D>) -> Self {
        use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
        use burn::backend::Autodiff;
        use burn::tensor::Tensor;
        let x = match cast::<_, Tensor<Cpu, D>>(x) {
            Ok(x) => return CpuView::new(x.into_primitive().tensor()),
            Err(x) => x,
        };
        let x = match cast::<_, Tensor<Autodiff<Cpu>, D>>(x) {
            Ok(x) => return CpuView::new(x.into_primitive().tensor().primitive),
            Err(x) => x,
        };
        match cast::<_, Tensor<Autodiff<Cpu, BalancedCheckpointing>, D>>(x) {
            Ok(x) => CpuView::new(x.into_primitive().tensor().primitive),
            Err(x) => CpuView::Copied(crate::rows::host_f32(x)),
        }
    }
}

impl std::ops::Deref for CpuView {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            CpuView::InPlace(x) => x.as_slice::<f32>().expect("checked contiguous f32 in new"),
            CpuView::Copied(v) => v,
        }
    }
}

/// A CPU float tensor of f32 values, contiguous from offset 0 and owned by this handle alone (a
/// copy where it was a view or shared), so that its storage can be written in place.
pub(crate) fn owned_f32(
    x: burn::tensor::ops::FloatTensor<Cpu>,
) -> burn::tensor::ops::FloatTensor<Cpu> {
    let n = x.layout().shape().num_elements();
    let mut x = match x.layout().contiguous_offsets() {
        Some((0, end)) if end == n => x,
        _ => x.to_contiguous(),
    };
    // Copy-on-write: a no-op for a buffer nobody else holds.
    x.storage_mut::<f32>();
    x
}

/// A CPU float tensor primitive holding `values` in `shape`.
pub(crate) fn cpu_primitive(
    values: Vec<f32>,
    shape: burn::tensor::Shape,
) -> burn::tensor::ops::FloatTensor<Cpu> {
    use burn::tensor::ops::FloatTensorOps;
    Cpu::float_from_data(
        burn::tensor::TensorData::new(values, shape),
        &Default::default(),
    )
}

/// `--backend cpu|wgpu|cuda`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    #[default]
    Cpu,
    Wgpu,
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Ok(BackendKind::Cpu),
            "wgpu" => Ok(BackendKind::Wgpu),
            "cuda" => Ok(BackendKind::Cuda),
            _ => Err(format!("unknown backend `{s}` (cpu, wgpu, cuda)")),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        })
    }
}

/// A computation generic over the backend, run by [`BackendKind::run`].
pub trait BackendJob {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// A computation over several devices of one backend, run by [`BackendKind::run_on`].
pub trait DevicesJob {
    type Output;
    fn run<B: Backend>(self, devices: Vec<B::Device>) -> Self::Output;
}

impl BackendKind {
    /// True when this binary was built with the backend.
    pub fn available(self) -> bool {
        match self {
            BackendKind::Cpu => true,
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// Runs `job` on the default device of this backend.
    pub fn run<J: BackendJob>(self, job: J) -> Result<J::Output> {
        match self {
            BackendKind::Cpu => Ok(job.run::<Cpu>(Default::default())),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Ok(job.run::<burn::backend::Wgpu>(Default::default())),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => Ok(job.run::<burn::backend::Cuda>(Default::default())),
            #[allow(unreachable_patterns)]
            other => Err(Error::Unsupported(format!(
                "backend `{other}`: this binary was built without the `{other}` cargo feature"
            ))),
        }
    }

    /// Runs `job` on the devices numbered `indices` of this backend (none: the default device).
    /// The CPU backend has one device, 0.
    pub fn run_on<J: DevicesJob>(self, indices: &[usize], job: J) -> Result<J::Output> {
        let mut seen = indices.to_vec();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != indices.len() {
            return Err(Error::Invalid(format!(
                "`--devices {indices:?}` names a device twice"
            )));
        }
        match self {
            BackendKind::Cpu => match indices {
                [] | [0] => Ok(job.run::<Cpu>(vec![Default::default()])),
                _ => Err(Error::Unsupported(format!(
                    "`--devices {indices:?}`: the cpu backend has one device (0); several \
                     devices need `--backend cuda` or `wgpu`"
                ))),
            },
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => {
                use burn::backend::wgpu::WgpuDevice;
                let devices = match indices {
                    [] => vec![WgpuDevice::default()],
                    _ => indices
                        .iter()
                        .map(|&i| WgpuDevice::DiscreteGpu(i))
                        .collect(),
                };
                Ok(job.run::<burn::backend::Wgpu>(devices))
            }
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => {
                use burn::backend::cuda::CudaDevice;
                let devices = match indices {
                    [] => vec![CudaDevice::default()],
                    _ => indices.iter().map(|&i| CudaDevice { index: i }).collect(),
                };
                Ok(job.run::<burn::backend::Cuda>(devices))
            }
            #[allow(unreachable_patterns)]
            other => Err(Error::Unsupported(format!(
                "backend `{other}`: this binary was built without the `{other}` cargo feature"
            ))),
        }
    }
}

/// Runs `f` on a worker thread of rayon's global pool while the calling thread waits (directly
/// when already on one). Every parallel operation started from outside the pool hands its job over
/// and puts the caller to sleep until it is done: two context switches per operation, which in
/// decoding (about 200 small parallel products per token) were 17% of the samples. From a worker
/// the other workers take their part directly. SmolLM2, 512-token prompt, 256 new tokens, 2
/// threads, each token's forward pass on a worker: 24.3 -> 28.7 tokens/s (medians of 5 paired runs).
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
