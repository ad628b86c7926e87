//! SmolLM2-135M-Instruct against transformers float32 goldens (`scripts/goldens/runtime_goldens.py`).
//!
//! The model is opened from its GGUF (`$SURGEON_SMOLLM2_GGUF`, default
//! `$SURGEON_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf`, see `scripts/fetch-smollm2.sh`) through `surgeon_formats::open_model`. Where that
//! build's GGUF importer cannot open it, `$SURGEON_SMOLLM2_HF` may name the same model as a Hugging Face
//! directory instead. Without either file the tests are skipped with a message.
use burn::tensor::{Int, Tensor, TensorData};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use surgeon_distill::burn;
use surgeon_distill::generate::{generate, GenerateOptions};
use surgeon_distill::model::Llama;
use surgeon_distill::text::{self, ChatTemplate, Message};
use surgeon_formats::Plan;

type B = burn::backend::Flex;

/// Opens SmolLM2 from its GGUF (`scripts/fetch-smollm2.sh`); fails, saying how to fetch it, if absent.
fn open_smollm2() -> Option<Plan> {
    Some(surgeon_formats::gguf::open_smollm2().unwrap_or_else(|e| panic!("{e}")))
}

struct Fixture {
    plan: Plan,
    model: Llama<B>,
}

fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let plan = open_smollm2()?;
        let model = Llama::from_plan(&plan, &Default::default()).expect("load SmolLM2");
        Some(Fixture { plan, model })
    })
    .as_ref()
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/runtime")
}

fn golden(name: &str) -> serde_json::Value {
    let p = fixtures_dir().join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn read_f32(file: &str) -> Vec<f32> {
    std::fs::read(fixtures_dir().join(file))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn ids_of(g: &serde_json::Value) -> Vec<u32> {
    g["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn usizes(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect()
}

fn check_logits(name: &str) {
    let Some(f) = fixture() else { return };
    let g = golden(name);
    let ids = ids_of(&g);
    let v = g["vocab_size"].as_u64().unwrap() as usize;
    let t = ids.len();
    let input: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(input, [1, t]), &Default::default());
    let start = std::time::Instant::now();
    let logits: Vec<f32> = f
        .model
        .forward(input)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    eprintln!(
        "{name}: {t} tokens in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(logits.len(), t * v);
    let mut worst = 0f32;
    let full = read_f32(g["full_file"].as_str().unwrap());
    for (k, &p) in usizes(&g["full_positions"]).iter().enumerate() {
        for c in 0..v {
            worst = worst.max((logits[p * v + c] - full[k * v + c]).abs());
        }
    }
    let cols = usizes(&g["columns"]);
    let sub = read_f32(g["cols_file"].as_str().unwrap());
    for p in 0..t {
        for (k, &c) in cols.iter().enumerate() {
            worst = worst.max((logits[p * v + c] - sub[p * cols.len() + k]).abs());
        }
    }
    eprintln!("{name}: max |logit - transformers| = {worst:e}");
    assert!(
        worst <= 1e-3,
        "{name}: logits differ from transformers by {worst}"
    );
}

#[test]
fn logits_match_transformers_short() {
    check_logits("short");
}

#[test]
fn logits_match_transformers_chat() {
    check_logits("chat");
}

#[test]
fn logits_match_transformers_long_512() {
    check_logits("long");
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let Some(f) = fixture() else { return };
    let tok = text::load_tokenizer(&f.plan).unwrap();
    let short = golden("short");
    assert_eq!(
        text::encode(&tok, short["text"].as_str().unwrap()).unwrap(),
        ids_of(&short)
    );
    let chat = golden("chat");
    let rendered = ChatTemplate::from_plan(&f.plan)
        .unwrap()
        .render(&[Message::user("What is the capital of France?")], true)
        .unwrap();
    assert_eq!(rendered, chat["text"].as_str().unwrap());
    assert_eq!(text::encode(&tok, &rendered).unwrap(), ids_of(&chat));
}

#[test]
fn greedy_chat_answers_paris() {
    let Some(f) = fixture() else { return };
    let chat = golden("chat");
    let tok = text::load_tokenizer(&f.plan).unwrap();
    let want: Vec<u32> = usizes(&chat["greedy_new_ids"])
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: want.len(),
        stop_tokens: text::stop_tokens(&f.plan, &tok),
        ..Default::default()
    };
    let r = generate(&f.model, &ids_of(&chat), &opts, &mut |_| true);
    let text = tok.decode(&r.tokens, true).unwrap();
    eprintln!("answer: {text:?} ({:.1} tokens/s)", r.tokens_per_s);
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(
        r.tokens,
        want[..r.tokens.len()],
        "greedy tokens differ from transformers"
    );
}
