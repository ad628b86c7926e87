//! Charts people read: axes, ticks, labels and a legend, drawn with `plotters` as SVG or PNG (by the
//! file's extension). The font (a subset of DejaVu Sans, `assets/`, made by
//! `scripts/make-plot-font.sh`) is compiled in, so plots render the same on a headless machine
//! without system fonts. Files are written to a temporary sibling and renamed into place.
use crate::error::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-plot.ttf");
const FAMILY: &str = "sans-serif";
/// Pixel size of every chart.
pub const SIZE: (u32, u32) = (960, 540);

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is ours and valid; a failure would show as a test failure, not at a user's.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// Which y axis a series is drawn against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    Left,
    Right,
}

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    Line,
    /// Line through the points with a dot on each (sparse series such as evaluations).
    LinePoints,
    Dashed,
}

/// One named series of a [`LineChart`].
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub axis: Axis,
    pub mark: Mark,
}

/// A line chart with a left y axis and an optional right one.
#[derive(Clone, Debug, Default)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Label of the right axis; series on [`Axis::Right`] need it.
    pub y2_label: Option<String>,
    pub series: Vec<Series>,
}

/// One bar of a [`BarChart`].
#[derive(Clone, Debug)]
pub struct Bar {
    pub x: i64,
    pub value: f64,
    /// Drawn in the second colour and named by [`BarChart::highlight_label`] in the legend.
    pub highlight: bool,
}

/// A bar chart over integer positions (e.g. layer indices).
#[derive(Clone, Debug, Default)]
pub struct BarChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub bars: Vec<Bar>,
    pub label: String,
    pub highlight_label: String,
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Writes `chart` to `path` (`.svg` or `.png`).
pub fn line_chart(path: &Path, chart: &LineChart) -> Result<()> {
    render(path, chart)
}

/// Writes `chart` to `path` (`.svg` or `.png`).
pub fn bar_chart(path: &Path, chart: &BarChart) -> Result<()> {
    render(path, chart)
}

type DrawResult = std::result::Result<(), String>;

/// A chart that draws on any plotters backend.
trait Draw {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> DrawResult;
}

impl Draw for LineChart {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> DrawResult {
        draw_lines(root, self)
    }
}

impl Draw for BarChart {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> DrawResult {
        draw_bars(root, self)
    }
}

fn render(path: &Path, chart: &impl Draw) -> Result<()> {
    register_font();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let fail = |m: String| Error::Invalid(format!("{}: drawing the plot: {m}", path.display()));
    let bytes = match ext.as_str() {
        "svg" => {
            let mut s = String::new();
            chart
                .draw(SVGBackend::with_string(&mut s, SIZE).into_drawing_area())
                .map_err(fail)?;
            s.into_bytes()
        }
        "png" => {
            let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
            chart
                .draw(BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area())
                .map_err(fail)?;
            encode_png(&rgb).map_err(|e| fail(e.to_string()))?
        }
        _ => {
            return Err(Error::Invalid(format!(
                "{}: a plot is written as .svg or .png",
                path.display()
            )))
        }
    };
    write_atomic(path, &bytes)
}

fn encode_png(rgb: &[u8]) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut out = vec![];
    let mut enc = png::Encoder::new(&mut out, SIZE.0, SIZE.1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()?;
    Ok(out)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Io {
            path: path.to_path_buf(),
            source: e,
        }
    })
}

/// `[lo, hi]` of the values with a little headroom; a flat or empty range becomes a unit one.
fn range(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    if hi - lo < 1e-12 {
        let pad = if hi.abs() > 0.0 { hi.abs() * 0.1 } else { 1.0 };
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * 0.05;
    (if from_zero && lo >= 0.0 { lo } else { lo - pad }, hi + pad)
}

/// Tick labels: plain numbers in a readable width, scientific notation for tiny or huge ones.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn e2s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn draw_lines<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, c: &LineChart) -> DrawResult {
    root.fill(&WHITE).map_err(e2s)?;
    let on = |a: Axis| c.series.iter().filter(move |s| s.axis == a);
    let (x0, x1) = range(
        c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
        false,
    );
    let (y0, y1) = range(
        on(Axis::Left).flat_map(|s| s.points.iter().map(|p| p.1)),
        false,
    );
    let (r0, r1) = range(
        on(Axis::Right).flat_map(|s| s.points.iter().map(|p| p.1)),
        true,
    );
    // Headroom above the curves for the legend (upper right).
    let (y1, r1) = (y1 + (y1 - y0) * 0.25, r1 + (r1 - r0) * 0.25);
    let has_right = on(Axis::Right).next().is_some();
    let mut chart = ChartBuilder::on(&root)
        .caption(&c.title, (FAMILY, 22))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .right_y_label_area_size(if has_right { 80 } else { 0 })
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e2s)?
        .set_secondary_coord(x0..x1, r0..r1);
    chart
        .configure_mesh()
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(e2s)?;
    if has_right {
        chart
            .configure_secondary_axes()
            .y_desc(c.y2_label.as_deref().unwrap_or(""))
            .y_label_formatter(&|v| tick(*v))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .draw()
            .map_err(e2s)?;
    }
    for (i, s) in c.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let style = color.stroke_width(2);
        let pts = s
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite());
        let pts: Vec<(f64, f64)> = pts.collect();
        let legend = move |(x, y): (i32, i32)| {
            PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(2))
        };
        let dashed = || DashedLineSeries::new(pts.clone(), 8, 5, style);
        let anno = match (s.axis, s.mark) {
            (Axis::Left, Mark::Dashed) => chart.draw_series(dashed()),
            (Axis::Right, Mark::Dashed) => chart.draw_secondary_series(dashed()),
            (Axis::Left, _) => chart.draw_series(LineSeries::new(pts.clone(), style)),
            (Axis::Right, _) => chart.draw_secondary_series(LineSeries::new(pts.clone(), style)),
        }
        .map_err(e2s)?;
        anno.label(s.name.as_str()).legend(legend);
        if s.mark == Mark::LinePoints {
            let dots = pts.iter().map(|&p| Circle::new(p, 4, color.filled()));
            match s.axis {
                Axis::Left => chart.draw_series(dots),
                Axis::Right => chart.draw_secondary_series(dots),
            }
            .map_err(e2s)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()
        .map_err(e2s)?;
    root.present().map_err(e2s)
}

fn draw_bars<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, c: &BarChart) -> DrawResult {
    root.fill(&WHITE).map_err(e2s)?;
    let lo = c.bars.iter().map(|b| b.x).min().unwrap_or(0);
    let hi = c.bars.iter().map(|b| b.x).max().unwrap_or(0);
    let (_, y1) = range(c.bars.iter().map(|b| b.value), true);
    let mut chart = ChartBuilder::on(&root)
        .caption(&c.title, (FAMILY, 22))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d((lo..hi).into_segmented(), 0.0..y1)
        .map_err(e2s)?;
    let n = (hi - lo + 1) as usize;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .x_labels(n.min(40))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => i.to_string(),
            SegmentValue::Last => String::new(),
        })
        .y_label_formatter(&|v| tick(*v))
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(e2s)?;
    for highlight in [false, true] {
        let color = COLORS[usize::from(highlight)];
        let bars = c.bars.iter().filter(|b| b.highlight == highlight);
        let rects = bars.map(|b| {
            let mut r = Rectangle::new(
                [
                    (SegmentValue::Exact(b.x), 0.0),
                    // The last segment ends at the axis end, not at a value past it.
                    (
                        if b.x == hi {
                            SegmentValue::Last
                        } else {
                            SegmentValue::Exact(b.x + 1)
                        },
                        b.value.max(0.0),
                    ),
                ],
                color.filled(),
            );
            r.set_margin(0, 0, 3, 3);
            r
        });
        let name = if highlight {
            &c.highlight_label
        } else {
            &c.label
        };
        if name.is_empty() || !c.bars.iter().any(|b| b.highlight == highlight) {
            chart.draw_series(rects).map_err(e2s)?;
            continue;
        }
        chart
            .draw_series(rects)
            .map_err(e2s)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperMiddle)
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()
        .map_err(e2s)?;
    root.present().map_err(e2s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> LineChart {
        LineChart {
            title: "t".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            y2_label: Some("lr".into()),
            series: vec![
                Series {
                    name: "training loss".into(),
                    points: (1..50).map(|i| (i as f64, 5.0 / i as f64)).collect(),
                    axis: Axis::Left,
                    mark: Mark::Line,
                },
                Series {
                    name: "learning rate".into(),
                    points: (1..50)
                        .map(|i| (i as f64, 1e-4 * i as f64 / 50.0))
                        .collect(),
                    axis: Axis::Right,
                    mark: Mark::Dashed,
                },
            ],
        }
    }

    /// The text elements of an SVG, trimmed.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                Some(
                    t.split_once('>')?
                        .1
                        .split_once("</text>")?
                        .0
                        .trim()
                        .to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn svg_has_axes_labels_and_legend() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.svg");
        line_chart(&p, &chart()).unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.starts_with("<svg"), "{}", &s[..80]);
        let t = texts(&s);
        for want in ["training loss", "learning rate", "step", "loss", "lr", "t"] {
            assert!(t.iter().any(|x| x == want), "{want} missing: {t:?}");
        }
        // Ticks of both axes: loss runs from 0.1 to 5, the learning rate to 9.8e-5.
        assert!(
            t.iter().any(|x| x == "2") && t.iter().any(|x| x == "4"),
            "{t:?}"
        );
        assert!(t.iter().any(|x| x.ends_with("e-5")), "{t:?}");
        // Only the file is left: no temporary sibling.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn png_renders_text_without_system_fonts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.png");
        line_chart(&p, &chart()).unwrap();
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&p).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), SIZE);
        // The caption "t" is drawn near the top centre: some dark pixels in that band.
        let w = SIZE.0 as usize;
        let dark = (0..40)
            .flat_map(|y| (w / 2 - 30..w / 2 + 30).map(move |x| (y * w + x) * 3))
            .filter(|&i| buf[i] < 128)
            .count();
        assert!(dark > 5, "no caption pixels");
        assert!(line_chart(&d.path().join("c.jpg"), &chart()).is_err());
    }

    #[test]
    fn bars_and_degenerate_input() {
        let d = tempfile::tempdir().unwrap();
        let bars = BarChart {
            title: "influence".into(),
            x_label: "layer".into(),
            y_label: "1 - cos".into(),
            bars: (0..6)
                .map(|i| Bar {
                    x: i,
                    value: 0.1 * i as f64,
                    highlight: i < 2,
                })
                .collect(),
            label: "kept".into(),
            highlight_label: "dropped".into(),
        };
        bar_chart(&d.path().join("b.svg"), &bars).unwrap();
        let s = std::fs::read_to_string(d.path().join("b.svg")).unwrap();
        let t = texts(&s);
        for want in ["kept", "dropped", "layer", "0", "5", "influence"] {
            assert!(t.iter().any(|x| x == want), "{want} missing: {t:?}");
        }
        // Empty and flat series still draw.
        let mut c = chart();
        c.series[0].points.clear();
        c.series[1].points = vec![(3.0, 0.0)];
        line_chart(&d.path().join("e.png"), &c).unwrap();
    }

    #[test]
    fn tick_labels() {
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(3.0), "3");
        assert_eq!(tick(0.125), "0.125");
        assert_eq!(tick(1500.0), "1500");
        assert_eq!(tick(1e-4), "1.0e-4");
    }
}
