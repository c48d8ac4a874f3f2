//! Line and point charts as PNG and SVG, headless: plotters draws the text with an embedded font
//! (DejaVu Sans Mono, `font/LICENSE`), and the png crate encodes the bitmap. Log axes are drawn
//! as linear axes over log₁₀ of the values, labelled with the values themselves.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::data::store::write_atomic;
use crate::error::{ClueError, Result};

static FONT: &[u8] = include_bytes!("font/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

/// Pixel size of every chart.
pub const SIZE: (u32, u32) = (960, 640);

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mark {
    /// Points joined by a line, with dots.
    Line,
    /// A thin pale line, without a legend entry of its own after the first.
    Faint,
    /// Dots only.
    Dots,
    /// A dashed line (fits).
    Dashed,
}

#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub mark: Mark,
    /// Index into the palette; `None` draws black.
    pub color: Option<usize>,
}

impl Series {
    /// One line per label, its points sorted by x, coloured in turn.
    pub fn lines(by_label: std::collections::BTreeMap<String, Vec<(f64, f64)>>) -> Vec<Series> {
        by_label
            .into_iter()
            .enumerate()
            .map(|(i, (label, mut points))| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series {
                    label,
                    points,
                    mark: Mark::Line,
                    color: Some(i),
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
}

impl Chart {
    fn map(&self, (x, y): (f64, f64)) -> Option<(f64, f64)> {
        let x = if self.log_x { x.log10() } else { x };
        let y = if self.log_y { y.log10() } else { y };
        (x.is_finite() && y.is_finite()).then_some((x, y))
    }

    /// The drawn range of every series' points, with a margin.
    fn ranges(&self) -> Option<((f64, f64), (f64, f64))> {
        let points: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().filter_map(|&p| self.map(p)))
            .collect();
        let span = |v: Vec<f64>| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let pad = ((hi - lo) * 0.05).max(1e-3 * lo.abs().max(1.0));
            (lo - pad, hi + pad)
        };
        (!points.is_empty()).then(|| {
            (
                span(points.iter().map(|p| p.0).collect()),
                span(points.iter().map(|p| p.1).collect()),
            )
        })
    }

    /// Write `stem.png` and `stem.svg`.
    pub fn write(&self, stem: &Path) -> Result<()> {
        REGISTER.call_once(|| {
            let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
        });
        let (w, h) = SIZE;
        let mut rgb = vec![0u8; (w * h * 3) as usize];
        let failed = |e: String| {
            ClueError::bad_file(
                stem,
                format!("cannot draw the chart: {e}"),
                "report this as a bug",
            )
        };
        self.render(BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area())
            .map_err(failed)?;
        let mut svg = String::new();
        self.render(SVGBackend::with_string(&mut svg, SIZE).into_drawing_area())
            .map_err(failed)?;
        let mut png_bytes = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut png_bytes, w, h);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header().map_err(|e| failed(e.to_string()))?;
            writer
                .write_image_data(&rgb)
                .map_err(|e| failed(e.to_string()))?;
        }
        write_atomic(&stem.with_extension("png"), &png_bytes)?;
        write_atomic(&stem.with_extension("svg"), svg.as_bytes())
    }

    fn render<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let Some(((x0, x1), (y0, y1))) = self.ranges() else {
            root.titled(&format!("{} (no points)", self.title), ("sans-serif", 22))
                .map_err(e)?;
            return root.present().map_err(e);
        };
        let label = |log: bool| {
            move |v: &f64| {
                let v = if log { 10f64.powf(*v) } else { *v };
                match v.abs() {
                    a if a == 0.0 || (0.01..1e4).contains(&a) => format!("{v:.3}"),
                    _ => format!("{v:.1e}"),
                }
            }
        };
        let (fx, fy) = (label(self.log_x), label(self.log_y));
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(84)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_label_formatter(&fx)
            .y_label_formatter(&fy)
            .x_labels(7)
            .y_labels(8)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(e)?;
        let mut faint_labelled = false;
        for s in &self.series {
            let color = s.color.map_or(BLACK, |i| {
                let (r, g, b) = Palette99::pick(i).rgb();
                RGBColor(r, g, b)
            });
            let points: Vec<(f64, f64)> = s.points.iter().filter_map(|&p| self.map(p)).collect();
            let legend = |color: RGBColor, width: u32| {
                move |(x, y): (i32, i32)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width))
                }
            };
            match s.mark {
                Mark::Faint => {
                    let pale = color.mix(0.35);
                    let drawn = chart
                        .draw_series(LineSeries::new(points, pale.stroke_width(1)))
                        .map_err(e)?;
                    if !faint_labelled {
                        drawn.label(&s.label).legend(legend(color, 1));
                        faint_labelled = true;
                    }
                }
                Mark::Line => {
                    chart
                        .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                        .map_err(e)?
                        .label(&s.label)
                        .legend(legend(color, 2));
                    chart
                        .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                        .map_err(e)?;
                }
                Mark::Dots => {
                    chart
                        .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                        .map_err(e)?
                        .label(&s.label)
                        .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
                }
                Mark::Dashed => {
                    chart
                        .draw_series(DashedLineSeries::new(points, 8, 5, color.stroke_width(2)))
                        .map_err(e)?
                        .label(&s.label)
                        .legend(legend(color, 2));
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_written_as_a_png_of_the_stated_size_and_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let chart = Chart {
            title: "loss vs compute".into(),
            x_label: "PF-days".into(),
            y_label: "loss".into(),
            log_x: true,
            log_y: true,
            series: vec![
                Series {
                    label: "runs".into(),
                    points: vec![(1e-9, 3.0), (1e-8, 2.5), (1e-7, 2.2), (0.0, 1.0)],
                    mark: Mark::Line,
                    color: Some(0),
                },
                Series {
                    label: "fit".into(),
                    points: vec![(1e-9, 3.1), (1e-7, 2.1)],
                    mark: Mark::Dashed,
                    color: None,
                },
            ],
        };
        let stem = dir.path().join("chart");
        chart.write(&stem).unwrap();
        let file = std::fs::File::open(stem.with_extension("png")).unwrap();
        let mut reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), SIZE);
        let dark = pixels
            .chunks(3)
            .filter(|p| p.iter().all(|&c| c < 100))
            .count();
        assert!(
            dark > 2000,
            "axes, text and lines are drawn: {dark} dark pixels"
        );
        let svg = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
        assert!(svg.contains("<svg") && svg.contains("loss vs compute") && svg.contains("PF-days"));
        assert!(svg.contains(r#"width="960""#), "{}", &svg[..200]);
    }
}
