//! `metrics.csv` and the loss curves `loss.png` / `loss.svg`.
use super::{io_err, Error, MetricRow, Result};
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
    let bad = |l: &str| Error::Checkpoint(format!("{}: bad line `{l}`", path.display()));
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

/// Draws the loss curves with [`crate::plot`] (`.png` or `.svg` by the extension): training loss
/// and evaluation loss `ln(ppl)` against the step on the left axis, the learning rate on the right.
pub fn plot_loss(path: &Path, rows: &[MetricRow]) -> Result<()> {
    use crate::plot::{line_chart, Axis, LineChart, Mark, Series};
    let series = |name: &str, axis, mark, points: Vec<(f64, f64)>| Series {
        name: name.into(),
        points,
        axis,
        mark,
    };
    let train = rows
        .iter()
        .filter(|r| r.loss.is_finite() && r.step > 0)
        .map(|r| (r.step as f64, r.loss))
        .collect();
    let eval = rows
        .iter()
        .filter_map(|r| r.eval_ppl.map(|p| (r.step as f64, p.ln())))
        .filter(|p| p.1.is_finite())
        .collect();
    let lr = rows
        .iter()
        .filter(|r| r.step > 0)
        .map(|r| (r.step as f64, r.lr))
        .collect();
    let chart = LineChart {
        title: "Healing: loss and learning rate".into(),
        x_label: "step".into(),
        y_label: "loss (nats per token)".into(),
        y2_label: Some("learning rate".into()),
        series: vec![
            series("training loss", Axis::Left, Mark::Line, train),
            series(
                "evaluation loss, ln(ppl)",
                Axis::Left,
                Mark::LinePoints,
                eval,
            ),
            series("learning rate (right axis)", Axis::Right, Mark::Dashed, lr),
        ],
    };
    Ok(line_chart(path, &chart)?)
}
