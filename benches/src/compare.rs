//! `compare`: SphereDB and etcd interleaved (A B A B ...) over a client sweep, each run on a
//! fresh cluster, reported as medians and per-pair ratios (Markdown, JSON, SVG).

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use crate::runner::{self, RunConfig, RunResult};
use crate::target::{self, Conn, System};

/// Everything `compare` needs.
pub struct CompareConfig {
    pub base: RunConfig,
    pub client_sweep: Vec<usize>,
    pub pairs: usize,
    pub spheredb_bin: PathBuf,
    pub etcd_bin: PathBuf,
    pub out_dir: PathBuf,
}

/// Starts a fresh cluster of `system`, preloads it and measures one run.
pub async fn fresh_run(
    system: System,
    cfg: &RunConfig,
    spheredb_bin: &Path,
    etcd_bin: &Path,
) -> anyhow::Result<RunResult> {
    let cluster = match system {
        System::Spheredb => target::start_spheredb(spheredb_bin, 3).await?,
        System::Etcd => target::start_etcd(etcd_bin, 3).await?,
    };
    let mut conn = Conn::connect(&cluster, cfg.consistency).await?;
    runner::preload(&mut conn, cfg).await?;
    let result = runner::run(system, conn, cfg, &cluster.pids()).await?;
    drop(cluster);
    Ok(result)
}

#[derive(Serialize)]
struct Row {
    clients: usize,
    spheredb_ops_per_sec: f64,
    etcd_ops_per_sec: f64,
    throughput_ratio: f64,
    pair_throughput_ratios: Vec<f64>,
    spheredb_p50_us: u64,
    etcd_p50_us: u64,
    spheredb_p99_us: u64,
    etcd_p99_us: u64,
    p99_ratio: f64,
    spheredb_ops_per_cpu_second: f64,
    etcd_ops_per_cpu_second: f64,
    errors: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs the comparison and writes `compare.md`, `compare.json` and `compare.svg`.
pub async fn run(cfg: CompareConfig) -> anyhow::Result<String> {
    std::fs::create_dir_all(&cfg.out_dir)?;
    let total_runs = cfg.client_sweep.len() * cfg.pairs * 2;
    let mut done = 0;
    let mut results: Vec<RunResult> = Vec::new();
    for &clients in &cfg.client_sweep {
        for pair in 0..cfg.pairs {
            for system in [System::Spheredb, System::Etcd] {
                done += 1;
                let mut run_cfg = cfg.base.clone();
                run_cfg.clients = clients;
                run_cfg.seed = cfg.base.seed.wrapping_add(pair as u64);
                eprintln!(
                    "[{done}/{total_runs}] {system} clients={clients} pair={}",
                    pair + 1
                );
                let r = fresh_run(system, &run_cfg, &cfg.spheredb_bin, &cfg.etcd_bin).await?;
                eprintln!(
                    "    {:.0} ops/s  p50 {} us  p99 {} us  errors {}  {:.0} ops/cpu-s",
                    r.ops_per_sec, r.p50_us, r.p99_us, r.errors, r.ops_per_cpu_second
                );
                results.push(r);
            }
        }
    }
    let rows: Vec<Row> = cfg
        .client_sweep
        .iter()
        .map(|&clients| {
            let of = |s: System| -> Vec<&RunResult> {
                results
                    .iter()
                    .filter(|r| r.clients == clients && r.system == s)
                    .collect()
            };
            let (a, b) = (of(System::Spheredb), of(System::Etcd));
            let med = |v: &[&RunResult], f: fn(&RunResult) -> f64| {
                median(v.iter().map(|r| f(r)).collect())
            };
            let (a_tp, b_tp) = (med(&a, |r| r.ops_per_sec), med(&b, |r| r.ops_per_sec));
            let (a_p99, b_p99) = (med(&a, |r| r.p99_us as f64), med(&b, |r| r.p99_us as f64));
            Row {
                clients,
                spheredb_ops_per_sec: a_tp,
                etcd_ops_per_sec: b_tp,
                throughput_ratio: if b_tp > 0.0 { a_tp / b_tp } else { 0.0 },
                pair_throughput_ratios: a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| {
                        if y.ops_per_sec > 0.0 {
                            x.ops_per_sec / y.ops_per_sec
                        } else {
                            0.0
                        }
                    })
                    .collect(),
                spheredb_p50_us: med(&a, |r| r.p50_us as f64) as u64,
                etcd_p50_us: med(&b, |r| r.p50_us as f64) as u64,
                spheredb_p99_us: a_p99 as u64,
                etcd_p99_us: b_p99 as u64,
                p99_ratio: if b_p99 > 0.0 { a_p99 / b_p99 } else { 0.0 },
                spheredb_ops_per_cpu_second: med(&a, |r| r.ops_per_cpu_second),
                etcd_ops_per_cpu_second: med(&b, |r| r.ops_per_cpu_second),
                errors: a.iter().chain(&b).map(|r| r.errors).sum(),
            }
        })
        .collect();

    let base = &cfg.base;
    let mut md = format!(
        "Workload `{:?}`, {} keys ({:?}), {} B values, reads `{:?}`, {} s measured after {} s warm-up, \
         {} interleaved pairs per point, 3 nodes each, fresh data dirs per run. Medians; ratio = SphereDB / etcd.\n\n",
        base.workload, base.keys, base.distribution, base.value_size_bytes, base.consistency,
        base.duration_secs, base.warmup_secs, cfg.pairs
    );
    md.push_str("| clients | SphereDB ops/s | etcd ops/s | ratio | per-pair ratios | SphereDB p50 / p99 ms | etcd p50 / p99 ms | p99 ratio | SphereDB ops/CPU-s | etcd ops/CPU-s |\n");
    md.push_str("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2}× | {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} | {:.0} | {:.0} |\n",
            r.clients,
            r.spheredb_ops_per_sec,
            r.etcd_ops_per_sec,
            r.throughput_ratio,
            r.pair_throughput_ratios.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", "),
            r.spheredb_p50_us as f64 / 1000.0,
            r.spheredb_p99_us as f64 / 1000.0,
            r.etcd_p50_us as f64 / 1000.0,
            r.etcd_p99_us as f64 / 1000.0,
            r.p99_ratio,
            r.spheredb_ops_per_cpu_second,
            r.etcd_ops_per_cpu_second,
        ));
    }
    if rows.iter().any(|r| r.errors > 0) {
        md.push_str(&format!(
            "\nErrors during measured windows: {}.\n",
            rows.iter().map(|r| r.errors).sum::<u64>()
        ));
    }
    std::fs::write(cfg.out_dir.join("compare.md"), &md)?;
    std::fs::write(
        cfg.out_dir.join("compare.json"),
        serde_json::to_string_pretty(
            &serde_json::json!({ "config": base, "rows": rows, "runs": results }),
        )?,
    )?;
    plot(
        &cfg.out_dir.join("compare.svg"),
        &rows,
        &format!("{:?}", base.workload),
    )?;
    Ok(md)
}

/// Picks (SphereDB, etcd) values of one panel from a row.
type PanelValue = Box<dyn Fn(&Row) -> (f64, f64)>;

fn plot(path: &Path, rows: &[Row], workload: &str) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(500);
    let xs: Vec<f64> = rows.iter().map(|r| (r.clients as f64).log2()).collect();
    let x_max = xs.iter().cloned().fold(1.0, f64::max);
    let panels: [(&DrawingArea<_, _>, &str, PanelValue); 2] = [
        (
            &left,
            "throughput (ops/s)",
            Box::new(|r: &Row| (r.spheredb_ops_per_sec, r.etcd_ops_per_sec)),
        ),
        (
            &right,
            "p99 latency (ms)",
            Box::new(|r: &Row| {
                (
                    r.spheredb_p99_us as f64 / 1000.0,
                    r.etcd_p99_us as f64 / 1000.0,
                )
            }),
        ),
    ];
    for (area, label, value) in panels {
        let y_max = rows
            .iter()
            .map(|r| {
                let (a, b) = value(r);
                a.max(b)
            })
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{workload}: {label}"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max + 0.2, 0.0..y_max)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("clients (log2)")
            .x_label_formatter(&|x| format!("{:.0}", 2f64.powf(*x)))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (name, color, pick) in [("SphereDB", BLUE, 0usize), ("etcd", RED, 1usize)] {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .zip(&xs)
                .map(|(r, x)| {
                    let (a, b) = value(r);
                    (*x, if pick == 0 { a } else { b })
                })
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn plot_writes_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let row = |c, a, b| Row {
            clients: c,
            spheredb_ops_per_sec: a,
            etcd_ops_per_sec: b,
            throughput_ratio: a / b,
            pair_throughput_ratios: vec![a / b],
            spheredb_p50_us: 900,
            etcd_p50_us: 1000,
            spheredb_p99_us: 2000,
            etcd_p99_us: 3000,
            p99_ratio: 0.66,
            spheredb_ops_per_cpu_second: 1.0,
            etcd_ops_per_cpu_second: 1.0,
            errors: 0,
        };
        let path = dir.path().join("p.svg");
        plot(
            &path,
            &[row(1, 100.0, 90.0), row(16, 1500.0, 1000.0)],
            "Kv0",
        )
        .unwrap();
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("SphereDB"));
    }
}
