//! extend-vocab: tokenizer surgery (byte-level and SentencePiece-style BPE) and embedding resizing.
use serde_json::Value;
use std::sync::Arc;
use surgeon_formats::plan::{AuxFile, Plan};
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::tokenizer_extend::{self, TokenizerStyle};
use surgeon_surgery::vocab::{self, Init, VocabOptions, EMBED, LM_HEAD};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{
    AddedToken, NormalizerWrapper, PostProcessorWrapper, TokenizerBuilder, TokenizerImpl,
};

const ENGLISH: &str = "The quick brown fox jumps over the lazy dog. \
A model is a lazy plan of tensors; the writer streams them to disk. \
Every operator rewrites the plan and the writer materialises it, tensor by tensor. \
The tokenizer splits text into words and the words into tokens. \
Surgery on pretrained language models: reshape a checkpoint, then heal it by training.";

fn english_lines() -> Vec<String> {
    ENGLISH
        .split(". ")
        .map(|s| s.to_string())
        .chain((0..20).map(|i| format!("line {i} of the training text for the tokenizer")))
        .collect()
}

/// A tiny GPT-2-style byte-level BPE (256 byte symbols + merges), trained here.
fn byte_level_json(vocab_size: usize) -> Vec<u8> {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        ByteLevel,
        PostProcessorWrapper,
        ByteLevelDecoder,
    > = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(None)
        .with_decoder(Some(ByteLevelDecoder::default()))
        .build()
        .unwrap();
    tok.train(&mut trainer, english_lines().iter()).unwrap();
    tok.to_string(false).unwrap().into_bytes()
}

/// A tiny SentencePiece-style BPE: `▁` for spaces (Metaspace), `<unk>`, `<s>`, `</s>`, 256 byte-fallback
/// pieces `<0x00>`..`<0xFF>`, then characters and merges.
fn sentencepiece_json(vocab_size: usize) -> Vec<u8> {
    let mut specials = vec![
        AddedToken::from("<unk>", true),
        AddedToken::from("<s>", true),
        AddedToken::from("</s>", true),
    ];
    specials.extend((0..256).map(|b| AddedToken::from(format!("<0x{b:02X}>"), true)));
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .build();
    let model = BPE::builder()
        .unk_token("<unk>".into())
        .byte_fallback(true)
        .build()
        .unwrap();
    let mut tok: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        Metaspace,
        PostProcessorWrapper,
        MetaspaceDecoder,
    > = TokenizerBuilder::new()
        .with_model(model)
        .with_normalizer(None)
        .with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, true)))
        .with_post_processor(None)
        .with_decoder(Some(MetaspaceDecoder::new('▁', PrependScheme::First, true)))
        .build()
        .unwrap();
    tok.train(&mut trainer, english_lines().iter()).unwrap();
    let mut v: Value = serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
    // Byte pieces are ordinary vocabulary entries in SentencePiece conversions, not added tokens.
    let added: Vec<Value> = v["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["content"].as_str().unwrap().starts_with("<0x"))
        .cloned()
        .collect();
    v["added_tokens"] = Value::Array(added);
    // Llama-2 layout (as converted by transformers): the normalizer adds `▁`, no pre-tokenizer, and
    // the decoder turns byte pieces back into UTF-8.
    v["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]});
    v["pre_tokenizer"] = Value::Null;
    v["decoder"] = serde_json::json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
    v["model"]["byte_fallback"] = Value::Bool(true);
    v["model"]["unk_token"] = Value::String("<unk>".into());
    serde_json::to_vec(&v).unwrap()
}

fn vocab_len(json: &[u8]) -> usize {
    let v: Value = serde_json::from_slice(json).unwrap();
    v["model"]["vocab"].as_object().unwrap().len()
}

fn model_with(json: Vec<u8>, tied: bool) -> Plan {
    let mut spec = SyntheticSpec::tiny();
    spec.vocab_size = vocab_len(&json);
    spec.tie_word_embeddings = tied;
    let mut plan = spec.plan();
    plan.files
        .insert("tokenizer.json".into(), AuxFile::Bytes(Arc::new(json)));
    plan
}

fn rows(plan: &Plan, name: &str) -> (Vec<usize>, Vec<f32>) {
    plan.load_f32(name).unwrap()
}

/// Old rows are bitwise equal; returns the new matrix.
fn assert_old_rows_unchanged(old: &Plan, new: &Plan, name: &str) -> Vec<f32> {
    let (s0, a) = rows(old, name);
    let (s1, b) = rows(new, name);
    assert_eq!(s0[1], s1[1]);
    let n = s0[0] * s0[1];
    assert!(
        a.iter()
            .zip(&b[..n])
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "{name}: old rows changed"
    );
    b
}

fn mean_of(m: &[f32], h: usize, ids: &[u32]) -> Vec<f32> {
    let mut acc = vec![0f64; h];
    for &i in ids {
        for (a, x) in acc.iter_mut().zip(&m[i as usize * h..(i as usize + 1) * h]) {
            *a += *x as f64;
        }
    }
    acc.iter().map(|a| (a / ids.len() as f64) as f32).collect()
}

fn tok_json(plan: &Plan) -> Vec<u8> {
    plan.files["tokenizer.json"].read().unwrap()
}

#[test]
fn detects_styles_and_rejects_other_models() {
    assert_eq!(
        tokenizer_extend::detect_style(&byte_level_json(300)).unwrap(),
        TokenizerStyle::ByteLevel
    );
    assert_eq!(
        tokenizer_extend::detect_style(&sentencepiece_json(330)).unwrap(),
        TokenizerStyle::SentencePiece
    );
    for ty in ["WordPiece", "Unigram", "WordLevel"] {
        let json = format!(
            r#"{{"version":"1.0","added_tokens":[],"model":{{"type":"{ty}","vocab":{{}}}}}}"#
        );
        let err = tokenizer_extend::detect_style(json.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("unsupported tokenizer type `{ty}`")),
            "{err}"
        );
        assert!(!err.contains('\n'));
        let mut plan = model_with(byte_level_json(300), true);
        plan.files.insert(
            "tokenizer.json".into(),
            AuxFile::Bytes(Arc::new(json.into_bytes())),
        );
        let err = vocab::extend_with_tokens(&plan, &["abc".into()], &VocabOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unsupported tokenizer type"), "{err}");
    }
}

#[test]
fn added_tokens_keep_old_rows_and_zip_tie_new_ones() {
    let json = byte_level_json(300);
    let plan = model_with(json.clone(), false);
    let v = plan.arch.vocab_size;
    let tokens: Vec<String> = [
        "surgeon extend-vocab",
        " zyzzyva",
        "e",
        "qqq",
        "qqq",
        "<|endoftext|>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (new, report) =
        vocab::extend_with_tokens(&plan, &tokens, &VocabOptions::default()).unwrap();
    let added: Vec<&str> = report.tokens.iter().map(|t| t.content.as_str()).collect();
    assert_eq!(added, ["surgeon extend-vocab", " zyzzyva", "qqq"]);
    let skipped: Vec<&str> = report.skipped.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        skipped,
        ["e", "qqq", "<|endoftext|>"],
        "{:?}",
        report.skipped
    );
    assert_eq!(report.old_vocab, v);
    assert_eq!(new.arch.vocab_size, v + 3);
    assert_eq!(
        new.arch.surgeon.new_token_ids,
        vec![v as u32, v as u32 + 1, v as u32 + 2]
    );
    assert!(new.check().is_empty(), "{:?}", new.check());
    let h = plan.arch.hidden_size;
    for name in [EMBED, LM_HEAD] {
        let (_, old_m) = rows(&plan, name);
        let m = assert_old_rows_unchanged(&plan, &new, name);
        for t in &report.tokens {
            // zip-tie: the mean of the rows of the old encoding, in the same matrix.
            assert_eq!(
                t.old_ids,
                tokenizer_extend::encode(&json, &t.content).unwrap()
            );
            let want = mean_of(&old_m, h, &t.old_ids);
            let got = &m[t.id as usize * h..(t.id as usize + 1) * h];
            assert_eq!(got, &want[..], "{name} row of {:?}", t.content);
        }
    }
    // The new tokenizer: old ids unchanged, new tokens encode to their ids and round-trip.
    let tj = tok_json(&new);
    let text = "use surgeon extend-vocab on zyzzyva qqq";
    let ids = tokenizer_extend::encode(&tj, text).unwrap();
    assert!(
        ids.contains(&(v as u32)) && ids.contains(&(v as u32 + 2)),
        "{ids:?}"
    );
    assert_eq!(tokenizer_extend::decode(&tj, &ids).unwrap(), text);
    let plain = "the lazy dog";
    assert_eq!(
        tokenizer_extend::encode(&tj, plain).unwrap(),
        tokenizer_extend::encode(&json, plain).unwrap()
    );
}

#[test]
fn a_single_old_token_group_is_an_exact_copy() {
    let plan = model_with(byte_level_json(300), true);
    let h = plan.arch.hidden_size;
    let e = &plan.get(EMBED).unwrap().source;
    let v = plan.arch.vocab_size;
    let src = vocab::new_rows(e, v, &[vec![7], vec![42, 43]], 0, Init::ZipTie, 0).unwrap();
    let got = src.eval().unwrap().to_f32();
    let (_, m) = rows(&plan, EMBED);
    let bits = |s: &[f32]| s.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got[..h]), bits(&m[7 * h..8 * h]));
    assert_eq!(&got[h..], &mean_of(&m, h, &[42, 43])[..]);
}

#[test]
fn mean_random_and_padding() {
    let plan = model_with(byte_level_json(300), true);
    let v = plan.arch.vocab_size;
    let h = plan.arch.hidden_size;
    let (_, m) = rows(&plan, EMBED);
    let all: Vec<u32> = (0..v as u32).collect();
    let mean = mean_of(&m, h, &all);
    let toks = vec!["zyzzyva".to_string(), "qqqq".to_string()];
    let opts = VocabOptions {
        init: Init::Mean,
        pad_to_multiple: Some(64),
        ..Default::default()
    };
    let (new, report) = vocab::extend_with_tokens(&plan, &toks, &opts).unwrap();
    assert_eq!(new.arch.vocab_size % 64, 0);
    assert_eq!(new.arch.vocab_size, v + 2 + report.padding_rows);
    assert!(report.padding_rows > 0);
    assert_eq!(new.arch.surgeon.new_token_ids, vec![v as u32, v as u32 + 1]);
    let b = assert_old_rows_unchanged(&plan, &new, EMBED);
    for r in v..new.arch.vocab_size {
        assert_eq!(&b[r * h..(r + 1) * h], &mean[..], "row {r}");
    }
    assert!(
        new.arch.surgeon.history[0].contains("padded with"),
        "{:?}",
        new.arch.surgeon.history
    );

    let opts = VocabOptions {
        init: Init::Random { seed: 3 },
        ..Default::default()
    };
    let toks: Vec<String> = (0..40).map(|i| format!("zz{i}qq")).collect();
    let (new, _) = vocab::extend_with_tokens(&plan, &toks, &opts).unwrap();
    let b = assert_old_rows_unchanged(&plan, &new, EMBED);
    let fresh = &b[v * h..];
    let std = |x: &[f32]| {
        let mu = x.iter().map(|&a| a as f64).sum::<f64>() / x.len() as f64;
        (x.iter().map(|&a| (a as f64 - mu).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
    };
    let (s_old, s_new) = (std(&m), std(fresh));
    assert!((s_new / s_old - 1.0).abs() < 0.1, "std {s_new} vs {s_old}");
}

fn check_learned(json: &[u8], corpus: &[String], n: usize, probe: &str) {
    let plan = model_with(json.to_vec(), false);
    let v = plan.arch.vocab_size;
    let (new, report) =
        vocab::extend_with_corpus(&plan, corpus, n, &VocabOptions::default()).unwrap();
    assert_eq!(report.tokens.len(), n);
    assert_eq!(new.arch.vocab_size, v + n);
    let ids: Vec<u32> = report.tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, (v as u32..(v + n) as u32).collect::<Vec<_>>());
    assert_eq!(new.arch.surgeon.new_token_ids, ids);

    // tokenizer.json: old vocabulary and merges are a prefix of the new ones.
    let old_v: Value = serde_json::from_slice(json).unwrap();
    let tj = tok_json(&new);
    let new_v: Value = serde_json::from_slice(&tj).unwrap();
    for (tok, id) in old_v["model"]["vocab"].as_object().unwrap() {
        assert_eq!(&new_v["model"]["vocab"][tok], id, "{tok}");
    }
    let (om, nm) = (
        old_v["model"]["merges"].as_array().unwrap(),
        new_v["model"]["merges"].as_array().unwrap(),
    );
    assert_eq!(&nm[..om.len()], &om[..]);
    assert_eq!(nm.len(), om.len() + report.merges_added);
    for t in &report.tokens {
        assert_eq!(new_v["model"]["vocab"][&t.content], t.id);
    }

    // The corpus gets shorter, text still round-trips.
    let before = tokenizer_extend::tokens_per_char(json, corpus).unwrap();
    let after = tokenizer_extend::tokens_per_char(&tj, corpus).unwrap();
    assert!(after < before, "tokens/char {before} -> {after}");
    let ids = tokenizer_extend::encode(&tj, probe).unwrap();
    assert!(ids.iter().any(|&i| i as usize >= v), "{probe}: {ids:?}");
    assert_eq!(tokenizer_extend::decode(&tj, &ids).unwrap(), probe);

    // Embeddings: old rows bitwise, new rows zip-tie of the old encoding of the token.
    let h = plan.arch.hidden_size;
    for name in [EMBED, LM_HEAD] {
        let (_, old_m) = rows(&plan, name);
        let m = assert_old_rows_unchanged(&plan, &new, name);
        for t in &report.tokens {
            assert!(!t.old_ids.is_empty());
            let got = &m[t.id as usize * h..(t.id as usize + 1) * h];
            assert_eq!(got, &mean_of(&old_m, h, &t.old_ids)[..]);
        }
    }
}

fn domain_corpus() -> Vec<String> {
    (0..30)
        .map(|i| format!("zorblax quuxifier zorblax frobnicate quuxifier {i} frobnicate zorblaxes"))
        .collect()
}

#[test]
fn learned_merges_extend_byte_level_bpe() {
    check_learned(
        &byte_level_json(300),
        &domain_corpus(),
        12,
        "a zorblax quuxifier",
    );
}

#[test]
fn learned_merges_extend_sentencepiece_bpe() {
    let json = sentencepiece_json(330);
    check_learned(&json, &domain_corpus(), 12, "a zorblax quuxifier");
    // No learned token glues a word onto the next word start.
    let plan = model_with(json, true);
    let (_, report) =
        vocab::extend_with_corpus(&plan, &domain_corpus(), 12, &VocabOptions::default()).unwrap();
    assert!(report
        .tokens
        .iter()
        .all(|t| !t.content.chars().skip(1).any(|c| c == '▁')));
    // Byte-fallback text (characters outside the vocabulary) still round-trips.
    let (new, _) =
        vocab::extend_with_tokens(&plan, &["zorblax".into()], &VocabOptions::default()).unwrap();
    let tj = tok_json(&new);
    let text = "zorblax ünïcödé ✓";
    let ids = tokenizer_extend::encode(&tj, text).unwrap();
    assert_eq!(tokenizer_extend::decode(&tj, &ids).unwrap(), text);
}

#[test]
fn clear_errors() {
    let plan = model_with(byte_level_json(300), true);
    let opts = VocabOptions::default();
    let one_line = |e: surgeon_surgery::Error| {
        let s = e.to_string();
        assert!(!s.contains('\n'), "{s}");
        s
    };
    // Empty token file.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("tokens.txt");
    std::fs::write(&f, "\n\n").unwrap();
    let e = one_line(vocab::read_token_file(&f).unwrap_err());
    assert!(e.contains("token file is empty"), "{e}");
    let e = one_line(vocab::extend_with_tokens(&plan, &[], &opts).err().unwrap());
    assert!(e.contains("empty"), "{e}");
    // Every token exists already.
    let e = one_line(
        vocab::extend_with_tokens(&plan, &["e".into(), "e".into()], &opts)
            .err()
            .unwrap(),
    );
    assert!(e.contains("already exist"), "{e}");
    // N = 0.
    let e = one_line(
        vocab::extend_with_corpus(&plan, &domain_corpus(), 0, &opts)
            .err()
            .unwrap(),
    );
    assert!(e.contains("at least 1"), "{e}");
    // A corpus too small for N merges says how many it yields.
    let e = one_line(
        vocab::extend_with_corpus(&plan, &["zq zq zq".to_string()], 5, &opts)
            .err()
            .unwrap(),
    );
    assert!(e.contains("yields only 2 new tokens"), "{e}");
    assert!(e.contains("fewer than the 5"), "{e}");
    // No tokenizer.
    let mut bare = plan.clone();
    bare.files.clear();
    let e = one_line(
        vocab::extend_with_tokens(&bare, &["abc".into()], &opts)
            .err()
            .unwrap(),
    );
    assert!(e.contains("no tokenizer.json"), "{e}");
    // Tokenizer and embedding disagree.
    let mut spec = SyntheticSpec::tiny();
    spec.vocab_size = 512;
    let mut padded = spec.plan();
    padded.files = plan.files.clone();
    let e = one_line(
        vocab::extend_with_tokens(&padded, &["abc".into()], &opts)
            .err()
            .unwrap(),
    );
    assert!(e.contains("embedding has 512 rows"), "{e}");
}

#[test]
fn written_model_reloads_with_new_vocab() {
    let plan = model_with(byte_level_json(300), true);
    let (new, _) =
        vocab::extend_with_corpus(&plan, &domain_corpus(), 8, &VocabOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    surgeon_formats::write_model(&new, &out, &Default::default()).unwrap();
    let back = surgeon_formats::open_hf_dir(&out).unwrap();
    assert_eq!(back.arch.vocab_size, plan.arch.vocab_size + 8);
    assert_eq!(
        back.arch.surgeon.new_token_ids,
        new.arch.surgeon.new_token_ids
    );
    assert_old_rows_unchanged(&plan, &back, EMBED);
    let tj = std::fs::read(out.join("tokenizer.json")).unwrap();
    assert_eq!(tj, tok_json(&new));
}

#[test]
fn merges_written_as_strings_stay_strings() {
    let json = byte_level_json(300);
    let mut v: Value = serde_json::from_slice(&json).unwrap();
    let as_strings: Vec<Value> = v["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            Value::String(format!(
                "{} {}",
                m[0].as_str().unwrap(),
                m[1].as_str().unwrap()
            ))
        })
        .collect();
    v["model"]["merges"] = Value::Array(as_strings);
    let old_strings = serde_json::to_vec(&v).unwrap();
    let a = tokenizer_extend::learn_merges(&json, &domain_corpus(), 10, 2).unwrap();
    let b = tokenizer_extend::learn_merges(&old_strings, &domain_corpus(), 10, 2).unwrap();
    let nv: Value = serde_json::from_slice(&b.tokenizer_json).unwrap();
    assert!(nv["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .all(Value::is_string));
    assert_eq!(a.tokens, b.tokens);
    let text = "zorblax quuxifier frobnicate";
    assert_eq!(
        tokenizer_extend::encode(&a.tokenizer_json, text).unwrap(),
        tokenizer_extend::encode(&b.tokenizer_json, text).unwrap()
    );
}
