//! A small inline-SVG line chart (axes, ticks, legend) for loss curves; no JS, no external assets.

use std::fmt::Write;

use super::escape::html_escape;

/// One named line of a chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x, y)` points, in x order; non-finite points are skipped (a diverged loss must not break
    /// the chart).
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series from `(step, loss)` pairs as training produces them.
    pub fn from_steps(name: impl Into<String>, points: &[(u64, f32)]) -> Self {
        Self {
            name: name.into(),
            points: points
                .iter()
                .map(|&(step, loss)| (step as f64, f64::from(loss)))
                .collect(),
        }
    }
}

/// A line chart.
#[derive(Clone, Debug, PartialEq)]
pub struct LineChart {
    /// Accessible title (also the SVG `<title>`).
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label beside the y axis.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
}

/// Colours chosen to stay distinguishable for the common colour-vision deficiencies (Okabe–Ito).
const PALETTE: [&str; 6] = [
    "#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9",
];
const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 48.0;
/// Series with at most this many points also get markers (eval loss is sparse).
const MARKER_MAX_POINTS: usize = 40;

impl LineChart {
    /// Renders the chart as a standalone `<svg>` element.
    pub(crate) fn to_svg(&self) -> String {
        // (palette index, series, its finite points)
        type Drawn<'a> = (usize, &'a Series, Vec<(f64, f64)>);
        let series: Vec<Drawn> = self
            .series
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let finite = s
                    .points
                    .iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .collect();
                (i, s, finite)
            })
            .collect();
        let all: Vec<(f64, f64)> = series
            .iter()
            .flat_map(|(_, _, p)| p.iter().copied())
            .collect();
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{t}"><title>{t}</title>"#,
            t = html_escape(&self.title)
        );
        if all.is_empty() {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="middle" class="muted">no data points</text></svg>"#,
                WIDTH / 2.0,
                HEIGHT / 2.0
            );
            return svg;
        }
        let (x_lo, x_hi) = padded_range(all.iter().map(|p| p.0));
        let (y_lo, y_hi) = padded_range(all.iter().map(|p| p.1));
        let x_ticks = nice_ticks(x_lo, x_hi, 6);
        let y_ticks = nice_ticks(y_lo, y_hi, 5);
        // Extend the axes to the outer ticks so lines never leave the frame.
        let x_lo = x_ticks.first().copied().unwrap_or(x_lo).min(x_lo);
        let x_hi = x_ticks.last().copied().unwrap_or(x_hi).max(x_hi);
        let y_lo = y_ticks.first().copied().unwrap_or(y_lo).min(y_lo);
        let y_hi = y_ticks.last().copied().unwrap_or(y_hi).max(y_hi);
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let sx = |x: f64| LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w;
        let sy = |y: f64| TOP + plot_h - (y - y_lo) / (y_hi - y_lo) * plot_h;

        for &t in &y_ticks {
            let y = sy(t);
            let _ = write!(
                svg,
                r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e5e7eb"/><text x="{}" y="{:.1}" text-anchor="end" font-size="11" fill="#555">{}</text>"##,
                WIDTH - RIGHT,
                LEFT - 6.0,
                y + 4.0,
                format_tick(t)
            );
        }
        for &t in &x_ticks {
            let x = sx(t);
            let _ = write!(
                svg,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{}" stroke="#555"/><text x="{x:.1}" y="{}" text-anchor="middle" font-size="11" fill="#555">{}</text>"##,
                TOP + plot_h,
                TOP + plot_h + 5.0,
                TOP + plot_h + 18.0,
                format_tick(t)
            );
        }
        let _ = write!(
            svg,
            r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#555"/><text x="{}" y="{}" text-anchor="middle" font-size="12" fill="#333">{}</text><text transform="translate(16 {}) rotate(-90)" text-anchor="middle" font-size="12" fill="#333">{}</text>"##,
            LEFT + plot_w / 2.0,
            HEIGHT - 10.0,
            html_escape(&self.x_label),
            TOP + plot_h / 2.0,
            html_escape(&self.y_label),
        );
        for (i, _, points) in &series {
            let colour = PALETTE[i % PALETTE.len()];
            let coords: Vec<String> = points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                coords.join(" ")
            );
            if points.len() <= MARKER_MAX_POINTS {
                for &(x, y) in points {
                    let _ = write!(
                        svg,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                        sx(x),
                        sy(y)
                    );
                }
            }
        }
        // Legend in the top-right corner of the plot area.
        for (row, (i, s, _)) in series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let y = TOP + 14.0 + row as f64 * 16.0;
            let x = WIDTH - RIGHT - 150.0;
            let _ = write!(
                svg,
                r##"<line x1="{x}" x2="{}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}" font-size="12" fill="#222">{}</text>"##,
                x + 18.0,
                x + 24.0,
                y + 4.0,
                html_escape(&s.name)
            );
        }
        svg.push_str("</svg>");
        svg
    }
}

/// Min and max, widened when they coincide so a flat line sits mid-chart.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if hi - lo > f64::EPSILON * hi.abs().max(1.0) {
        (lo, hi)
    } else {
        let pad = (lo.abs() * 0.1).max(0.5);
        (lo - pad, hi + pad)
    }
}

/// Ticks at 1, 2 or 5 × 10^k covering `[lo, hi]` with about `target` intervals.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo || target == 0 {
        return Vec::new();
    }
    let raw = (hi - lo) / target as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).floor() as i64;
    let last = (hi / step).ceil() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// Short tick text: integers without decimals, otherwise up to 3 significant decimals.
fn format_tick(v: f64) -> String {
    if v == v.round() && v.abs() < 1e9 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            nice_ticks(0.0, 100.0, 5),
            [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        let ticks = nice_ticks(0.13, 0.87, 5);
        assert_eq!(ticks.first().copied(), Some(0.0));
        assert!((ticks[1] - 0.2).abs() < 1e-12);
        assert!(ticks.last().copied().unwrap_or_default() >= 0.87);
        assert!(nice_ticks(1.0, 1.0, 5).is_empty());
    }

    #[test]
    fn chart_has_a_line_per_series_a_legend_and_escaped_text() {
        let chart = LineChart {
            title: "loss <train>".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: vec![
                Series::from_steps("train", &[(0, 2.0), (10, 1.0), (20, f32::NAN), (30, 0.5)]),
                Series::from_steps("eval & held-out", &[(10, 1.2), (30, 0.8)]),
            ],
        };
        let svg = chart.to_svg();
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("eval &amp; held-out"));
        assert!(svg.contains("loss &lt;train&gt;"));
        assert!(!svg.contains("NaN"));
        // 3 finite train points and 2 eval points get markers.
        assert_eq!(svg.matches("<circle").count(), 5);
    }

    #[test]
    fn empty_and_flat_series_render() {
        let mut chart = LineChart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![],
        };
        assert!(chart.to_svg().contains("no data points"));
        chart.series.push(Series::from_steps("flat", &[(5, 1.0)]));
        let svg = chart.to_svg();
        assert!(svg.contains("<polyline") && !svg.contains("NaN") && !svg.contains("inf"));
    }
}
