//! Heterogeneous models: per-layer shapes in the plan, the export dialect each model gets
//! (native, nemotron-nas, surgeon), and reading all three back.
use serde_json::Value;
use std::path::{Path, PathBuf};
use surgeon_formats::config::{config_json, parse_config};
use surgeon_formats::export::{choose_export, intermediate_size_from_ffn_mult, ExportFormat};
use surgeon_formats::synthetic::{SyntheticSpec, Variant};
use surgeon_formats::writer::WriteOptions;
use surgeon_formats::{open_hf_dir, write_model, DType, Family, Mlp, Plan};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/hetero")
        .join(name)
}

fn variant_plan(v: Variant) -> Plan {
    let spec = SyntheticSpec::hetero();
    spec.plan_of(spec.variant_arch(v))
}

fn write(plan: &Plan, dir: &Path) {
    write_model(plan, dir, &WriteOptions::default()).unwrap();
}

#[test]
fn each_variant_gets_the_most_widely_loadable_dialect() {
    let expected = [
        (Variant::Uniform, ExportFormat::Native(Family::Llama)),
        (Variant::MlpWidths, ExportFormat::NemotronNas),
        (Variant::OddMlpWidths, ExportFormat::Surgeon),
        (Variant::KvGroups, ExportFormat::NemotronNas),
        (Variant::NoOpAttention, ExportFormat::NemotronNas),
        (Variant::NoOpMlp, ExportFormat::NemotronNas),
        (Variant::VHeadDim, ExportFormat::Surgeon),
        (Variant::Mixed, ExportFormat::Surgeon),
    ];
    for (v, format) in expected {
        let choice = choose_export(&variant_plan(v).arch);
        assert_eq!(choice.format, format, "{v:?}: {}", choice.reason);
    }
    let odd = choose_export(&variant_plan(Variant::OddMlpWidths).arch);
    assert!(
        odd.reason
            .contains("layer 1: MLP width 224 is not a multiple of 256"),
        "{}",
        odd.reason
    );
    let v = choose_export(&variant_plan(Variant::VHeadDim).arch);
    assert!(
        v.reason
            .contains("layer 0: value head size 8 differs from query/key head size 16"),
        "{}",
        v.reason
    );
}

/// Every file of a written model, with each safetensors header's `__metadata__` (provenance: where
/// the model was read from) removed; the model card (which names the source) is left out.
fn model_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "README.md")
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).unwrap();
            let bytes = if n.ends_with(".safetensors") {
                without_metadata(&bytes)
            } else {
                bytes
            };
            (n, bytes)
        })
        .collect()
}

fn without_metadata(bytes: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert!(header.remove("__metadata__").is_some());
    let mut out = serde_json::to_vec(&header).unwrap();
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

#[test]
fn write_read_write_is_bitwise_identical_for_every_variant() {
    let tmp = tempfile::tempdir().unwrap();
    for v in Variant::ALL {
        let (a, b) = (
            tmp.path().join(format!("{}-a", v.name())),
            tmp.path().join(format!("{}-b", v.name())),
        );
        let plan = variant_plan(v);
        write(&plan, &a);
        let read = open_hf_dir(&a).unwrap();
        let mut arch = plan.arch.clone();
        arch.torch_dtype = Some(DType::F32);
        assert_eq!(read.arch, arch, "{v:?}: read back another architecture");
        write(&read, &b);
        let (fa, fb) = (model_files(&a), model_files(&b));
        assert_eq!(
            fa.iter().map(|f| &f.0).collect::<Vec<_>>(),
            fb.iter().map(|f| &f.0).collect::<Vec<_>>()
        );
        for ((name, x), (_, y)) in fa.iter().zip(&fb) {
            assert!(x == y, "{v:?}: {name} differs after write, read, write");
        }
        let config: Value =
            serde_json::from_slice(&std::fs::read(a.join("config.json")).unwrap()).unwrap();
        let format = choose_export(&plan.arch).format;
        assert_eq!(config["model_type"], format.model_type());
        for (file, _) in format.code_files() {
            assert!(a.join(file).is_file(), "{v:?}: {file} not written");
        }
    }
}

#[test]
fn nemotron_export_is_what_vllm_reads() {
    let plan = variant_plan(Variant::Mixed);
    assert_eq!(
        choose_export(&plan.arch).format,
        ExportFormat::Surgeon,
        "mixed has v/o head sizes nemotron-nas cannot state"
    );
    let mut arch = variant_plan(Variant::NoOpAttention).arch;
    arch.layers[0].attention.num_kv_heads = 1;
    arch.layers[2].mlp = Mlp::Dense {
        intermediate_size: 768,
    };
    let c = config_json(&arch, DType::BF16).unwrap();
    assert_eq!(c["architectures"][0], "DeciLMForCausalLM");
    assert_eq!(c["model_type"], "nemotron-nas");
    assert_eq!(
        c["auto_map"]["AutoModelForCausalLM"],
        "modeling_decilm.DeciLMForCausalLM"
    );
    assert_eq!(c["num_attention_heads"], 4);
    let blocks = c["block_configs"].as_array().unwrap();
    assert_eq!(blocks.len(), 4);
    // KV heads = heads / n_heads_in_group.
    assert_eq!(blocks[0]["attention"]["n_heads_in_group"], 4);
    assert_eq!(blocks[2]["attention"]["n_heads_in_group"], 2);
    assert_eq!(blocks[1]["attention"]["no_op"], true);
    assert_eq!(blocks[3]["attention"]["no_op"], true);
    // vLLM: int(2 * ffn_mult * hidden / 3) rounded up to 256. 768 = 2 * 18 * 64 / 3.
    assert_eq!(blocks[2]["ffn"]["ffn_mult"], 18.0);
    assert_eq!(blocks[0]["ffn"]["ffn_mult"], 6.0);
    let again = parse_config(Path::new("config.json"), &c).unwrap();
    assert_eq!(again.layers, arch.layers);
}

#[test]
fn published_nemotron_super_49b_config_reads_and_rewrites() {
    let path = fixture("nemotron_super_49b_config.json");
    let arch = surgeon_formats::config::read_config(&path).unwrap();
    assert_eq!(arch.num_layers(), 80);
    assert_eq!(arch.hidden_size, 8192);
    assert_eq!(arch.rope_theta, 500000.0);
    let attention: Vec<_> = arch
        .layers
        .iter()
        .filter(|l| !l.attention.is_no_op())
        .collect();
    assert_eq!(attention.len(), 49);
    assert!(attention
        .iter()
        .all(|l| l.attention.num_kv_heads == 8 && l.attention.head_dim == 128));
    let widths: std::collections::BTreeSet<usize> = arch
        .layers
        .iter()
        .map(|l| match l.mlp {
            Mlp::Dense { intermediate_size } => intermediate_size,
            _ => panic!("moe"),
        })
        .collect();
    // ffn_mult 0.5, 1.0, 1.3125, 2.625, 3.28125, 5.25 at hidden 8192.
    assert_eq!(
        widths.into_iter().collect::<Vec<_>>(),
        vec![2816, 5632, 7168, 14336, 17920, 28672]
    );
    // The published model has 49,867,145,216 parameters.
    assert_eq!(arch.parameter_count(), 49_867_145_216);
    assert_eq!(choose_export(&arch).format, ExportFormat::NemotronNas);

    let original: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let out = config_json(&arch, DType::BF16).unwrap();
    for key in ["eos_token_id", "rope_scaling", "vocab_size", "bos_token_id"] {
        assert_eq!(out[key], original[key], "{key}");
    }
    for (i, (a, b)) in out["block_configs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(original["block_configs"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(a["attention"]["no_op"], b["attention"]["no_op"], "{i}");
        assert_eq!(
            a["attention"]["n_heads_in_group"], b["attention"]["n_heads_in_group"],
            "{i}"
        );
        // Multipliers that are not exact (0.5 and 1.0 give 2730 and 5461, rounded up to 2816 and
        // 5632) are written back as the exact multiplier of the same width.
        let width = |v: &Value| intermediate_size_from_ffn_mult(v.as_f64().unwrap(), 8192);
        assert_eq!(
            width(&a["ffn"]["ffn_mult"]),
            width(&b["ffn"]["ffn_mult"]),
            "{i}"
        );
        if ![0.5, 1.0].contains(&b["ffn"]["ffn_mult"].as_f64().unwrap()) {
            assert_eq!(a["ffn"]["ffn_mult"], b["ffn"]["ffn_mult"], "{i}");
        }
    }
    assert_eq!(parse_config(&path, &out).unwrap(), arch);
}

#[test]
fn shapes_that_disagree_with_tensors_name_the_layer_and_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    // nemotron-nas: layer 1's ffn_mult says 768 wide, its tensors are 512 wide.
    let dir = tmp.path().join("nas");
    write(&variant_plan(Variant::MlpWidths), &dir);
    let cfg = dir.join("config.json");
    let mut c: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    c["block_configs"][1]["ffn"]["ffn_mult"] = 18.0.into();
    std::fs::write(&cfg, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    let e = open_hf_dir(&dir).err().unwrap().to_string();
    assert!(
        e.contains("layer 1 (attention softmax 4 heads / 2 kv, head_dim 16 | mlp dense 768): tensor `model.layers.1.mlp.gate_proj.weight` has shape [512, 64] but the config implies [768, 64]"),
        "{e}"
    );

    // surgeon: layer 2's v_head_dim says 8, its tensors have 16 per head.
    let dir = tmp.path().join("surgeon");
    write(&variant_plan(Variant::OddMlpWidths), &dir);
    let cfg = dir.join("config.json");
    let mut c: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    c["surgeon"]["layers"][2]["attention"]["v_head_dim"] = 8.into();
    std::fs::write(&cfg, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    let e = open_hf_dir(&dir).err().unwrap().to_string();
    assert!(
        e.contains("layer 2 (attention softmax 4 heads / 2 kv, head_dim 16 v_head_dim 8 | mlp dense 192): tensor `model.layers.2.self_attn.v_proj.weight` has shape [32, 64] but the config implies [16, 64]"),
        "{e}"
    );
    assert!(
        e.contains("tensor `model.layers.2.self_attn.o_proj.weight`"),
        "{e}"
    );

    // no-op attention whose tensors are still there.
    let dir = tmp.path().join("noop");
    write(&variant_plan(Variant::KvGroups), &dir);
    let cfg = dir.join("config.json");
    let mut c: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    c["block_configs"][3]["attention"]["no_op"] = true.into();
    std::fs::write(&cfg, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    let e = open_hf_dir(&dir).err().unwrap().to_string();
    assert!(
        e.contains("layer 3 (attention no-op | mlp dense 256): tensor `model.layers.3.self_attn.q_proj.weight` is not part of this architecture"),
        "{e}"
    );
}

#[test]
fn old_surgeon_layers_without_v_head_dim_still_read() {
    let arch = variant_plan(Variant::OddMlpWidths).arch;
    let mut c = config_json(&arch, DType::F32).unwrap();
    for l in c["surgeon"]["layers"].as_array_mut().unwrap() {
        l["attention"].as_object_mut().unwrap().remove("v_head_dim");
    }
    assert_eq!(
        parse_config(Path::new("c.json"), &c).unwrap().layers,
        arch.layers
    );
}
