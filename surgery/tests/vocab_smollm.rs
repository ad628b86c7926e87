//! extend-vocab on SmolLM2-135M-Instruct (byte-level BPE, 49152 tokens) with Ukrainian text, which it
//! tokenises poorly. The model comes from its GGUF (scripts/fetch-smollm2.sh).
use std::path::Path;
use surgeon_formats::tokenizer_extend::tokens_per_char;
use surgeon_surgery::vocab::{self, VocabOptions, EMBED};

fn fixture(name: &str) -> Vec<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/vocab")
        .join(name);
    vocab::read_corpus(&[p]).unwrap()
}

#[test]
fn smollm_ukrainian_tokens_per_char_falls() {
    let plan = surgeon_formats::gguf::open_smollm2().unwrap_or_else(|e| panic!("{e}"));
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
