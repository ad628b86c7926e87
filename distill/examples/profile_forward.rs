//! Times the pieces of a forward pass: `cargo run --profile test -p surgeon-distill --example profile_forward MODEL [T]`.
use burn::tensor::{Int, Tensor, TensorData};
use std::time::Instant;
use surgeon_distill::burn;
use surgeon_distill::eval::nll_total;
use surgeon_distill::model::Llama;

type B = burn::backend::Flex;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let plan = surgeon_formats::open_model(&args[1]).unwrap();
    let t: usize = args.get(2).map_or(512, |s| s.parse().unwrap());
    let dev = Default::default();
    let model = Llama::<B>::from_plan(&plan, &dev).unwrap();
    let ids: Vec<i64> = (0..t as i64).map(|i| (i * 7919) % 49152).collect();
    let x = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [1, t]), &dev);
    for _ in 0..3 {
        let t0 = Instant::now();
        let h = model.hidden(x.clone(), None);
        let _ = h.clone().into_data();
        let t1 = Instant::now();
        let logits = model.logits(h);
        let _ = logits.clone().into_data();
        let t2 = Instant::now();
        let tgt: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
        let _ = nll_total(logits, &tgt);
        let t3 = Instant::now();
        // One layer's pieces.
        let e = model.embed(x.clone());
        let layer = &model.layers[0];
        let l = layer.attention.as_ref().expect("layer 0 has attention");
        let ff = layer.feed_forward.as_ref().expect("layer 0 has an MLP");
        let t4 = Instant::now();
        let n = l.input_layernorm.forward(e.clone());
        let _ = n.clone().into_data();
        let t5 = Instant::now();
        let pos = surgeon_distill::model::Positions::new(&model, 0..1, 0, t, &dev);
        let (c, s) = pos.rope(l.self_attn.head_dim);
        let (c, s) = (c.clone(), s.clone());
        let a = l.self_attn.forward(n.clone(), &pos, None);
        let _ = a.into_data();
        let t6 = Instant::now();
        let n2 = n.clone();
        let m = ff.mlp.forward(n);
        let _ = m.into_data();
        let t7 = Instant::now();
        // Attention pieces.
        let sa = &l.self_attn;
        let ta = Instant::now();
        let q = sa.q_proj.forward(n2.clone());
        let k = sa.k_proj.forward(n2.clone());
        let v = sa.v_proj.forward(n2.clone());
        let _ = (
            q.clone().into_data(),
            k.clone().into_data(),
            v.clone().into_data(),
        );
        let tb = Instant::now();
        let q = q.reshape([1, t, 9, 64]).swap_dims(1, 2);
        let k = k.reshape([1, t, 3, 64]).swap_dims(1, 2);
        let v = v.reshape([1, t, 3, 64]).swap_dims(1, 2);
        let q = surgeon_distill::model::apply_rope(q, &c, &s);
        let k = surgeon_distill::model::apply_rope(k, &c, &s);
        let _ = (q.clone().into_data(), k.clone().into_data());
        let tc = Instant::now();
        let k = k
            .unsqueeze_dim::<5>(2)
            .expand([1, 3, 3, t, 64])
            .reshape([1, 9, t, 64]);
        let v = v
            .unsqueeze_dim::<5>(2)
            .expand([1, 3, 3, t, 64])
            .reshape([1, 9, t, 64]);
        let y = burn::tensor::module::attention(
            q,
            k,
            v,
            None,
            None,
            burn::tensor::ops::AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: true,
            },
        );
        let _ = y.into_data();
        let td = Instant::now();
        println!(
            "  qkv {:.4}s rope {:.4}s attn-kernel {:.4}s",
            (tb - ta).as_secs_f64(),
            (tc - tb).as_secs_f64(),
            (td - tc).as_secs_f64()
        );
        println!(
            "layers {:.3}s  lm_head {:.3}s  nll {:.3}s | one layer: norm {:.4}s attn {:.4}s mlp {:.4}s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (t5 - t4).as_secs_f64(),
            (t6 - t5).as_secs_f64(),
            (t7 - t6).as_secs_f64()
        );
    }
}
