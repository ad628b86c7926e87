//! extend-vocab on SmolLM2-135M-Instruct (byte-level BPE, 49152 tokens) with Ukrainian text, which it
//! tokenises poorly. Skipped (with a message) when the model is not on this machine; set
//! SURGEON_SMOLLM_DIR to a Hugging Face directory of the model to run it elsewhere.
use std::path::{Path, PathBuf};
use surgeon_formats::tokenizer_extend::tokens_per_char;
use surgeon_surgery::vocab::{self, VocabOptions, EMBED};

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var("SURGEON_SMOLLM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/work/cache/smollm2-hf"));
    dir.join("config.json").is_file().then_some(dir)
}

fn fixture(name: &str) -> Vec<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/vocab")
        .join(name);
    vocab::read_corpus(&[p]).unwrap()
}

#[test]
fn smollm_ukrainian_tokens_per_char_falls() {
    let Some(dir) = model_dir() else {
        eprintln!("skipped: SmolLM2 not found (set SURGEON_SMOLLM_DIR)");
        return;
    };
    let plan = surgeon_formats::open_hf_dir(&dir).unwrap();
    let v = plan.arch.vocab_size;
    let train = fixture("uk_train.txt");
    let held = fixture("uk_heldout.txt");
    let old_json = plan.files["tokenizer.json"].read().unwrap();
    let before = tokens_per_char(&old_json, &held).unwrap();
    for n in [256usize, 1024] {
        let (new, report) =
            vocab::extend_with_corpus(&plan, &train, n, &VocabOptions::default()).unwrap();
        assert_eq!(new.arch.vocab_size, v + n);
        let new_json = new.files["tokenizer.json"].read().unwrap();
        let after = tokens_per_char(&new_json, &held).unwrap();
        let train_before = tokens_per_char(&old_json, &train).unwrap();
        let train_after = tokens_per_char(&new_json, &train).unwrap();
        eprintln!(
            "SmolLM2 + {n} Ukrainian merges: held-out tokens/char {before:.4} -> {after:.4} ({:+.1}%), train {train_before:.4} -> {train_after:.4}; examples: {:?}",
            100.0 * (after / before - 1.0),
            report.tokens.iter().take(8).map(|t| t.text.clone()).collect::<Vec<_>>()
        );
        assert!(
            after < before * 0.9,
            "held-out tokens/char {before} -> {after}"
        );
        // English text is untouched by merges learned on Cyrillic.
        let en = vec!["The quick brown fox jumps over the lazy dog.".to_string()];
        assert_eq!(
            tokens_per_char(&old_json, &en).unwrap(),
            tokens_per_char(&new_json, &en).unwrap()
        );
        if n == 256 {
            // Tied embeddings: old rows bitwise unchanged, so old-vocabulary logits are unchanged.
            let (_, a) = plan.load_f32(EMBED).unwrap();
            let (s, b) = new.load_f32(EMBED).unwrap();
            assert_eq!(s, vec![v + n, plan.arch.hidden_size]);
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }
}

/// Writes SmolLM2 extended with 1024 Ukrainian merges to $SURGEON_VOCAB_OUT (for
/// scripts/goldens/vocab_hf_check.py when the CLI is not built); ignored by default.
#[test]
#[ignore]
fn write_extended_smollm() {
    let (Some(dir), Ok(out)) = (model_dir(), std::env::var("SURGEON_VOCAB_OUT")) else {
        eprintln!("skipped: needs SmolLM2 and SURGEON_VOCAB_OUT");
        return;
    };
    let plan = surgeon_formats::open_hf_dir(&dir).unwrap();
    let (new, _) =
        vocab::extend_with_corpus(&plan, &fixture("uk_train.txt"), 1024, &VocabOptions::default())
            .unwrap();
    let opts = surgeon_formats::WriteOptions {
        force: true,
        description: "extend-vocab test: +1024 Ukrainian merges".into(),
        ..Default::default()
    };
    surgeon_formats::write_model(&new, Path::new(&out), &opts).unwrap();
}
