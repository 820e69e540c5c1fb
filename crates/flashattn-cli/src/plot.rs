//! A hand-written SVG line chart (no plotting crate): one line per series, log2 x axis.

use std::fmt::Write;

/// One line of the chart: a label and its `(x, y)` points.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points, in any order (drawn sorted by x).
    pub points: Vec<(f64, f64)>,
    /// Index into the palette (series that belong together share a color).
    pub color: usize,
    /// Draw the line dashed.
    pub dashed: bool,
}

const COLORS: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#ad494a",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A "nice" step for about `n` ticks over `[0, max]`.
fn nice_step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let r = raw / mag;
    let nice = if r <= 1.0 {
        1.0
    } else if r <= 2.0 {
        2.0
    } else if r <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// A tick value with as many decimals as the tick step needs.
fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// A value with three significant digits (tooltips).
fn fmt_value(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let decimals = (2.0 - v.abs().log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

fn fmt_x(v: f64) -> String {
    if v >= 1024.0 && (v / 1024.0).fract() == 0.0 {
        format!("{}k", v / 1024.0)
    } else {
        format!("{v}")
    }
}

/// Renders a line chart as an SVG document. The x axis is log2 (sequence lengths), the y axis linear from 0.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (960.0, 600.0);
    let (left, right, top, bottom) = (80.0, 280.0, 50.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| *x > 0.0 && y.is_finite());
    let (mut xmin, mut xmax, mut ymax) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
    for &(x, y) in pts {
        xmin = xmin.min(x.log2());
        xmax = xmax.max(x.log2());
        ymax = ymax.max(y);
    }
    if !xmin.is_finite() {
        (xmin, xmax) = (0.0, 1.0);
    }
    if xmax - xmin < 1e-9 {
        xmin -= 0.5;
        xmax += 0.5;
    }
    if ymax <= 0.0 {
        ymax = 1.0;
    }
    let step = nice_step(ymax * 1.05, 6.0);
    let ytop = (ymax * 1.05 / step).ceil() * step;
    let sx = |x: f64| left + (x.log2() - xmin) / (xmax - xmin) * pw;
    let sy = |y: f64| top + ph - y / ytop * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" font-size="16" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        esc(title)
    );
    // y grid and ticks
    let mut y = 0.0;
    while y <= ytop + step * 1e-6 {
        let py = sy(y);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            py + 4.0,
            fmt_tick(y, step)
        );
        y += step;
    }
    // x ticks at the distinct x values
    let mut xs: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).filter(|x| *x > 0.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for &x in &xs {
        let px = sx(x);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 18.0,
            fmt_x(x)
        );
    }
    let _ = writeln!(s, r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 18.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">{}</text>"#,
        top + ph / 2.0,
        top + ph / 2.0,
        esc(y_label)
    );
    // lines and legend
    for (i, se) in series.iter().enumerate() {
        let color = COLORS[se.color % COLORS.len()];
        let dash = if se.dashed { r#" stroke-dasharray="6 3""# } else { "" };
        let mut p: Vec<(f64, f64)> = se.points.iter().copied().filter(|(x, y)| *x > 0.0 && y.is_finite()).collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        let poly: Vec<String> = p.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        if poly.len() > 1 {
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                poly.join(" ")
            );
        }
        for &(x, y) in &p {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{}: {} = {}</title></circle>"#,
                sx(x),
                sy(y),
                esc(&se.label),
                fmt_x(x),
                fmt_value(y)
            );
        }
        let ly = top + 10.0 + i as f64 * 18.0;
        let lx = left + pw + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            esc(&se.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_lines_and_legend() {
        let svg = line_chart(
            "t",
            "seqlen",
            "TFLOP/s",
            &[
                Series {
                    label: "d=64 <fwd>".into(),
                    points: vec![(512.0, 1.0), (1024.0, 2.0)],
                    color: 0,
                    dashed: false,
                },
                Series { label: "one".into(), points: vec![(512.0, 0.5)], color: 0, dashed: true },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("d=64 &lt;fwd&gt;"));
        assert!(svg.contains(">1k<"));
        assert_eq!(fmt_tick(0.0005, 0.0005), "0.0005");
        assert_eq!(fmt_tick(20.0, 5.0), "20");
        assert_eq!(fmt_value(0.012345), "0.0123");
    }
}
