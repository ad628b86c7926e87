//! surgeon: surgery on pretrained language models.
//!
//! The library crates do the work; this crate gathers them under one name for the Rust API and
//! holds the pipeline runner behind `surgeon run`.
pub use surgeon_convert as convert;
pub use surgeon_distill as distill;
pub use surgeon_formats as formats;
pub use surgeon_search as search;
pub use surgeon_surgery as surgery;

/// CLOVER fine-tuning's factors of `student` for [`distill::heal::HealConfig::clover_factors`]
/// (`train` clover): computed by surgeon-convert, which the runtime never imports, and handed over
/// as plain data.
pub fn clover_factors(student: &formats::Plan) -> convert::Result<distill::heal::CloverFactors> {
    let factors = convert::clover_finetune::finetune_factors(student)?;
    Ok(factors
        .into_iter()
        .map(|f| {
            let b = distill::model::BlockFactors {
                block: f.block,
                basis: f.basis,
                core: f.core,
                left: f.left,
            };
            (f.module, b)
        })
        .collect())
}
