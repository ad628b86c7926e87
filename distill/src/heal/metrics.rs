//! `metrics.csv` and the loss curve `loss.png` (drawn directly with the `png` crate: no fonts).
use super::{io_err, HealError, MetricRow, Result};
use std::path::Path;

pub const CSV_HEADER: &str = "step,tokens,loss,lr,grad_norm,eval_ppl";

pub fn write_csv(path: &Path, rows: &[MetricRow]) -> Result<()> {
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    for r in rows {
        s.push_str(&format!(
            "{},{},{:.6},{:.6e},{:.6},{}\n",
            r.step,
            r.tokens,
            r.loss,
            r.lr,
            r.grad_norm,
            r.eval_ppl.map(|p| format!("{p:.4}")).unwrap_or_default()
        ));
    }
    std::fs::write(path, s).map_err(io_err(path))
}

pub fn read_csv(path: &Path) -> Result<Vec<MetricRow>> {
    let s = std::fs::read_to_string(path).map_err(io_err(path))?;
    let bad = |l: &str| HealError::Checkpoint(format!("{}: bad line `{l}`", path.display()));
    let mut out = Vec::new();
    for l in s.lines().skip(1).filter(|l| !l.is_empty()) {
        let f: Vec<&str> = l.split(',').collect();
        if f.len() != 6 {
            return Err(bad(l));
        }
        let p = |i: usize| f[i].parse::<f64>().map_err(|_| bad(l));
        out.push(MetricRow {
            step: f[0].parse().map_err(|_| bad(l))?,
            tokens: f[1].parse().map_err(|_| bad(l))?,
            loss: p(2)?,
            lr: p(3)?,
            grad_norm: p(4)?,
            eval_ppl: if f[5].is_empty() { None } else { Some(p(5)?) },
        });
    }
    Ok(out)
}

/// Draws training loss (blue line) and eval loss `ln(ppl)` (red squares) against the step.
/// Axes in black, light grey grid at fifths; no labels (the numbers are in metrics.csv).
pub fn plot_loss(path: &Path, rows: &[MetricRow]) -> Result<()> {
    const W: usize = 800;
    const H: usize = 480;
    const M: usize = 40;
    let mut img = vec![255u8; W * H * 3];
    let put = |img: &mut Vec<u8>, x: i64, y: i64, c: [u8; 3]| {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            img[i..i + 3].copy_from_slice(&c);
        }
    };
    let train: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.loss.is_finite() && r.step > 0)
        .map(|r| (r.step as f64, r.loss))
        .collect();
    let eval: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| r.eval_ppl.map(|p| (r.step as f64, p.ln())))
        .filter(|p| p.1.is_finite())
        .collect();
    let pts = train.iter().chain(eval.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-9 {
        y1 = y0 + 1.0;
    }
    y0 = y0.min(0.0f64.max(y0 - 0.05 * (y1 - y0)));
    let (pw, ph) = ((W - 2 * M) as f64, (H - 2 * M) as f64);
    let sx = |x: f64| (M as f64 + (x - x0) / (x1 - x0) * pw).round() as i64;
    let sy = |y: f64| ((H - M) as f64 - (y - y0) / (y1 - y0) * ph).round() as i64;
    for k in 0..=5 {
        let gx = M + k * (W - 2 * M) / 5;
        let gy = M + k * (H - 2 * M) / 5;
        for t in M..=H - M {
            put(&mut img, gx as i64, t as i64, [225, 225, 225]);
        }
        for t in M..=W - M {
            put(&mut img, t as i64, gy as i64, [225, 225, 225]);
        }
    }
    for t in M..=W - M {
        put(&mut img, t as i64, (H - M) as i64, [0, 0, 0]);
    }
    for t in M..=H - M {
        put(&mut img, M as i64, t as i64, [0, 0, 0]);
    }
    let blue = [31, 119, 180];
    for w in train.windows(2) {
        let (ax, ay, bx, by) = (sx(w[0].0), sy(w[0].1), sx(w[1].0), sy(w[1].1));
        let n = (bx - ax).abs().max((by - ay).abs()).max(1);
        for s in 0..=n {
            let x = ax + (bx - ax) * s / n;
            let y = ay + (by - ay) * s / n;
            put(&mut img, x, y, blue);
            put(&mut img, x, y + 1, blue);
        }
    }
    if train.len() == 1 {
        put(&mut img, sx(train[0].0), sy(train[0].1), blue);
    }
    for &(x, y) in &eval {
        for dx in -3..=3 {
            for dy in -3..=3 {
                put(&mut img, sx(x) + dx, sy(y) + dy, [214, 39, 40]);
            }
        }
    }
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let png_err = |e: png::EncodingError| HealError::Invalid(format!("{}: {e}", path.display()));
    let mut w = enc.write_header().map_err(png_err)?;
    w.write_image_data(&img).map_err(png_err)?;
    w.finish().map_err(png_err)?;
    Ok(())
}
