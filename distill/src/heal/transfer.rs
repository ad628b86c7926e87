//! Attention transfer (LoLCATs stage 1): every layer converted to Hedgehog attention learns to
//! reproduce the softmax attention it replaced. The teacher (the original model) runs once; each
//! converted layer's attention input is taken from it, and the loss is the mean over those layers
//! of the mean squared error between the teacher's softmax attention output and the student's
//! linear attention output on that same input (per-head outputs, before `o_proj`, as the
//! reference compares them; the reference's x1000 factor is left out: AdamW does not see it).
//! With [`LossKind::AttentionWeights`] the per-layer term is Hedgehog's instead: the cross-entropy
//! of the student's attention weights under the teacher's softmax weights, averaged over rows.
use crate::heal::LossKind;
use crate::model::Llama;
use crate::model::Positions;
use crate::probe::Probe;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};

/// Layers of `model` whose attention is Hedgehog.
pub fn converted_layers<B: Backend>(model: &Llama<B>) -> Vec<usize> {
    (0..model.layers.len())
        .filter(|&l| {
            model.layers[l]
                .self_attn()
                .is_some_and(|a| a.hedgehog.is_some())
        })
        .collect()
}

/// Captures the attention inputs of chosen layers.
struct AttentionInputs<'a, B: Backend> {
    layers: &'a [usize],
    got: Vec<(usize, Tensor<B, 3>)>,
}

impl<B: Backend> Probe<B> for AttentionInputs<'_, B> {
    fn attention_input(&mut self, l: usize, x: &Tensor<B, 3>) {
        if self.layers.contains(&l) {
            self.got.push((l, x.clone()));
        }
    }
}

/// The attention-transfer loss of `student` on `input` `[B, T]` (see the module docs).
pub fn attention_transfer_loss<B: AutodiffBackend>(
    student: &Llama<B>,
    teacher: &Llama<B::InnerBackend>,
    input: Tensor<B, 2, Int>,
    loss: LossKind,
) -> Tensor<B, 1> {
    let layers = converted_layers(student);
    let last = *layers
        .last()
        .expect("checked by HealPlan: the student has Hedgehog layers");
    let t = input.dims()[1];
    let device = input.device();
    let mut probe = AttentionInputs {
        layers: &layers,
        got: vec![],
    };
    let x = teacher.embed(input.inner());
    teacher.layers_probed(x, 0..last + 1, None, &mut probe);
    let pos_t = Positions::new(teacher, 0..last + 1, 0, t, &device);
    let pos_s = Positions::new(student, 0..last + 1, 0, t, &device);
    let mut total: Option<Tensor<B, 1>> = None;
    for (l, x) in probe.got {
        let soft = teacher.layers[l].self_attn().expect("checked by HealPlan");
        let lin = student.layers[l].self_attn().expect("converted layer");
        let term = match loss {
            LossKind::AttentionWeights => {
                let want = Tensor::<B, 4>::from_inner(soft.softmax_weights(x.clone(), &pos_t));
                let (q, k, _) = lin.qkv(Tensor::from_inner(x), &pos_s);
                let hh = lin.hedgehog.as_ref().expect("converted layer");
                let got = hh.attention_weights(q, lin.repeat_kv(k));
                // -sum_j p_j log q_j per row; masked entries have p = 0 (q is floored to stay finite).
                let ce = (want * got.clamp_min(1e-30).log()).sum_dim(3).neg();
                ce.mean()
            }
            _ => {
                let want = Tensor::<B, 3>::from_inner(soft.heads(x.clone(), &pos_t, None));
                let got = lin.heads(Tensor::from_inner(x), &pos_s, None);
                (got - want).powi_scalar(2).mean()
            }
        };
        total = Some(match total {
            Some(sum) => sum + term,
            None => term,
        });
    }
    total
        .expect("every converted layer reported its input")
        .div_scalar(layers.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heal::select::{resolve, TrainSet};
    use crate::heal::trainer::{load_model, named_params};
    use crate::heal::{heal, Budget, DataSpec, HealConfig, LossKind};
    use crate::model::hedgehog_tests::plans;
    use burn::backend::{Autodiff, Flex};
    use burn::optim::GradientsParams;
    use burn::tensor::TensorData;

    type AD = Autodiff<Flex>;

    fn grad(g: &GradientsParams, id: burn::module::ParamId, rank: usize) -> Option<Vec<f32>> {
        let v = |d: TensorData| d.to_vec::<f32>().unwrap();
        match rank {
            1 => g.get::<Flex, 1>(id).map(|t| v(t.into_data())),
            2 => g.get::<Flex, 2>(id).map(|t| v(t.into_data())),
            _ => g.get::<Flex, 3>(id).map(|t| v(t.into_data())),
        }
    }

    /// Names of `trainable` parameters that get a non-zero gradient from the loss, after checking
    /// that frozen ones get none.
    fn reached(trainable: &dyn Fn(&str) -> bool, kind: LossKind) -> Vec<String> {
        let (teacher, student) = plans(4);
        let dev = Default::default();
        let s = load_model::<AD>(&student, trainable, &dev).unwrap();
        let t = load_model::<Flex>(&teacher, &|_| false, &dev).unwrap();
        let toks: Vec<i64> = (0..24).map(|i| (i * 53 + 7) % 256).collect();
        let input = Tensor::<AD, 2, Int>::from_data(TensorData::new(toks, [2, 12]), &dev);
        let loss = attention_transfer_loss(&s, &t, input, kind);
        assert!(loss.clone().into_scalar() > 0.0);
        let grads = GradientsParams::from_grads(loss.backward(), &s);
        let mut out = vec![];
        for (id, name, rank) in named_params(&s) {
            match grad(&grads, id, rank) {
                None => {}
                Some(_) if !trainable(&name) => panic!("{name} is frozen but has a gradient"),
                Some(g) if g.iter().any(|&x| x != 0.0) => out.push(name),
                Some(_) => {}
            }
        }
        out.sort();
        out
    }

    #[test]
    fn gradients_reach_only_feature_maps_and_mixing_factors() {
        let (_, student) = plans(4);
        let sel = resolve(&student, &TrainSet::FeatureMaps).unwrap();
        assert_eq!(sel.names.len(), 6, "{:?}", sel.names);
        for kind in [LossKind::AttentionTransfer, LossKind::AttentionWeights] {
            assert_eq!(reached(&|n| sel.contains(n), kind), sel.names, "{kind:?}");
        }
        // Even with every tensor trainable, the loss reads only the converted attentions'
        // q/k/v projections, feature maps and factors (inputs come from the teacher).
        let all = reached(&|_| true, LossKind::AttentionTransfer);
        let allowed = [
            "q_proj",
            "k_proj",
            "v_proj",
            "feature_map",
            "window_factors",
        ];
        assert!(
            all.iter().all(|n| allowed.iter().any(|a| n.contains(a))),
            "{all:?}"
        );
        assert!(all.len() > sel.names.len());
    }

    /// Hedgehog's objective is a cross-entropy: at least the entropy of the teacher's softmax
    /// weights, and equal to it when the hybrid's window covers the sequence (the student then
    /// computes softmax attention exactly).
    #[test]
    fn attention_weight_loss_is_the_teachers_entropy_exactly_when_the_student_is_softmax() {
        let dev = Default::default();
        let toks: Vec<i64> = (0..24).map(|i| (i * 53 + 7) % 256).collect();
        let loss_and_entropy = |window: usize| {
            let (teacher, student) = plans(window);
            let s = load_model::<AD>(&student, &|_| false, &dev).unwrap();
            let t = load_model::<Flex>(&teacher, &|_| false, &dev).unwrap();
            let input =
                Tensor::<AD, 2, Int>::from_data(TensorData::new(toks.clone(), [2, 12]), &dev);
            let loss = attention_transfer_loss(&s, &t, input.clone(), LossKind::AttentionWeights)
                .into_scalar() as f64;
            let pos = Positions::new(&t, 0..t.layers.len(), 0, 12, &dev);
            let mut probe = AttentionInputs {
                layers: &converted_layers(&s),
                got: vec![],
            };
            t.layers_probed(t.embed(input.inner()), 0..t.layers.len(), None, &mut probe);
            let n = probe.got.len() as f64;
            let entropy: f64 = probe
                .got
                .into_iter()
                .map(|(l, x)| {
                    let p = t.layers[l].self_attn().unwrap().softmax_weights(x, &pos);
                    let e = (p.clone() * p.clamp_min(1e-30).log())
                        .sum_dim(3)
                        .neg()
                        .mean();
                    e.into_scalar() as f64
                })
                .sum::<f64>()
                / n;
            (loss, entropy)
        };
        let (exact, entropy) = loss_and_entropy(64);
        assert!(
            (exact - entropy).abs() < 1e-4,
            "{exact} vs entropy {entropy}"
        );
        // Linear attention's weights differ from softmax's (by up to 0.07 here), so the cross-entropy
        // exceeds the entropy by their KL divergence (7.7e-4 here), far above f32 rounding.
        let (linear, entropy) = loss_and_entropy(0);
        assert!(linear > entropy + 1e-4, "{linear} vs entropy {entropy}");
    }

    #[test]
    fn stage_one_trains_feature_maps_only_and_lowers_the_loss() {
        let (teacher, student) = plans(4);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("stage1");
        let docs: Vec<Vec<u32>> = (0..24u32)
            .map(|d| (0..40).map(|i| (d * 31 + i * 17) % 253 + 3).collect())
            .collect();
        let cfg = HealConfig {
            data: DataSpec::Tokens(docs),
            out: out.clone(),
            loss: LossKind::AttentionTransfer,
            train: TrainSet::FeatureMaps,
            budget: Budget::Steps(12),
            seq_len: 16,
            batch: 2,
            lr: 5e-2,
            ..Default::default()
        };
        let r = heal(&cfg, student.clone(), Some(teacher.clone())).unwrap();
        assert_eq!(r.trainable_tensors.len(), 6);
        let healed = surgeon_formats::open_hf_dir(&out).unwrap();
        // The loss on a fixed batch (not the training batches) goes down.
        let dev = Default::default();
        let t = load_model::<Flex>(&teacher, &|_| false, &dev).unwrap();
        let fixed = |p: &surgeon_formats::Plan| {
            let s = load_model::<AD>(p, &|_| false, &dev).unwrap();
            let toks: Vec<i64> = (0..32).map(|i| (i * 29 + 5) % 256).collect();
            let x = Tensor::<AD, 2, Int>::from_data(TensorData::new(toks, [2, 16]), &dev);
            attention_transfer_loss(&s, &t, x, LossKind::AttentionTransfer).into_scalar()
        };
        let (before, after) = (fixed(&student), fixed(&healed));
        assert!(after < 0.9 * before, "held-out loss {before} -> {after}");
        for name in student.tensors.keys() {
            let (a, b) = (
                student.load_f32(name).unwrap().1,
                healed.load_f32(name).unwrap().1,
            );
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert_eq!(same, !r.trainable_tensors.contains(name), "{name}");
        }
    }
}
