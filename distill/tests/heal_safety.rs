//! Healing never writes NaN and never leaves a checkpoint that blocks `--resume` (issue 21):
//! a non-finite loss stops the run with an error and keeps the last good checkpoint; checkpoints
//! appear whole or not at all (a full tmpfs, root only); `--resume` skips incomplete ones with a
//! warning; a truncated optimizer.bin is an error naming the file.
use std::path::Path;
use surgeon_distill::heal::checkpoint::{find_checkpoint, incomplete_reason, STATE_DIR};
use surgeon_distill::heal::data::{prepare, Sampler};
use surgeon_distill::heal::{heal, Budget, DataSpec, HealConfig, LossKind};
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::{HostTensor, Plan, Source};

const POISON: u32 = 255;

fn docs(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    // Deterministic tokens in 3..250 (never POISON).
    (0..n)
        .map(|d| {
            (0..len)
                .map(|i| 3 + ((d as u64 * 31 + i as u64 * 17 + seed * 7) % 247) as u32)
                .collect()
        })
        .collect()
}

fn cfg(out: &Path, data: Vec<Vec<u32>>) -> HealConfig {
    HealConfig {
        data: DataSpec::Tokens(data),
        eval_data: Some(DataSpec::Tokens(docs(4, 40, 9))),
        out: out.to_path_buf(),
        budget: Budget::Steps(6),
        seq_len: 16,
        batch: 1,
        lr: 1e-3,
        save_every: 1,
        ..Default::default()
    }
}

/// `plan` with the embedding row of POISON set to NaN.
fn poisoned(plan: &Plan) -> Plan {
    let mut p = plan.clone();
    let name = "model.embed_tokens.weight";
    let (shape, mut v) = p.load_f32(name).unwrap();
    let h = shape[1];
    for x in &mut v[POISON as usize * h..(POISON as usize + 1) * h] {
        *x = f32::NAN;
    }
    p.tensors.get_mut(name).unwrap().source =
        Source::inline("poisoned", HostTensor::from_f32(shape, &v));
    p
}

#[test]
fn non_finite_loss_stops_with_an_error_keeping_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("healed");
    let student = SyntheticSpec::tiny().plan();
    // Put POISON into the packed sequence that step 3 trains on (and into no other).
    let mut data = docs(12, 16, 1);
    let c = cfg(&out, data.clone());
    let train = prepare(&student, &c.data, c.eval_data.as_ref(), c.seq_len)
        .unwrap()
        .train;
    let j = Sampler::new(train.len(), c.seed).index(2);
    let pos = 16 * j + 8; // inside window j only (windows share their boundary token)
    let (d, off) = (pos / 17, pos % 17);
    assert!(off < 16, "position {pos} is an end-of-document token");
    data[d][off] = POISON;
    let c = cfg(&out, data);
    let train = prepare(&student, &c.data, c.eval_data.as_ref(), c.seq_len)
        .unwrap()
        .train;
    for (i, s) in train.iter().enumerate() {
        assert_eq!(s.contains(&POISON), i == j, "sequence {i}");
    }
    // The teacher's poisoned row makes the distillation loss NaN at step 3.
    let c = HealConfig {
        loss: LossKind::Kd,
        ..c
    };
    let e = heal(&c, student.clone(), Some(poisoned(&student)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("step 3"), "{e}");
    assert!(e.contains("not finite"), "{e}");
    assert!(
        e.contains("step-000002"),
        "names the last good checkpoint: {e}"
    );
    let ck = out.join("checkpoints");
    assert!(incomplete_reason(&ck.join("step-000002")).is_none());
    assert!(!ck.join("step-000003").exists());
    assert!(
        !out.join("model.safetensors").exists(),
        "a model was written"
    );
    assert_eq!(find_checkpoint(&out).unwrap(), ck.join("step-000002"));
}

#[test]
fn resume_skips_an_incomplete_checkpoint_and_a_truncated_optimizer_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("healed");
    let student = SyntheticSpec::tiny().plan();
    let c = HealConfig {
        stop_after: Some(3),
        ..cfg(&out, docs(12, 16, 1))
    };
    let r = heal(&c, student.clone(), None).unwrap();
    assert!(r.interrupted);
    let ck = out.join("checkpoints");
    for s in 1..=3 {
        assert!(incomplete_reason(&ck.join(format!("step-{s:06}"))).is_none());
    }
    // A checkpoint half-written by an older version (no trainer state) is skipped.
    std::fs::remove_file(ck.join("step-000003").join(STATE_DIR).join("state.json")).unwrap();
    assert_eq!(find_checkpoint(&out).unwrap(), ck.join("step-000002"));
    // A truncated optimizer record is an error naming the file.
    let opt = ck.join("step-000002").join(STATE_DIR).join("optimizer.bin");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    let resume = HealConfig {
        resume: Some(out.clone()),
        stop_after: None,
        ..c.clone()
    };
    let e = heal(&resume, student.clone(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&opt.display().to_string()), "{e}");
    assert!(e.contains("does not load"), "{e}");
    assert!(e.len() < 600, "{e}");
    // Restored, the run resumes from step 2 and finishes.
    std::fs::write(&opt, &bytes).unwrap();
    let r = heal(&resume, student.clone(), None).unwrap();
    assert_eq!(r.steps, 6);
    assert!(out.join("model.safetensors").is_file());
    // --resume on a folder that does not exist says so.
    let e = heal(
        &HealConfig {
            resume: Some(tmp.path().join("missing")),
            ..c
        },
        student,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.ends_with("missing: no such directory"), "{e}");
}

/// A full disk while checkpointing: the run fails with a clear error and every `step-*` left
/// is complete (tmpfs of 3 MB: two checkpoints fit, the third does not). Root only.
#[cfg(unix)]
#[test]
fn full_disk_while_checkpointing_leaves_only_complete_checkpoints() {
    use std::process::Command;
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = is_root
        && Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    struct Umount<'a>(&'a Path);
    impl Drop for Umount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Umount(&mnt);
    let out = mnt.join("healed");
    let c = HealConfig {
        budget: Budget::Steps(20),
        ..cfg(&out, docs(12, 16, 1))
    };
    let e = heal(&c, SyntheticSpec::tiny().plan(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("No space left on device"), "{e}");
    let ck = out.join("checkpoints");
    let mut complete = 0;
    for entry in std::fs::read_dir(&ck).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".surgeon-tmp-"), "temporary left: {name}");
        assert!(
            incomplete_reason(&entry.path()).is_none(),
            "{name} is incomplete"
        );
        complete += 1;
    }
    assert!(complete >= 1, "no checkpoint fitted");
    assert!(find_checkpoint(&out).is_ok());
}
