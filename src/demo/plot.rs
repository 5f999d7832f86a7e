//! PNG plots for the demo report, drawn with `plotters` into an RGB buffer and encoded with `image`. Text uses
//! the bundled DejaVu Sans (data/fonts), registered once, so no system font is needed.

use std::io::Cursor;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::{Error, Result};

const FONT: &[u8] = include_bytes!("../../data/fonts/DejaVuSans.ttf");
const WIDTH: u32 = 640;
const HEIGHT: u32 = 360;

/// A line series: name and (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A bar with an error bar: mean and spread (0 for a single seed).
#[derive(Debug, Clone, Copy)]
pub struct Bar {
    pub mean: f64,
    pub spread: f64,
}

/// Colours of series and bars, in order (colour-blind-safe palette of Okabe & Ito).
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| ok = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("the bundled plot font could not be read"))
    }
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("plot: {e}"))
}

/// Draws into a white RGB canvas and returns it as PNG bytes.
fn render(draw: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>) -> Result<Vec<u8>> {
    register_font()?;
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(root.clone())?;
        root.present().map_err(plot_err)?;
    }
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .ok_or_else(|| Error::invalid("plot buffer has the wrong size"))?;
    png(&img)
}

/// PNG bytes of an image.
pub fn png(img: &image::RgbImage) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).map_err(|e| Error::invalid(format!("PNG encoding: {e}")))?;
    Ok(out.into_inner())
}

/// A line plot of `series` (at least one point in total).
pub fn lines(title: &str, x_desc: &str, y_label: &str, series: &[Series]) -> Result<Vec<u8>> {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    // Steps are whole numbers: label them so ("200", not "200.0"), and leave ticks between two steps blank.
    let whole = series.iter().flat_map(|s| &s.points).all(|(x, _)| x.fract() == 0.0);
    let step_label = |x: &f64| if x.fract() == 0.0 { format!("{x:.0}") } else { String::new() };
    render(|root| {
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1.max(x0 + 1e-9), (y0 - pad)..(y1 + pad))
            .map_err(plot_err)?;
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(x_desc).y_desc(y_label).label_style(("sans-serif", 13));
        if whole {
            mesh.x_label_formatter(&step_label);
        }
        mesh.draw().map_err(plot_err)?;
        for (i, s) in series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), colour.stroke_width(2)))
                .map_err(plot_err)?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(plot_err)?;
        }
        Ok(())
    })
}

/// Grouped bars: one group per metric (`groups`), one bar per model (`models`); `values[m][g]`.
pub fn bars(title: &str, groups: &[String], models: &[String], values: &[Vec<Bar>]) -> Result<Vec<u8>> {
    let top = values.iter().flatten().map(|b| b.mean + b.spread).fold(0.0f64, f64::max).max(1e-6) * 1.15;
    let n = models.len().max(1);
    render(|root| {
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..groups.len() as f64, 0f64..top)
            .map_err(plot_err)?;
        let names = groups.to_vec();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 {
                    names.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(plot_err)?;
        let width = 0.8 / n as f64;
        for (m, row) in values.iter().enumerate() {
            let colour = PALETTE[m % PALETTE.len()];
            let left = |g: usize| g as f64 + 0.1 + m as f64 * width;
            chart
                .draw_series(
                    row.iter().enumerate().map(|(g, b)| {
                        Rectangle::new([(left(g), 0.0), (left(g) + width * 0.9, b.mean)], colour.filled())
                    }),
                )
                .map_err(plot_err)?
                .label(models.get(m).cloned().unwrap_or_default())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
            let whiskers = row.iter().enumerate().filter(|(_, b)| b.spread > 0.0).map(|(g, b)| {
                let x = left(g) + width * 0.45;
                PathElement::new(vec![(x, b.mean - b.spread), (x, b.mean + b.spread)], BLACK.stroke_width(1))
            });
            chart.draw_series(whiskers).map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(plot_err)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png: &[u8]) -> image::RgbImage {
        image::load_from_memory(png).unwrap().to_rgb8()
    }

    #[test]
    fn plots_are_pngs_with_ink() {
        let s = Series { name: "loss".into(), points: (0..50).map(|i| (i as f64, 1.0 / (1.0 + i as f64))).collect() };
        let img = decode(&lines("SFT loss", "step", "loss", &[s]).unwrap());
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        let dark = img.pixels().filter(|p| p[0] < 100 && p[1] < 100 && p[2] < 100).count();
        assert!(dark > 500, "axes and text are drawn ({dark} dark pixels)");
        let blue = img.pixels().filter(|p| p[2] > 150 && p[0] < 60).count();
        assert!(blue > 200, "the series is drawn ({blue})");
        let b = |m| Bar { mean: m, spread: 0.02 };
        let img = decode(
            &bars(
                "CHAIR",
                &["CHAIR_i".into(), "CHAIR_s".into()],
                &["SFT".into(), "BPO".into()],
                &[vec![b(0.3), b(0.5)], vec![b(0.2), b(0.4)]],
            )
            .unwrap(),
        );
        let orange = img.pixels().filter(|p| p[0] > 200 && p[1] > 70 && p[1] < 120 && p[2] < 40).count();
        assert!(orange > 1000, "the second model's bars are drawn ({orange})");
    }

    #[test]
    fn empty_series_still_make_a_plot() {
        assert!(!lines("nothing", "x", "y", &[]).unwrap().is_empty());
    }
}
