//! The run's report: `results.json` (machine-readable) and `report.html`, one self-contained
//! page with inline SVG charts drawn by plotters: a timeline of operations per worker lane,
//! latency over time and throughput over time, all with the nemesis windows shaded, so a
//! reader sees at a glance where faults hit and what they did to clients.

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::{json, Value as Json};

use super::history::{FaultRecord, OpCounts, OpSpan};
use crate::history::EventType;

/// Chart size in pixels.
const CHART_WIDTH_PX: u32 = 1200;
const TIMELINE_LANE_PX: u32 = 22;
const TIMELINE_MIN_HEIGHT_PX: u32 = 220;
const SMALL_CHART_HEIGHT_PX: u32 = 300;
/// Throughput bucket.
const THROUGHPUT_BUCKET_NS: u64 = 1_000_000_000;
/// Smallest latency shown on the log axis, in milliseconds.
const MIN_LATENCY_MS: f64 = 0.1;
/// Fewest pixels an operation's bar spans, so instant operations stay visible.
const MIN_BAR_PX: f64 = 2.0;

const OK_COLOR: RGBColor = RGBColor(46, 160, 67);
const FAIL_COLOR: RGBColor = RGBColor(214, 39, 40);
const INFO_COLOR: RGBColor = RGBColor(255, 150, 0);
const FAULT_COLOR: RGBColor = RGBColor(120, 120, 220);

/// Everything the report shows.
pub struct ReportInput<'a> {
    /// e.g. `register, nemesis kill,partition-leader, 3 nodes, seed 1`.
    pub title: String,
    /// `ok`, `illegal` or `unknown`.
    pub validity: &'a str,
    pub checker_lines: &'a [String],
    pub counts: &'a OpCounts,
    pub faults: &'a [FaultRecord],
    pub spans: &'a [OpSpan],
    /// Worker lanes; final reads are drawn on one more lane.
    pub workers: usize,
    /// End of the run (ns since its start).
    pub end_ns: u64,
    /// Lines about the run besides the checker's: crashes, setup notes.
    pub notes: &'a [String],
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn outcome_color(kind: EventType) -> RGBColor {
    match kind {
        EventType::Ok => OK_COLOR,
        EventType::Fail => FAIL_COLOR,
        EventType::Info | EventType::Invoke => INFO_COLOR,
    }
}

/// Counts as JSON.
pub fn counts_json(counts: &OpCounts) -> Json {
    let mut by_function = serde_json::Map::new();
    for ((f, outcome), n) in &counts.by_function {
        let entry = by_function.entry(f.clone()).or_insert_with(|| json!({}));
        if let Some(map) = entry.as_object_mut() {
            map.insert(outcome.clone(), json!(n));
        }
    }
    json!({
        "invoked": counts.invoked,
        "ok": counts.ok,
        "fail": counts.fail,
        "info": counts.info,
        "by_function": by_function,
    })
}

/// Faults as JSON.
pub fn faults_json(faults: &[FaultRecord]) -> Json {
    Json::Array(
        faults
            .iter()
            .map(|f| {
                json!({
                    "kind": f.kind,
                    "targets": f.targets,
                    "detail": f.detail,
                    "start_ns": f.start_ns,
                    "end_ns": f.end_ns,
                })
            })
            .collect(),
    )
}

type DrawResult<T> = Result<T, String>;

fn draw_err<E: std::fmt::Debug>(e: E) -> String {
    format!("drawing a chart: {e:?}")
}

/// Shaded nemesis windows on a chart whose y axis spans `y_low..y_high`.
fn shade_faults<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    faults: &[FaultRecord],
    end_ns: u64,
    y_low: f64,
    y_high: f64,
) -> DrawResult<()> {
    chart
        .draw_series(faults.iter().map(|f| {
            let start = secs(f.start_ns);
            let end = secs(f.end_ns.unwrap_or(end_ns));
            Rectangle::new(
                [(start, y_low), (end, y_high)],
                FAULT_COLOR.mix(0.18).filled(),
            )
        }))
        .map_err(draw_err)?;
    Ok(())
}

fn timeline_svg(input: &ReportInput<'_>) -> DrawResult<String> {
    let lanes = input.workers + 1;
    let height = (lanes as u32 * TIMELINE_LANE_PX + 90).max(TIMELINE_MIN_HEIGHT_PX);
    let end_s = secs(input.end_ns).max(1.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (CHART_WIDTH_PX, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let y_high = lanes as f64 - 0.5;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Operations per worker (green ok, red fail, orange info; shaded: faults)",
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..end_s, -0.5..y_high)
            .map_err(draw_err)?;
        let workers = input.workers;
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_labels(lanes.min(40))
            .y_label_formatter(&move |y| {
                let lane = y.round();
                if (y - lane).abs() > 0.01 || lane < 0.0 {
                    String::new()
                } else if lane as usize >= workers {
                    "final".into()
                } else {
                    format!("w{}", lane as usize)
                }
            })
            .disable_y_mesh()
            .draw()
            .map_err(draw_err)?;
        shade_faults(&mut chart, input.faults, input.end_ns, -0.5, y_high)?;
        chart
            .draw_series(input.faults.iter().map(|f| {
                let label = match f.targets.is_empty() {
                    true => f.kind.clone(),
                    false => format!("{} {}", f.kind, f.targets.join(",")),
                };
                Text::new(label, (secs(f.start_ns), y_high - 0.05), ("sans-serif", 11))
            }))
            .map_err(draw_err)?;
        let min_bar_s = end_s * MIN_BAR_PX / CHART_WIDTH_PX as f64;
        chart
            .draw_series(input.spans.iter().map(|op| {
                let start = secs(op.invoke_ns);
                let end = op.complete_ns.map_or(end_s, secs).max(start + min_bar_s);
                let lane = op.lane.min(input.workers) as f64;
                PathElement::new(
                    vec![(start, lane), (end, lane)],
                    outcome_color(op.outcome).stroke_width(6),
                )
            }))
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn latency_svg(input: &ReportInput<'_>) -> DrawResult<String> {
    let end_s = secs(input.end_ns).max(1.0);
    let max_ms = input
        .spans
        .iter()
        .filter_map(OpSpan::latency_ms)
        .fold(10.0_f64, f64::max)
        * 1.5;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (CHART_WIDTH_PX, SMALL_CHART_HEIGHT_PX))
            .into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Latency (ms, log scale) by invocation time",
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..end_s, (MIN_LATENCY_MS..max_ms).log_scale())
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_desc("ms")
            .draw()
            .map_err(draw_err)?;
        chart
            .draw_series(input.faults.iter().map(|f| {
                let start = secs(f.start_ns);
                let end = secs(f.end_ns.unwrap_or(input.end_ns));
                Rectangle::new(
                    [(start, MIN_LATENCY_MS), (end, max_ms)],
                    FAULT_COLOR.mix(0.18).filled(),
                )
            }))
            .map_err(draw_err)?;
        chart
            .draw_series(input.spans.iter().filter_map(|op| {
                let latency = op.latency_ms()?.max(MIN_LATENCY_MS);
                Some(Circle::new(
                    (secs(op.invoke_ns), latency),
                    2,
                    outcome_color(op.outcome).filled(),
                ))
            }))
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn throughput_svg(input: &ReportInput<'_>) -> DrawResult<String> {
    let end_s = secs(input.end_ns).max(1.0);
    let buckets = (input.end_ns / THROUGHPUT_BUCKET_NS + 1) as usize;
    let mut per_outcome = [
        vec![0u32; buckets],
        vec![0u32; buckets],
        vec![0u32; buckets],
    ];
    for op in input.spans {
        let Some(done) = op.complete_ns else { continue };
        let bucket = ((done / THROUGHPUT_BUCKET_NS) as usize).min(buckets - 1);
        let series = match op.outcome {
            EventType::Ok => 0,
            EventType::Fail => 1,
            EventType::Info | EventType::Invoke => 2,
        };
        per_outcome[series][bucket] += 1;
    }
    let max = per_outcome
        .iter()
        .flat_map(|s| s.iter())
        .copied()
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.2;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (CHART_WIDTH_PX, SMALL_CHART_HEIGHT_PX))
            .into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        draw_throughput(&root, input, &per_outcome, end_s, max)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn draw_throughput<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    input: &ReportInput<'_>,
    per_outcome: &[Vec<u32>; 3],
    end_s: f64,
    max: f64,
) -> DrawResult<()> {
    let mut chart = ChartBuilder::on(root)
        .caption("Completed operations per second", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end_s, 0.0..max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("ops/s")
        .draw()
        .map_err(draw_err)?;
    shade_faults(&mut chart, input.faults, input.end_ns, 0.0, max)?;
    let names = ["ok", "fail", "info"];
    let colors = [OK_COLOR, FAIL_COLOR, INFO_COLOR];
    for ((series, name), color) in per_outcome.iter().zip(names).zip(colors) {
        let points: Vec<(f64, f64)> = series
            .iter()
            .enumerate()
            .map(|(i, n)| (i as f64 + 0.5, f64::from(*n)))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(draw_err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// Escapes text for HTML.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

/// The report page.
pub fn render_html(input: &ReportInput<'_>) -> Result<String, String> {
    let timeline = timeline_svg(input)?;
    let latency = latency_svg(input)?;
    let throughput = throughput_svg(input)?;
    let verdict_color = match input.validity {
        "ok" => "#2e7d32",
        "illegal" => "#c62828",
        _ => "#ef6c00",
    };
    let mut faults_rows = String::new();
    for f in input.faults {
        let end = f
            .end_ns
            .map_or_else(|| "-".to_string(), |e| format!("{:.2}", secs(e)));
        faults_rows.push_str(&format!(
            "<tr><td>{:.2}</td><td>{end}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            secs(f.start_ns),
            escape_html(&f.kind),
            escape_html(&f.targets.join(",")),
            escape_html(&f.detail)
        ));
    }
    if faults_rows.is_empty() {
        faults_rows.push_str("<tr><td colspan=\"5\">no faults injected</td></tr>\n");
    }
    let c = input.counts;
    let checker = escape_html(&input.checker_lines.join("\n"));
    let notes: String = input
        .notes
        .iter()
        .map(|n| format!("<li>{}</li>", escape_html(n)))
        .collect();
    Ok(format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.verdict {{ font-size: 1.6em; font-weight: bold; color: {verdict_color}; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; font-size: 0.9em; }}
pre {{ background: #f6f6f6; padding: 0.8em; overflow-x: auto; }}
svg {{ display: block; margin: 0.5em 0 1.5em; }}
</style></head><body>
<h1>{title}</h1>
<p class="verdict">{validity}</p>
<table><tr><th>operations</th><th>ok</th><th>fail</th><th>info</th></tr>
<tr><td>{invoked}</td><td>{ok}</td><td>{fail}</td><td>{info}</td></tr></table>
<h2>Checker</h2>
<pre>{checker}</pre>
<ul>{notes}</ul>
<h2>Timeline</h2>
{timeline}
{latency}
{throughput}
<h2>Faults</h2>
<table><tr><th>start (s)</th><th>end (s)</th><th>fault</th><th>nodes</th><th>detail</th></tr>
{faults_rows}</table>
<p>Files: <code>history.jsonl</code> (every operation), <code>results.json</code>,
<code>nodes/*.log</code> (node logs).</p>
</body></html>
"#,
        title = escape_html(&input.title),
        validity = escape_html(input.validity),
        invoked = c.invoked,
        ok = c.ok,
        fail = c.fail,
        info = c.info,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Function;

    #[test]
    fn renders_a_page_with_three_charts() {
        let spans = vec![
            OpSpan {
                process: 0,
                f: Function::Write,
                lane: 0,
                invoke_ns: 100_000_000,
                complete_ns: Some(110_000_000),
                outcome: EventType::Ok,
            },
            OpSpan {
                process: 1,
                f: Function::Read,
                lane: 1,
                invoke_ns: 1_200_000_000,
                complete_ns: None,
                outcome: EventType::Info,
            },
        ];
        let faults = vec![FaultRecord {
            kind: "kill-leader".into(),
            targets: vec!["n1".into()],
            detail: String::new(),
            start_ns: 500_000_000,
            end_ns: Some(1_500_000_000),
        }];
        let counts = super::super::history::count_ops(&spans);
        let lines = vec!["ok <fine>".to_string()];
        let input = ReportInput {
            title: "register".into(),
            validity: "ok",
            checker_lines: &lines,
            counts: &counts,
            faults: &faults,
            spans: &spans,
            workers: 2,
            end_ns: 2_000_000_000,
            notes: &[],
        };
        let html = render_html(&input).expect("renders");
        assert_eq!(html.matches("<svg").count(), 3);
        assert!(html.contains("ok &lt;fine&gt;"));
        assert!(html.contains("kill-leader"));
        let json = counts_json(&counts);
        assert_eq!(json["by_function"]["write"]["ok"], 1);
    }
}
