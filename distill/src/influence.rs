//! Block influence of decoder layers (ShortGPT, arXiv 2403.03853): `1 - cos(hidden in, hidden out)`
//! of each layer, averaged over the tokens of calibration text. Layers that barely change the
//! residual stream score near 0 and are the first candidates for `surgeon drop-layers --count`.
use crate::error::{Error, Result};
use crate::model::Llama;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

fn to_f32<B: Backend>(x: Tensor<B, 3>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

/// Influence of every layer of `model` on token ids `ids`, run in independent windows of at most
/// `window` tokens (positions restart at 0 in each window). Each score lies in `[0, 2]`; the
/// average is over all tokens.
pub fn block_influences<B: Backend>(
    model: &Llama<B>,
    ids: &[u32],
    window: usize,
) -> Result<Vec<f64>> {
    if ids.is_empty() {
        return Err(Error::Invalid(
            "no calibration tokens to score layers on".into(),
        ));
    }
    if window == 0 {
        return Err(Error::Invalid("the scoring window must be positive".into()));
    }
    let device = model.device();
    let n = model.layers.len();
    let mut sums = vec![0f64; n];
    for chunk in ids.chunks(window) {
        let t = chunk.len();
        let toks = Tensor::<B, 2, Int>::from_data(
            TensorData::new(chunk.iter().map(|&x| x as i64).collect(), [1, t]),
            &device,
        );
        let mut x = model.embed(toks);
        let mut x_host = to_f32(x.clone());
        for (i, sum) in sums.iter_mut().enumerate() {
            let y = model.layers_forward(x, i..i + 1, None);
            let y_host = to_f32(y.clone());
            let hidden = y.dims()[2];
            let bi = surgeon_surgery::block_influence(&x_host, &y_host, hidden)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            *sum += bi * t as f64;
            x = y;
            x_host = y_host;
        }
    }
    Ok(sums.into_iter().map(|s| s / ids.len() as f64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use surgeon_formats::synthetic::SyntheticSpec;
    type B = burn::backend::Flex;

    #[test]
    fn scores_are_finite_and_in_range() {
        let plan = SyntheticSpec {
            num_layers: 4,
            ..SyntheticSpec::tiny()
        }
        .plan();
        let model = Llama::<B>::from_plan(&plan, &Default::default()).unwrap();
        let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 256).collect();
        let s = block_influences(&model, &ids, 16).unwrap();
        assert_eq!(s.len(), 4);
        assert!(
            s.iter().all(|x| x.is_finite() && (0.0..=2.0).contains(x)),
            "{s:?}"
        );
        assert!(s.iter().any(|&x| x > 0.0), "{s:?}");
        // One window or several: same shape of result, still in range.
        let one = block_influences(&model, &ids, 64).unwrap();
        assert!(one.iter().all(|x| (0.0..=2.0).contains(x)));
        assert!(block_influences(&model, &[], 8).is_err());
        assert!(block_influences(&model, &ids, 0).is_err());
    }
}
