//! Parameters by HF name: burn's module visitor and mapper, with names looked up in the table that
//! loading recorded ([`super::ParamNames`]). No name is spelled here.
use super::Llama;
use crate::error::{Error, Result};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use surgeon_formats::{HostTensor, Plan, Source, TensorEntry};

/// A parameter seen by [`Llama::visit_named`].
pub struct ParamRef<'a> {
    id: ParamId,
    shape: Vec<usize>,
    data: &'a dyn Fn() -> TensorData,
}

impl ParamRef<'_> {
    pub fn id(&self) -> ParamId {
        self.id
    }
    pub fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }
    /// Number of dimensions (1 for norms and biases, 2 for matrices).
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Values as f32, row-major, in HF layout.
    pub fn to_f32(&self) -> Vec<f32> {
        (self.data)()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 data")
    }
}

/// Rewrites parameters by HF name (see [`Llama::map_named`]). A mapper must keep each
/// parameter's id (the name table is keyed by it).
pub trait NamedParamMapper<B: Backend> {
    fn map<const D: usize>(&mut self, name: &str, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let _ = name;
        p
    }
}

struct Visit<'a, 'f, B: Backend> {
    model: &'a Llama<B>,
    f: &'f mut dyn FnMut(&str, ParamRef<'_>),
}

impl<B: Backend> ModuleVisitor<B> for Visit<'_, '_, B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        let name = self
            .model
            .names
            .get(&p.id)
            .expect("every parameter is named");
        let data = || p.val().into_data();
        let r = ParamRef {
            id: p.id,
            shape: p.val().dims().to_vec(),
            data: &data,
        };
        (self.f)(name, r);
    }
}

struct Map<'m, B: Backend, M> {
    names: super::ParamNames,
    mapper: &'m mut M,
    _b: std::marker::PhantomData<B>,
}

impl<B: Backend, M: NamedParamMapper<B>> ModuleMapper<B> for Map<'_, B, M> {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self
            .names
            .get(&p.id)
            .expect("every parameter is named")
            .to_string();
        let id = p.id;
        let p = self.mapper.map(&name, p);
        debug_assert_eq!(p.id, id, "a NamedParamMapper changed the id of `{name}`");
        p
    }
}

impl<B: Backend> Llama<B> {
    /// Calls `f` with every parameter and its HF tensor name, in model order.
    pub fn visit_named(&self, f: &mut dyn FnMut(&str, ParamRef<'_>)) {
        self.visit(&mut Visit { model: self, f });
    }

    /// Every parameter's id and HF tensor name, in model order.
    pub fn param_names(&self) -> Vec<(ParamId, String)> {
        let mut out = vec![];
        self.visit_named(&mut |n, p| out.push((p.id(), n.to_string())));
        out
    }

    /// Rebuilds the model with every parameter passed through `mapper` together with its HF name.
    pub fn map_named(self, mapper: &mut impl NamedParamMapper<B>) -> Self {
        let names = self.names.clone();
        self.map(&mut Map {
            names,
            mapper,
            _b: std::marker::PhantomData,
        })
    }

    /// Marks parameters whose HF name satisfies `frozen` as not requiring gradients (and the others as
    /// requiring them). Only meaningful under an autodiff backend.
    pub fn freeze_where(self, frozen: impl Fn(&str) -> bool) -> Self {
        struct Freeze<F>(F);
        impl<B: Backend, F: Fn(&str) -> bool> NamedParamMapper<B> for Freeze<F> {
            fn map<const D: usize>(
                &mut self,
                name: &str,
                p: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                p.set_require_grad(!(self.0)(name))
            }
        }
        self.map_named(&mut Freeze(frozen))
    }

    /// Exports the weights into a copy of `base` (same architecture): every tensor becomes an inline f32
    /// [`HostTensor`] labelled `trained`, written later in the dtype `base` declared for it.
    pub fn to_plan(&self, base: &Plan) -> Result<Plan> {
        let mut plan = base.clone();
        let mut problems = vec![];
        self.visit_named(&mut |name, p| {
            let shape = p.shape();
            if let Some(entry) = base.tensors.get(name) {
                if entry.shape() != shape {
                    problems.push(format!(
                        "tensor `{name}`: model has shape {shape:?}, base plan {:?}",
                        entry.shape()
                    ));
                    return;
                }
            }
            let values = p.to_f32();
            let source = Source::inline("trained", HostTensor::from_f32(shape, &values));
            let dtype = base
                .tensors
                .get(name)
                .map_or(surgeon_formats::DType::F32, |e| e.dtype);
            plan.tensors
                .insert(name.to_string(), TensorEntry { source, dtype });
        });
        if !problems.is_empty() {
            return Err(Error::Mismatch {
                origin: base.origin.clone(),
                message: problems.join("; "),
            });
        }
        Ok(plan)
    }
}
